//! Losses: next-token cross-entropy over real tokens.

use crate::error::Result;
use crate::model::fused::runs_fused;
use crate::model::ops::log_softmax_last_dim;
use crate::model::token_losses::token_losses;
use crate::model::DECODE_ROWS;
use candle_core::{DType, Tensor, D};

/// Next-token negative log-likelihood, summed and counted over real tokens.
///
/// `logits`: `(B, T, V)`; `ids`: `(B, T)` u32; `valid`: `(B, T)` u8. Position t predicts
/// `ids[t + 1]`; a pair counts when both tokens are real. Returns `(sum of NLL (scalar f32
/// tensor, differentiable), number of predicted tokens)`.
pub fn next_token_nll(logits: &Tensor, ids: &Tensor, valid: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        return Ok((Tensor::zeros((), DType::F32, logits.device())?, 0));
    }
    let logp = log_softmax_last_dim(&logits.narrow(1, 0, t - 1)?)?;
    let targets = ids.narrow(1, 1, t - 1)?.contiguous()?;
    let picked = logp
        .reshape((b * (t - 1), v))?
        .gather(&targets.reshape((b * (t - 1), 1))?, D::Minus1)?
        .reshape((b, t - 1))?;
    let weight = (valid.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?
        * valid.narrow(1, 1, t - 1)?.to_dtype(DType::F32)?)?;
    let count = weight.sum_all()?.to_scalar::<f32>()? as usize;
    let nll = (picked * &weight)?.sum_all()?.neg()?;
    Ok((nll, count))
}

/// Mean next-token cross-entropy over real tokens (the LM loss), a differentiable scalar
/// f32 tensor. Arguments as [`next_token_nll`]; 0 when nothing is predicted.
pub fn lm_loss(logits: &Tensor, ids: &Tensor, valid: &Tensor) -> Result<Tensor> {
    let (sum, count) = next_token_nll(logits, ids, valid)?;
    Ok((sum / count.max(1) as f64)?)
}

/// Self-distillation: the mean per-token `KL(teacher ‖ student)` over the vocabulary,
/// `Σ_v p_t(v) · (log p_t(v) − log p_s(v))`, averaged over real tokens (padding excluded).
///
/// `student`, `teacher`: logits `(B, T, V)` (any float dtype; computed in f32). The teacher
/// is treated as a constant (detached). `valid`: `(B, T)` u8. Returns a differentiable
/// scalar f32 tensor, 0 when the two distributions agree (to rounding) or nothing is valid.
///
/// Errors: [`crate::Error::InvalidArgument`] when the shapes differ; [`crate::Error::Candle`]
/// for logits that are not 3-D.
pub fn distillation_kl(student: &Tensor, teacher: &Tensor, valid: &Tensor) -> Result<Tensor> {
    student.dims3()?;
    if student.dims() != teacher.dims() {
        return Err(crate::Error::InvalidArgument(format!(
            "student logits {:?} and teacher logits {:?} differ in shape",
            student.dims(),
            teacher.dims()
        )));
    }
    let log_t = log_softmax_last_dim(&teacher.detach())?;
    let per_token = per_token_kl(&log_t, &log_softmax_last_dim(student)?)?; // (B, T)
    let weight = valid.to_dtype(DType::F32)?;
    let count = weight.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    Ok(((per_token * weight)?.sum_all()? / count)?)
}

/// `Σ_v p_t(v) · (log p_t(v) − log p_s(v))` over the last dimension, from log-probabilities
/// `(..., V)` f32: one KL value per token.
fn per_token_kl(log_t: &Tensor, log_s: &Tensor) -> Result<Tensor> {
    Ok((log_t.exp()? * (log_t - log_s)?)?.sum(D::Minus1)?)
}

/// Summed objective terms of one batch, from [`chunked_objective`].
#[derive(Debug, Clone)]
pub struct ObjectiveTerms {
    /// Summed next-token NLL over predicted real tokens (scalar f32, differentiable).
    pub nll_sum: Tensor,
    /// Number of predicted real tokens (a position and its successor both real).
    pub nll_count: usize,
    /// Summed per-token `KL(teacher ‖ student)` over real tokens, when a teacher is given.
    pub kl_sum: Option<Tensor>,
    /// Number of real tokens.
    pub kl_count: usize,
}

impl ObjectiveTerms {
    /// Mean next-token cross-entropy (the LM loss), scalar f32.
    pub fn lm_loss(&self) -> Result<Tensor> {
        Ok((&self.nll_sum / self.nll_count.max(1) as f64)?)
    }

    /// Mean per-token KL to the teacher, scalar f32 (`None` without a teacher).
    pub fn kl_loss(&self) -> Result<Option<Tensor>> {
        match &self.kl_sum {
            Some(k) => Ok(Some((k / self.kl_count.max(1) as f64)?)),
            None => Ok(None),
        }
    }
}

