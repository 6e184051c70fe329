//! Differentiable building blocks with fused fast paths.
//!
//! candle 0.11's fused `rms_norm` and `softmax_last_dim` record no backward pass, so a
//! model trained through them silently gets no gradient. Each function here uses candle's
//! fused kernel when no operand tracks gradients (inference); in training, our fused
//! kernels with a backward ([`super::fused`]: f32 on the CPU, f32 and bf16 on a CUDA GPU),
//! and elsewhere a version composed of primitive tensor ops, each of which has a backward.

use super::fused::{self, has_kernel};
use crate::error::Result;
use candle_core::{DType, Tensor, D};

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`, computed in f32
/// for f16/bf16 inputs (Zhang & Sennrich 2019, eq. 4).
///
/// `x`: `(..., d)`; `weight`: `(d,)`. Returns the shape and dtype of `x`.
///
/// Errors: when `weight` is not `(d,)` or `d` is 0, [`crate::Error::InvalidArgument`] from
/// the fused training kernel and [`crate::Error::Candle`] from the other paths.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if x.track_op() || weight.track_op() {
        if has_kernel(x) {
            return fused::rms_norm(x, weight, eps);
        }
        Ok(candle_nn::ops::rms_norm_slow(x, weight, eps as f32)?)
    } else {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            weight,
            eps as f32,
        )?)
    }
}

/// Softmax over the last dimension, max-subtracted for stability. Shape and dtype of `x`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
    }
}

/// Log-softmax over the last dimension, computed in f32. `x`: `(..., V)` -> `(..., V)` f32.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &x.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}

/// SwiGLU's gating, `silu(gate) ⊙ up` with `silu(a) = a · σ(a)` (Shazeer 2020, "GLU
/// Variants Improve Transformer", FFN_SwiGLU):
/// one fused pass (with a backward) where [`has_kernel`], candle's composed ops elsewhere.
///
/// `gate`, `up`: the same shape and dtype. Returns that shape.
///
/// Errors: [`crate::Error::InvalidArgument`] / [`crate::Error::Candle`] when the shapes
/// differ.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if has_kernel(gate) {
        return fused::swiglu(gate, up);
    }
    Ok((candle_nn::ops::silu(gate)? * up)?)
}
