//! The peak memory of a conversion, estimated from the model's config before any weight is
//! loaded, so that a run that cannot fit is refused instead of being killed.
//!
//! Weights, trained parameters and optimizer state are counted exactly. Activations are
//! what candle's autograd keeps for the backward pass of one micro-batch; they are modelled
//! per token as `k_layer · (d + f) + k_attention · H · T` elements per layer plus
//! `k_logits · V` f32 elements for the logits and the loss (more with a teacher), times
//! the allocator's measured retention (README, "Converting LLaMA-2-7B"). The constants
//! depend on the kernels a run takes: f32 on the CPU runs the fused kernels (attention
//! without a `(T, T)` tensor, losses over vocabulary chunks, RMSNorm, SwiGLU and RoPE that
//! keep only their inputs); other dtypes run candle's composed ops. The composed set is
//! fitted to the peak resident memory `bench_train` measured on SmolLM2-135M and on the
//! LLaMA-2-shaped test checkpoint (which pins the logits' share); the fused set to whole
//! `convert` runs on SmolLM2-135M, as an upper bound of every recipe measured.

use super::config::{Objective, TrainConfig, Trainable};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use candle_core::DType;

/// What one set of kernels keeps for the backward pass, in elements per token.
struct ActivationModel {
    /// Per layer and per unit of `d + f` (hidden plus MLP width): residual stream, norms,
    /// projections, SwiGLU and their copies.
    layer: f64,
    /// Additional, with LoRA adapters: each adapted projection's low-rank path and sum.
    lora: f64,
    /// Per layer, per head and per key position: attention scores, mask, probabilities.
    attention: f64,
    /// f32 elements per vocabulary entry: logits, log-softmax and their gradients.
    logits: f64,
    /// Additional f32 elements per vocabulary entry with a teacher: its logits, both
    /// log-probabilities, the KL's terms and their gradients.
    teacher_logits: f64,
}

/// candle's composed ops: every dtype but f32 (the plan is of CPU runs only).
const COMPOSED: ActivationModel = ActivationModel {
    layer: 16.5,
    lora: 8.0,
    attention: 5.0,
    logits: 4.0,
    teacher_logits: 9.0,
};

/// The fused f32 CPU kernels: no `(T, T)` tensor and no whole logits tensor is kept.
/// Fitted, with [`ALLOCATOR_SLACK`] applied, as an upper bound of the peak resident memory
/// of whole `convert --steps 1` runs on SmolLM2-135M (4 × 256 tokens, `/usr/bin/time`'s
/// KiB × 1024, 2026-12-01, with the loss's 64 MiB chunks): the paper's recipe (odd
/// layers, `Skip`, router-only LM) 3.88 GB, router-only LM on every layer with `Keep`
/// 3.42 GB (both planned 3.90: `layer`), full-parameter + KL 5.41 GB (planned 6.05),
/// LoRA + KL 5.62 GB (planned 5.75: `lora`; the whole 80-step default conversion peaked
/// at 5.70). A training step alone peaks lower (`bench_train`: 2.40 GB router-only LM);
/// evaluation, calibration and the allocator's retention make the rest.
const FUSED: ActivationModel = ActivationModel {
    layer: 8.4,
    lora: 4.8,
    attention: 0.0,
    logits: 0.0,
    teacher_logits: 0.0,
};

/// The resident set after the first steps over the live peak of one step's activations:
/// glibc keeps freed heap memory (the examples never trim it, for speed) and the routed
/// steps' varying tensor sizes fragment it. Measured on the default SmolLM2 conversion
/// with the composed ops (before session 5): 10.8 GB resident at step 1 (the live
/// estimate: 11.2), 16.0 GB from step 2 on. The fused constants are fitted with it applied.
const ALLOCATOR_SLACK: f64 = 1.45;
/// The process's own footprint (runtime, tokenized corpus), bytes.
const BASE_BYTES: f64 = 200e6;

/// What a conversion holds at its peak, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// The base model's weights in the conversion's dtype; twice with
    /// [`Trainable::All`] (the trained copy and the frozen original, which is also the
    /// teacher).
    pub weights: f64,
    /// Trained parameters that are not base weights (routers, LoRA adapters; f32), plus
    /// the f32 master copies of bf16/f16 base weights under [`Trainable::All`].
    pub trained: f64,
    /// AdamW's two f32 moments per trained parameter, and one gradient per trained
    /// parameter.
    pub optimizer: f64,
    /// What one micro-batch keeps for the backward pass, logits included, with the
    /// allocator's retention on top.
    pub activations: f64,
    /// The process's own footprint.
    pub base: f64,
}

