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
