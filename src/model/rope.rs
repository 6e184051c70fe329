//! Rotary position embeddings (Su et al. 2021, RoFormer), half-split (HF LLaMA) layout.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, D};

/// Precomputed cos/sin tables for every position of the model's context.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `(max_positions, head_dim / 2)` f32: `cos(p · θ^(-2i/head_dim))`.
    cos: Tensor,
    /// `(max_positions, head_dim / 2)` f32, as `cos` with `sin`.
    sin: Tensor,
    max_positions: usize,
}

/// The rotation of a particular token set: cos/sin gathered at its position ids.
#[derive(Debug, Clone)]
pub struct RopeAt {
    /// `(B, T, head_dim / 2)` in the model dtype: `cos(p · θ^(-2i/head_dim))`.
    pub cos: Tensor,
    /// `(B, T, head_dim / 2)` in the model dtype, as `cos` with `sin`.
    pub sin: Tensor,
}

impl RotaryEmbedding {
    /// Tables for `max_positions` positions, head width `head_dim` (even), base `theta`.
    ///
    /// Errors: [`Error::InvalidArgument`] for a zero or odd `head_dim`, no positions, or a
    /// non-positive `theta`.
    pub fn new(head_dim: usize, max_positions: usize, theta: f64, device: &Device) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) || max_positions == 0 || !(theta > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "RoPE needs an even head width, positions and θ > 0; got head width \
                 {head_dim}, {max_positions} positions, θ = {theta}"
            )));
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let pos = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let angles = pos.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
            max_positions,
        })
    }

    /// Number of positions the tables cover (the model's context).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Gathers cos/sin at `positions` (`(B, T)` u32, original positions) in `dtype`.
    ///
    /// Errors: [`Error::Candle`] if a position is outside the tables (callers check the
    /// context length first, see [`crate::model::Batch`]).
    pub fn at(&self, positions: &Tensor, dtype: DType) -> Result<RopeAt> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let gather = |table: &Tensor| -> Result<Tensor> {
            Ok(table
                .index_select(&flat, 0)?
                .reshape((b, t, ()))?
                .to_dtype(dtype)?)
        };
        if b * t == 0 {
            return Err(Error::InvalidArgument("empty token set".to_string()));
        }
        Ok(RopeAt {
            cos: gather(&self.cos)?,
            sin: gather(&self.sin)?,
        })
    }
}

impl RopeAt {
    /// Rotates `x` (`(B, H, T, head_dim)`): `x · cos + rotate_half(x) · sin`. Inference
    /// (no gradient tracked) runs candle's fused kernel, one pass; training runs our fused
    /// kernel with a backward where [`super::fused::has_kernel`] ([`super::fused::rope`])
    /// and the differentiable composition of the same formula elsewhere.
    ///
    /// Errors: when `x`'s batch, length or width differ from the tables',
    /// [`Error::InvalidArgument`] from the fused training kernel and [`Error::Candle`]
    /// from the other paths.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if !x.track_op() && !self.cos.track_op() && !self.sin.track_op() {
            return Ok(candle_nn::rotary_emb::rope(
                &x.contiguous()?,
                &self.cos,
                &self.sin,
            )?);
        }
        if super::fused::has_kernel(x) {
            return super::fused::rope(x, &self.cos, &self.sin);
        }
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let full = |half: &Tensor| -> Result<Tensor> {
            Ok(Tensor::cat(&[half, half], D::Minus1)?.unsqueeze(1)?)
        };
        Ok((x.broadcast_mul(&full(&self.cos)?)? + rotated.broadcast_mul(&full(&self.sin)?)?)?)
    }
}
