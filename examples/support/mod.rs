//! What every example (and bench) binary sets up at start: the allocator tuning that
//! candle's CPU backend needs, `tracing` output filtered by `RUST_LOG`, and the arguments
//! they share (`--device`, `--dtype`, `--train`, `--objective`).
//!
//! Process-wide settings belong to the binaries, not to the library.
#![allow(dead_code)]

/// `--device` and `--dtype`: where the model runs and in which float type.
#[derive(Clone, Debug, clap::Args)]
pub struct DeviceArgs {
    /// Device: cpu, cuda (GPU 0) or cuda:N. CUDA needs a build with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights dtype: f32, bf16 or f16 (routers, adapters and optimizer state stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Precision of the linear layers' f32 products on the CPU: f32, or bf16 (operands
    /// rounded to bf16, f32 sums) on AMX tiles or AVX512-BF16 dot products where the CPU
    /// has them, f32 elsewhere.
    /// `convert` and `sweep` use it for training only (evaluation and calibration stay
    /// f32); the other binaries for every product of more than 8 rows.
    #[arg(long, value_enum, default_value = "f32")]
    pub matmul: MatmulArg,
}

/// `--matmul`: the precision of f32 products on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MatmulArg {
    /// f32 products.
    F32,
    /// bf16 operands, f32 sums, on AMX tiles or AVX512-BF16 dot products (PyTorch's
    /// `set_float32_matmul_precision("medium")`).
    Bf16,
}

impl MatmulArg {
    /// What runs the products on this CPU, for a bench's output: `f32`, `bf16 (AmxTiles)`,
    /// `bf16 (Avx512Dot)`, or `f32 (no bf16 kernel)`.
    pub fn describe(self) -> String {
        match (self, modification::model::amx::bf16_kernel()) {
            (Self::F32, _) => "f32".into(),
            (Self::Bf16, Some(kernel)) => format!("bf16 ({kernel:?})"),
            (Self::Bf16, None) => "f32 (no bf16 kernel)".into(),
        }
    }

    /// The library's setting.
    pub fn precision(self) -> modification::model::amx::MatmulPrecision {
        match self {
            Self::F32 => modification::model::amx::MatmulPrecision::Highest,
            Self::Bf16 => modification::model::amx::MatmulPrecision::Bf16,
        }
    }
}

impl DeviceArgs {
    /// The candle device `--device` names.
    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        use anyhow::Context;
        let ordinal = match self.device.as_str() {
            "cpu" => return Ok(candle_core::Device::Cpu),
            "cuda" => 0,
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .with_context(|| format!("unknown --device {other} (cpu, cuda or cuda:N)"))?,
        };
        candle_core::Device::new_cuda(ordinal)
            .with_context(|| format!("--device {}: no CUDA device", self.device))
    }

    /// The dtype `--dtype` names.
    pub fn dtype(&self) -> anyhow::Result<candle_core::DType> {
        Ok(match self.dtype.as_str() {
            "f32" => candle_core::DType::F32,
            "bf16" => candle_core::DType::BF16,
            "f16" => candle_core::DType::F16,
            other => anyhow::bail!("unknown --dtype {other} (f32, bf16 or f16)"),
        })
    }
}

/// `--quantized`: run the projections and `lm_head` as GGML blocks.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum QuantArg {
    /// The GGUF file's own blocks (`--model` must be a GGUF file).
    Gguf,
    /// Quantize the weights to Q4_0 (`lm_head` to Q8_0).
    #[value(name = "q4_0")]
    Q4_0,
    /// Quantize the weights to Q4_1 (`lm_head` to Q8_0).
    #[value(name = "q4_1")]
    Q4_1,
    /// Quantize the weights to Q8_0.
    #[value(name = "q8_0")]
    Q8_0,
}

