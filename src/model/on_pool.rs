//! Runs a whole forward pass on one of rayon's threads.
//!
//! Every product of a forward pass is split across rayon's threads. Called from a thread
//! outside the pool (a program's main thread), each product is queued to the pool, the
//! caller sleeps, and the pool wakes it when the product is done: one more wake-up per
//! product, a few hundred per forward pass. Called from one of the pool's threads, the
//! caller computes a part of each product itself and nothing outside the pool waits (the
//! way OpenMP's main thread works in PyTorch). Measured on 2 cores (Zen 3, SmolLM2-135M,
//! f32, both ways alternating in one process, 60 prefills each, three runs): prefill of
//! 128 tokens 1.057-1.077× as fast, 512 tokens 1.02×. Results are bit-identical: a
//! product's parts and their order do not depend on which thread starts it.
//!
//! Only inference moves. glibc gives each thread that allocates its own malloc arena, and
//! memory freed in one arena is not reused by another: with training forwards on the pool
//! and their backward on the caller, the default conversion's peak resident memory rose
//! from 4.8 to 8.8 GB. (The examples also set `M_ARENA_MAX` to 1, so that evaluation on
//! the pool reuses what training freed: a 3-step `convert` peaked at 4.75 GB with nothing
//! on the pool, 4.98 with inference on it, 4.87 with one arena.)

/// Calls `f` on a thread of rayon's global pool: directly when the caller is one, else
/// queued to the pool while the caller waits. Returns `f`'s result.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::current_thread_index() {
        Some(_) => f(),
        None => rayon::scope(|_| f()),
    }
}
