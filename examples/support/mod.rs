//! What every example (and bench) binary sets up at start: the allocator tuning that
//! candle's CPU backend needs, and `tracing` output filtered by `RUST_LOG`.
//!
//! Process-wide settings belong to the binaries, not to the library.
#![allow(dead_code)]

/// `--train`: which parameters a conversion trains.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TrainArg {
    Routers,
    Lora,
    All,
}

impl From<TrainArg> for modification::train::Trainable {
    fn from(arg: TrainArg) -> Self {
        match arg {
            TrainArg::Routers => Self::Routers,
            TrainArg::Lora => Self::Lora,
            TrainArg::All => Self::All,
        }
    }
}

/// `--objective`: what a conversion trains the model to match.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ObjectiveArg {
    Lm,
    Kl,
    KlLm,
}

impl From<ObjectiveArg> for modification::train::Objective {
    fn from(arg: ObjectiveArg) -> Self {
        match arg {
            ObjectiveArg::Lm => Self::Lm,
            ObjectiveArg::Kl => Self::Kl,
            ObjectiveArg::KlLm => Self::KlLm,
        }
    }
}

/// Installs a `tracing` subscriber that prints to stderr the events `RUST_LOG` selects
/// (`RUST_LOG=modification=debug`, ...); nothing when it is unset.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Makes glibc's malloc keep freed memory for reuse instead of returning it to the OS.
///
/// candle allocates a fresh buffer for every op's output. With glibc's defaults, buffers
/// above 128 KiB are `mmap`ed and unmapped on free, and the heap is trimmed whenever its
/// free top grows past a threshold, so every op page-faults (and the kernel zeroes) its
/// output into existence. Here buffers up to 32 MiB (the most glibc allows) come from the
/// heap, trimming is disabled (`M_TRIM_THRESHOLD = -1`: a backward pass frees gigabytes at
/// once, which a finite threshold hands back to the OS after every step) and the heap
/// grows in 1 GiB steps. Measured on a 2-core machine, three training steps of
/// SmolLM2-135M: 7.7 M page faults (`clear_page` 31% of all cycles) and 19 s a step
/// before; 1.7 M faults (the heap's first touch) and 10.5 s a step after, with the losses
/// computed over vocabulary chunks so that no logits tensor passes 32 MiB. Buffers above
/// 32 MiB are still mapped and returned, so a rare huge tensor cannot fragment the heap
/// (disabling `mmap` altogether let one conversion's heap grow to 24 GiB).
///
/// The process keeps its peak heap for its lifetime. Call it once at the start of `main`,
/// before tensors are allocated. It affects the whole process; it does nothing on
/// platforms other than Linux with glibc.
pub fn tune_malloc_for_tensors() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; called before any
    // concurrent allocation-heavy work starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}
