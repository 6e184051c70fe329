//! Threads that stay awake between the matrix-vector products of a decode step.
//!
//! A decode step is about 200 products of one token's activations with a weight of
//! 0.4-7 MB, each bound by memory bandwidth (about 14 GB/s from one core here, 25 GB/s
//! from two). Split across rayon's threads, each product first wakes a sleeping worker,
//! which costs about as much as reading a small weight: measured on 2 cores, a
//! `576 × 576` product from memory took 115 µs on rayon, 97 µs on one thread and 50 µs on
//! two threads that wait for work by spinning (`576 × 192`: 64 / 31 / 17 µs). This is what
//! llama.cpp's threads do between the operations of a step. Here the helper threads spin
//! for [`SPIN`] after their last part of a decode product, then park, so an idle process
//! keeps no core busy. After a prefill's product they park at once: a prefill's products
//! take milliseconds, waking costs little against them, and a spinning helper would take
//! a core from the rayon threads of the attention and the element-wise ops between them.
//!
//! One product runs on the pool at a time; a caller that finds it busy (another thread
//! decoding at the same time) runs its product on rayon instead.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper waits for the next part by spinning before it parks, after a
/// [`Next::Soon`] product: longer than the gaps between the products of one decode step
/// (attention, norms, sampling), short enough that a process that stops decoding frees
/// its cores at once.
const SPIN: Duration = Duration::from_millis(2);

/// When the caller expects its next product on the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Within microseconds (a decode step): the helpers spin for [`SPIN`].
    Soon,
    /// Not soon enough to spin for (a prefill): the helpers park at once.
    Later,
}

/// Splits `out` into at most one contiguous part per thread, each a multiple of `granule`
/// elements (the last takes the rest) and at least `min_part` elements long, and calls
/// `fill(offset, part)` for each part, where `offset` is the part's first index in `out`.
/// The parts run at once on the caller and the pool's helpers; the call returns when all
/// are filled. `next` tells the helpers whether to spin for the caller's next product.
/// A panic in `fill` is re-raised on the caller once every part has stopped.
pub(crate) fn fill_parts<F>(out: &mut [f32], granule: usize, min_part: usize, next: Next, fill: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let part_len = part_len(out.len(), granule, min_part);
    if part_len >= out.len() {
        fill(0, out);
        return;
    }
    let parts: Vec<Mutex<(usize, &mut [f32])>> = out
        .chunks_mut(part_len)
        .enumerate()
        .map(|(i, part)| Mutex::new((i * part_len, part)))
        .collect();
    run_parts(parts.len(), next, &|i: usize| {
        if let Some(part) = parts.get(i) {
            let mut part = part.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let (offset, values) = &mut *part;
            fill(*offset, values);
        }
    });
}

/// Splits `0..len` as [`fill_parts`] splits its output and calls `run(range)` for each
/// part at once on the caller and the pool's helpers; returns when all have returned.
pub(crate) fn for_each_range<F>(len: usize, granule: usize, min_part: usize, next: Next, run: F)
where
    F: Fn(std::ops::Range<usize>) + Sync,
{
    let part_len = part_len(len, granule, min_part);
    if part_len >= len {
        run(0..len);
        return;
    }
    run_parts(len.div_ceil(part_len), next, &|i: usize| {
        run(i * part_len..((i + 1) * part_len).min(len));
    });
}

/// The length of each part (the last may be shorter) when `len` elements are split into
/// at most one part per thread, each a multiple of `granule` and at least `min_part` long;
/// `len` itself (or more) when they are not split.
fn part_len(len: usize, granule: usize, min_part: usize) -> usize {
    let granule = granule.max(1);
    let most_parts = (len / min_part.max(1)).clamp(1, pool().helpers.len() + 1);
    if most_parts == 1 {
        return len.max(1);
    }
    len.div_ceil(most_parts).div_ceil(granule) * granule
}

/// Runs `job(i)` for `i` in `0..parts` on the pool, or on rayon while another thread's
/// product holds the pool.
fn run_parts(parts: usize, next: Next, job: &Job<'_>) {
    let pool = pool();
    // A panic re-raised by `run` poisons the lock; the pool itself is still sound.
    let only_product = match pool.busy.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    };
    match only_product {
        Some(_guard) => pool.run(parts, next, job),
        None => {
            use rayon::prelude::*;
            (0..parts).into_par_iter().for_each(job);
        }
    }
}

/// A part of a product, as the helpers see it: `job(i)` fills part `i`.
type Job<'a> = dyn Fn(usize) + Sync + 'a;

/// `*const Job` with its lifetime erased, so that a helper can hold it. It is only
/// dereferenced between [`Pool::run`] posting it and that call seeing every helper done.
#[derive(Clone, Copy)]
struct JobPtr(*const Job<'static>);

// SAFETY: the job is `Sync`, and `Pool::run` keeps it alive until no helper uses it.
unsafe impl Send for JobPtr {}

/// What the caller and one helper share.
struct Slot {
    /// Bumped by the caller for each product the helper takes part in.
    posted: AtomicU64,
    /// The value of `posted` whose part the helper has finished.
    finished: AtomicU64,
    /// The job of the latest post, the part the helper fills, and whether to spin after.
    job: Mutex<Option<(JobPtr, usize, Next)>>,
    /// Set by the helper just before it parks.
    parked: AtomicBool,
    /// Set when a part panicked on the helper.
    panicked: AtomicBool,
}

struct Helper {
    slot: Arc<Slot>,
    thread: Thread,
}

struct Pool {
    helpers: Vec<Helper>,
    /// Held by the caller of the product running on the pool.
    busy: Mutex<()>,
}

/// The process's pool: one helper for each of candle's threads but the caller's.
fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let helpers = (1..candle_core::utils::get_num_threads())
            .filter_map(|i| {
                let slot = Arc::new(Slot {
                    posted: AtomicU64::new(0),
                    finished: AtomicU64::new(0),
                    job: Mutex::new(None),
                    parked: AtomicBool::new(false),
                    panicked: AtomicBool::new(false),
                });
                let theirs = slot.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("modification-decode-{i}"))
                    .spawn(move || help(&theirs))
                    .ok()?;
                Some(Helper {
                    slot,
                    thread: handle.thread().clone(),
                })
            })
            .collect();
        Pool {
            helpers,
            busy: Mutex::new(()),
        }
    })
}