impl MemoryEstimate {
    /// The sum of the parts, bytes.
    pub fn total(&self) -> f64 {
        self.weights + self.trained + self.optimizer + self.activations + self.base
    }
}

impl std::fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = |b: f64| b / 1e9;
        write!(
            f,
            "{:.1} GB (weights {:.1}, trained {:.2}, optimizer and gradients {:.2}, \
             activations {:.1}, process {:.1})",
            gb(self.total()),
            gb(self.weights),
            gb(self.trained),
            gb(self.optimizer),
            gb(self.activations),
            gb(self.base)
        )
    }
}

/// Parameters of the base model: every tensor of `cfg` (an untied `lm_head` included).
pub fn parameter_count(cfg: &LlamaConfig) -> u64 {
    (cfg.tensor_shapes().iter())
        .map(|(_, shape)| shape.iter().product::<usize>() as u64)
        .sum()
}

/// Parameters of rank-`rank` LoRA adapters on the seven projections of every layer:
/// `r · (in + out)` each.
pub fn lora_parameter_count(cfg: &LlamaConfig, rank: usize) -> u64 {
    let d = cfg.hidden_size as u64;
    let kv = (cfg.num_kv_heads() * cfg.head_dim()) as u64;
    let f = cfg.intermediate_size as u64;
    let per_layer = (d + d) + (d + kv) * 2 + (d + d) + (d + f) * 3;
    rank as u64 * per_layer * cfg.num_hidden_layers as u64
}

/// The estimated peak host memory of converting a model of config `cfg` on the CPU with
/// weights in `dtype` under `train` (its trainable set, objective, LoRA rank and
/// micro-batch size), rows of `seq_len` tokens. f32 counts the fused kernels' activations,
/// other dtypes candle's composed ops'.
///
/// Every layer counts as routed and trained through (the default recipe routes all
/// layers); a router is `d + 1` f32 parameters.
pub fn conversion_memory(
    cfg: &LlamaConfig,
    dtype: DType,
    train: &TrainConfig,
    seq_len: usize,
) -> MemoryEstimate {
    let (d, f) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let layers = cfg.num_hidden_layers as f64;
    let width = dtype.size_in_bytes() as f64;
    let params = parameter_count(cfg) as f64;
    let routers = layers * (d + 1.0);

    let (weights, trained, optimized) = match train.trainable {
        Trainable::Routers => (params * width, routers * 4.0, routers),
        Trainable::Lora => {
            let adapters = lora_parameter_count(cfg, train.lora.rank) as f64 + routers;
            (params * width, adapters * 4.0, adapters)
        }
        Trainable::All => {
            let master = if dtype == DType::F32 {
                0.0
            } else {
                params * 4.0
            };
            (
                2.0 * params * width,
                master + routers * 4.0,
                params + routers,
            )
        }
    };
    // Two f32 moments and one gradient (in the parameter's dtype; f32 is the bound).
    let optimizer = optimized * 3.0 * 4.0;

    let tokens = (train.batch_size * seq_len) as f64;
    let heads = cfg.num_attention_heads as f64;
    let k = if dtype == DType::F32 {
        &FUSED
    } else {
        &COMPOSED
    };
    let k_layer = match train.trainable {
        Trainable::Lora => k.layer + k.lora,
        _ => k.layer,
    };
    let per_layer = k_layer * (d + f) + k.attention * heads * seq_len as f64;
    let k_logits = match train.objective {
        Objective::Lm => k.logits,
        Objective::Kl | Objective::KlLm => k.logits + k.teacher_logits,
    };
    let activations = ALLOCATOR_SLACK
        * tokens
        * (layers * per_layer * width + k_logits * cfg.vocab_size as f64 * 4.0);

    MemoryEstimate {
        weights,
        trained,
        optimizer,
        activations,
        base: BASE_BYTES,
    }
}

/// Memory the system can give this process now without swapping, bytes: `MemAvailable`
/// of `/proc/meminfo` (Linux), or `None` where it cannot be read.
pub fn available_memory() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024.0)
}

/// Checks that `estimate` fits in `available` bytes.
///
/// Errors: [`Error::InsufficientMemory`] with both numbers when it does not.
pub fn check_fits(estimate: &MemoryEstimate, available: f64) -> Result<()> {
    if estimate.total() > available {
        return Err(Error::InsufficientMemory {
            needed: estimate.total(),
            available,
            estimate: estimate.to_string(),
        });
    }
    Ok(())
}
