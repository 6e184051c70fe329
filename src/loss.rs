//! Losses: next-token cross-entropy over real tokens.

use crate::error::Result;
use crate::model::ops::log_softmax_last_dim;
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
    let mut total = Tensor::zeros((), DType::F32, &candle_core::Device::Cpu)?;
    for s in stats {
        let over = if per_layer {
            s.kept_fraction() > target
        } else {
            mean_kept > target
        };
        if over {
            total = total.to_device(s.mean_gate.device())?.add(&s.mean_gate)?;
        }
    }
    Ok((total * alpha)?)
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