impl Pool {
    /// Runs `job(0)` on the caller and `job(i)` for `i` in `1..parts` on helper `i - 1`;
    /// returns when every part is done.
    fn run(&self, parts: usize, next: Next, job: &Job<'_>) {
        // SAFETY: only the lifetime is erased; `job` outlives every use by a helper,
        // because this function waits below until each helper it posted to has finished.
        let erased: JobPtr =
            JobPtr(unsafe { std::mem::transmute::<&Job<'_>, &'static Job<'static>>(job) });
        let posted: Vec<(&Helper, u64)> = (self.helpers.iter().take(parts.saturating_sub(1)))
            .enumerate()
            .map(|(i, helper)| {
                let slot = &helper.slot;
                *slot.job.lock().unwrap_or_else(|p| p.into_inner()) = Some((erased, i + 1, next));
                let number = slot.posted.fetch_add(1, Ordering::SeqCst) + 1;
                if slot.parked.swap(false, Ordering::SeqCst) {
                    helper.thread.unpark();
                }
                (helper, number)
            })
            .collect();
        let own = catch_unwind(AssertUnwindSafe(|| job(0)));
        let mut helper_panicked = false;
        for (helper, number) in posted {
            let slot = &helper.slot;
            while slot.finished.load(Ordering::Acquire) != number {
                std::hint::spin_loop();
            }
            helper_panicked |= slot.panicked.swap(false, Ordering::Relaxed);
        }
        if let Err(payload) = own {
            resume_unwind(payload);
        }
        if helper_panicked {
            resume_unwind(Box::new("a decode product panicked on a helper thread"));
        }
    }
}

/// A helper's life: wait for a post (spinning, then parked), fill its part, report.
fn help(slot: &Slot) {
    let (mut seen, mut spin) = (0u64, Duration::ZERO);
    loop {
        let number = wait_for_post(slot, seen, spin);
        seen = number;
        let job = *slot.job.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((JobPtr(job), part, next)) = job {
            spin = match next {
                Next::Soon => SPIN,
                Next::Later => Duration::ZERO,
            };
            // SAFETY: the poster waits for `finished == number` before `job` goes away.
            let job: &Job<'static> = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| job(part))).is_err() {
                slot.panicked.store(true, Ordering::Relaxed);
            }
        }
        slot.finished.store(number, Ordering::Release);
    }
}

/// Returns the first value of `slot.posted` other than `seen`, spinning for `spin` before
/// the helper parks.
fn wait_for_post(slot: &Slot, seen: u64, spin: Duration) -> u64 {
    loop {
        let since = Instant::now();
        let mut spins = 0u32;
        loop {
            let number = slot.posted.load(Ordering::Acquire);
            if number != seen {
                return number;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && since.elapsed() >= spin {
                break;
            }
        }
        slot.parked.store(true, Ordering::SeqCst);
        if slot.posted.load(Ordering::SeqCst) == seen {
            // A post after the check above finds `parked` set and unparks; an unpark
            // between the check and this call makes it return at once.
            std::thread::park();
        }
        slot.parked.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_is_filled_once_with_its_own_index() {
        for (len, granule, min_part) in [(0, 1, 1), (1, 64, 64), (100, 1, 1), (1000, 64, 32)] {
            for _round in 0..3 {
                let mut out = vec![-1f32; len];
                fill_parts(&mut out, granule, min_part, Next::Soon, |offset, part| {
                    for (i, v) in part.iter_mut().enumerate() {
                        *v += (offset + i) as f32 + 1.0;
                    }
                });
                let want: Vec<f32> = (0..len).map(|i| i as f32).collect();
                assert_eq!(out, want, "len {len}, granule {granule}");
            }
        }
    }

    #[test]
    fn products_from_many_threads_at_once_are_each_right() {
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for round in 0..50 {
                        let mut out = vec![0f32; 4096];
                        fill_parts(&mut out, 16, 16, Next::Later, |offset, part| {
                            for (i, v) in part.iter_mut().enumerate() {
                                *v = (offset + i + t + round) as f32;
                            }
                        });
                        for (i, v) in out.iter().enumerate() {
                            assert_eq!(*v, (i + t + round) as f32);
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_part_reaches_the_caller_and_the_pool_still_works() {
        let result = catch_unwind(|| {
            let mut out = vec![0f32; 4096];
            fill_parts(&mut out, 1, 1, Next::Soon, |offset, _| {
                if offset > 0 {
                    panic!("part at {offset}");
                }
            });
        });
        // With one thread there is no helper part, and nothing panics.
        assert_eq!(result.is_err(), !pool().helpers.is_empty());
        let mut out = vec![0f32; 4096];
        fill_parts(&mut out, 1, 1, Next::Later, |offset, part| {
            part.fill(offset as f32)
        });
        let last_part = if pool().helpers.is_empty() {
            0.0
        } else {
            2048.0
        };
        assert_eq!((out[0], out[4095]), (0.0, last_part));
    }
}