/// Switches `model` to quantized inference as `arg` says; `model_path` is the file a
/// `gguf` run reads the blocks from.
pub fn quantize(
    model: &mut modification::Llama,
    arg: QuantArg,
    model_path: &str,
) -> anyhow::Result<()> {
    use candle_core::quantized::GgmlDType;
    let dtype = match arg {
        QuantArg::Gguf => {
            let blocks =
                modification::checkpoint::gguf::load_blocks(std::path::Path::new(model_path))?;
            anyhow::ensure!(
                model.use_blocks(&blocks)? > 0,
                "--quantized gguf: {model_path} holds no quantized matrices"
            );
            return Ok(());
        }
        QuantArg::Q4_0 => GgmlDType::Q4_0,
        QuantArg::Q4_1 => GgmlDType::Q4_1,
        QuantArg::Q8_0 => GgmlDType::Q8_0,
    };
    Ok(model.quantize(dtype)?)
}

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
/// (disabling `mmap` altogether let one conversion's heap grow to 24 GiB). One arena for
/// all threads (`M_ARENA_MAX = 1`): inference runs on rayon's threads (`model::on_pool`),
/// and memory that training freed in the main thread's arena would not be reused by
/// theirs (a 3-step `convert` peaked at 4.98 GB with their own arenas, 4.87 with one).
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
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Lets candle's CPU worker threads sleep as soon as an element-wise op is done, for
/// inference. candle runs element-wise ops on a thread pool of its own whose workers spin
/// 25 000 times before they park; the matmuls between those ops run on rayon's threads,
/// and on a small machine the spinning worker takes a core from them. Measured on 2 cores
/// (SmolLM2-135M, f32, two sittings): prefill of 512 tokens 719 / 674 / 720 tok/s with the
/// spin, 850 / 862 / 859 without; 128 and 2048 tokens and decode move within their noise.
/// Training loses (full-parameter steps 164 / 162 tok/s with the spin, 146 / 150 without:
/// its backward runs element-wise ops back to back), so `convert`, `sweep` and
/// `bench_train` keep candle's default. A `CANDLE_BARRIER_POOL_SPIN_LIMIT` already in the
/// environment wins.
///
/// Call it first in `main`, before any tensor op (candle reads the setting once, when its
/// pool starts) and before other threads exist.
pub fn park_idle_threads_for_inference() {
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN_LIMIT).is_none() {
        std::env::set_var(SPIN_LIMIT, "0");
    }
}

/// A checkpoint with the config and tokenizer of `dir` (`config.json`, `tokenizer.json`)
/// and drawn weights: N(0, 0.02²) projections and embeddings, norms at 1 (the
/// initialisation of LLaMA-family models), in `dtype` on `device`. For speed measurements
/// where the real weights cannot be had; its outputs mean nothing.
pub fn random_checkpoint(
    dir: &std::path::Path,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> anyhow::Result<modification::Checkpoint> {
    use anyhow::Context;
    let config = modification::LlamaConfig::from_json_file(dir.join("config.json"))?;
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in config.tensor_shapes() {
        let t = if name.ends_with("norm.weight") {
            candle_core::Tensor::ones(shape, dtype, device)?
        } else {
            candle_core::Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?
        };
        tensors.insert(name, t);
    }
    let ckpt = modification::Checkpoint {
        config,
        tensors,
        tokenizer,
        extra_config: Default::default(),
    };
    ckpt.validate().context("the drawn checkpoint")?;
    Ok(ckpt)
}

/// The corpus under `data` (every sub-folder of .txt files one source), tokenized by the
/// model's tokenizer into rows of `seq_len` tokens, documents separated by its EOS.
pub fn load_corpus(
    data: &std::path::Path,
    ckpt: &modification::Checkpoint,
    seq_len: usize,
) -> anyhow::Result<modification::train::Corpus> {
    use modification::train::{Corpus, CorpusOptions, SourceSpec};
    let specs = SourceSpec::folders_of(data)?;
    let opts = CorpusOptions {
        seq_len,
        ..CorpusOptions::default()
    };
    let eos = ckpt.config.eos_token_id.unwrap_or(0);
    Ok(Corpus::load(&specs, &ckpt.tokenizer, eos, &opts)?)
}

/// Prints a conversion's estimated peak memory against the available memory and refuses
/// a run that cannot fit, unless `ignore` (`--ignore-memory-estimate`).
pub fn check_memory(
    estimate: &modification::train::memory::MemoryEstimate,
    ignore: bool,
) -> anyhow::Result<()> {
    use modification::train::memory;
    let available = memory::available_memory();
    println!(
        "estimated peak memory: {estimate}; available: {}",
        available.map_or("unknown".to_string(), |a| format!("{:.1} GB", a / 1e9))
    );
    if let (Some(available), false) = (available, ignore) {
        memory::check_fits(estimate, available)?;
    }
    Ok(())
}