/// Tokens per vocabulary chunk. On the CPU, logits of one chunk stay under 64 MiB of f32
/// (341 tokens of a 49 k vocabulary): a whole `(B, T, vocab)` tensor, mapped fresh from the
/// OS page by page, was a third of a training step when the losses were composed ops, and
/// each chunk costs a product with the whole `lm_head`, whose weight gradient (113 MB for
/// SmolLM2's tied embedding) candle allocates and adds into the running sum once per chunk.
/// Against 24 MiB chunks (128 tokens), measured alternating in session 11 (`bench_train`,
/// 4 × 256): full-parameter 146-154 → 173-178 tok/s, router-only 261-268 → 282-285, at
/// 0.02-0.1 GB more peak memory. A GPU pays a kernel launch per op and chunk instead
/// (128-token chunks made a 16 × 1024-token step 128 chunks of several dozen launches):
/// its chunks hold up to 2²⁸ logits (1 GiB of f32; with a teacher and candle's composed
/// losses, several such tensors live until the backward, a few GiB).
fn chunk_tokens(vocab: usize, device: &candle_core::Device) -> usize {
    let budget = match device {
        candle_core::Device::Cpu => (64 << 20) / 4,
        _ => 1 << 28,
    };
    (budget / vocab.max(1)).max(1)
}

/// The LM loss and the distillation KL computed from final hidden states over chunks of
/// tokens, so that no `(B, T, vocab)` logits tensor exists at once: values equal
/// [`next_token_nll`] and [`distillation_kl`] on the full logits.
///
/// `student`: the model whose final norm and `lm_head` turn `hidden` `(B, T, d)` into
/// logits. `teacher`: the original model and its final hidden states `(B, T, d)`
/// (detached). `ids` `(B, T)` u32, `valid` `(B, T)` u8 as in [`next_token_nll`].
///
/// Errors: [`crate::Error::InvalidArgument`] when the teacher's hidden states have another
/// shape; [`crate::Error::Candle`] on tensor failures.
pub fn chunked_objective(
    student: &crate::model::Llama,
    hidden: &Tensor,
    teacher: Option<(&crate::model::Llama, &Tensor)>,
    ids: &Tensor,
    valid: &Tensor,
) -> Result<ObjectiveTerms> {
    let (b, t, d) = hidden.dims3()?;
    let n = b * t;
    let device = hidden.device();
    let ids_v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    let valid_v: Vec<f32> = valid.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    // Position (b, t) predicts ids[b, t + 1]; the last position of a row predicts nothing.
    let mut targets = vec![0u32; n];
    let mut nll_weight = vec![0f32; n];
    for row in 0..b {
        for col in 0..t.saturating_sub(1) {
            let i = row * t + col;
            targets[i] = ids_v[i + 1];
            nll_weight[i] = valid_v[i] * valid_v[i + 1];
        }
    }
    let h = hidden.reshape((n, d))?;
    let teacher = match teacher {
        Some((model, th)) => {
            if th.dims() != hidden.dims() {
                return Err(crate::Error::InvalidArgument(format!(
                    "teacher hidden states {:?} and student hidden states {:?} differ in shape",
                    th.dims(),
                    hidden.dims()
                )));
            }
            Some((model, th.detach().reshape((n, d))?))
        }
        None => None,
    };
    let chunk = chunk_tokens(student.config().vocab_size, device);
    let mut nll_sum = Tensor::zeros((), DType::F32, device)?;
    let mut kl_sum = Tensor::zeros((), DType::F32, device)?;
    // A chunk of at most DECODE_ROWS rows would take the decode path's `lm_head` (quantized
    // blocks, where a quantized model has them) while the others take the dense weight: a
    // short tail joins the chunk before it.
    let mut starts: Vec<usize> = (0..n).step_by(chunk).collect();
    if starts.len() > 1 && starts.last().is_some_and(|&s| n - s <= DECODE_ROWS) {
        starts.pop();
    }
    for (i, &start) in starts.iter().enumerate() {
        let len = starts.get(i + 1).copied().unwrap_or(n) - start;
        let logits_s = student.logits(&h.narrow(0, start, len)?)?;
        let logits_t = match &teacher {
            Some((model, th)) => Some(model.logits(&th.narrow(0, start, len)?)?),
            None => None,
        };
        let w_nll = Tensor::from_slice(&nll_weight[start..start + len], len, device)?;
        let targets = &targets[start..start + len];
        let (nll, kl) = if runs_fused(&logits_s) {
            // One fused pass per row instead of a dozen composed ones (see token_losses).
            let per = token_losses(&logits_s, logits_t.as_ref(), targets)?;
            let kl = match logits_t {
                Some(_) => Some(per.narrow(1, 1, 1)?.squeeze(1)?),
                None => None,
            };
            (per.narrow(1, 0, 1)?.squeeze(1)?, kl)
        } else {
            let log_s = log_softmax_last_dim(&logits_s)?;
            let tg = Tensor::from_slice(targets, (len, 1), device)?;
            let nll = log_s.gather(&tg, 1)?.squeeze(1)?.neg()?;
            let kl = match &logits_t {
                Some(t) => Some(per_token_kl(&log_softmax_last_dim(t)?, &log_s)?),
                None => None,
            };
            (nll, kl)
        };
        nll_sum = (nll_sum + (nll * w_nll)?.sum_all()?)?;
        if let Some(kl) = kl {
            let w_kl = Tensor::from_slice(&valid_v[start..start + len], len, device)?;
            kl_sum = (kl_sum + (kl * w_kl)?.sum_all()?)?;
        }
    }
    Ok(ObjectiveTerms {
        nll_sum,
        nll_count: nll_weight.iter().filter(|&&w| w > 0.0).count(),
        kl_count: valid_v.iter().filter(|&&w| w > 0.0).count(),
        kl_sum: teacher.map(|_| kl_sum),
    })
}

/// Compute-budget variant of the load-reducing objective: `α · [C > target] · Σ_j G_j`,
/// where C is the measured compute fraction of the pass (whole model, inference-equivalent
/// FLOPs). One budget for all routed layers: every gate is pushed down while the model
/// spends more than `target` of the dense FLOPs, and the LM or distillation gradient decides
/// in which layers the skips go (threshold-p spends them where they are cheap).
/// Returns a scalar f32 tensor (0 without routed layers or under budget).
///
/// Errors: [`crate::Error::Candle`] on a tensor failure.
pub fn compute_budget_loss(
    stats: &[crate::routing::RoutingStats],
    alpha: f64,
    compute_fraction: f64,
    target: f64,
) -> Result<Tensor> {
    pushed_gates(stats, alpha, |_| compute_fraction > target)
}

/// `α · Σ_j G_j` over the routed layers that `push` selects (a scalar f32 tensor, 0 when
/// none is selected): the shared form of the target variants of the load-reducing term.
fn pushed_gates(
    stats: &[crate::routing::RoutingStats],
    alpha: f64,
    push: impl Fn(&crate::routing::RoutingStats) -> bool,
) -> Result<Tensor> {
    let mut total = Tensor::zeros((), DType::F32, &candle_core::Device::Cpu)?;
    for s in stats.iter().filter(|s| push(s)) {
        total = total.to_device(s.mean_gate.device())?.add(&s.mean_gate)?;
    }
    Ok((total * alpha)?)
}

/// MoDification's layer load-reducing objective, `α · Σ_j F_j · G_j` over the routed layers:
/// F_j, the kept fraction, is a constant (no gradient); G_j, the mean gate over valid
/// tokens, carries the gradient, so a layer that keeps many tokens pushes its gates down
/// hardest. Returns a scalar f32 tensor (0 without routed layers).
pub fn load_reducing_loss(stats: &[crate::routing::RoutingStats], alpha: f64) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for s in stats {
        let term = (&s.mean_gate * s.kept_fraction())?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    match total {
        Some(t) => Ok((t * alpha)?),
        // No routed layer: nothing to reduce (a CPU zero; callers skip adding it).
        None => Ok(Tensor::zeros((), DType::F32, &candle_core::Device::Cpu)?),
    }
}

/// The load-reducing objective with a target kept fraction: `α · Σ_j [F_j > target] · G_j`
/// pushes a layer's gates down only while it keeps more than `target` of its tokens (a
/// control of the operating point that does not depend on tuning α). With
/// `per_layer = false` the indicator is on the mean kept fraction over routed layers
/// instead, which leaves threshold-p free to skip where skipping is cheap.
pub fn target_load_loss(
    stats: &[crate::routing::RoutingStats],
    alpha: f64,
    target: f64,
    per_layer: bool,
) -> Result<Tensor> {
    let mean_kept =
        stats.iter().map(|s| s.kept_fraction()).sum::<f64>() / stats.len().max(1) as f64;
    pushed_gates(stats, alpha, |s| {
        if per_layer {
            s.kept_fraction() > target
        } else {
            mean_kept > target
        }
    })
}

/// The MoD auxiliary predictor loss (Raposo et al. 2024, §3.5) for top-k routers: binary
/// cross-entropy between `sigmoid(router logit)` and top-k membership, averaged over valid
/// tokens and routed layers, so that `sigmoid(logit) > 0.5` predicts membership causally at
/// decode time. `valid`: `(B, T)` u8. Scalar f32 tensor.
pub fn topk_predictor_loss(
    stats: &[crate::routing::RoutingStats],
    valid: &Tensor,
) -> Result<Tensor> {
    let valid = valid.to_dtype(DType::F32)?;
    let n = valid.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    let mut total = Tensor::zeros((), DType::F32, valid.device())?;
    for s in stats {
        // BCE with logits, stable form: max(z, 0) - z·y + log(1 + exp(-|z|)).
        let z = &s.logits;
        let y = &s.kept_mask;
        let bce = ((z.relu()? - (z * y)?)? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        total = (total + ((bce * &valid)?.sum_all()? / n)?)?;
    }
    Ok((total / stats.len().max(1) as f64)?)
}
