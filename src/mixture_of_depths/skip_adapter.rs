//! The skip adapter of a routed layer: what a skipped token gets instead of nothing.
//!
//! MoD and MoDification pass a skipped token through unchanged, `x' = x`, but the layers
//! after it were trained on streams that every layer had updated. A rank-`r` bottleneck
//! on the layer's normalised input, `x' = x + U · silu(D · RMSNorm(x))`, trained with the
//! routers, gives the skipped tokens a cheap correction (the skipping path of FlexiDepth,
//! Luo et al. 2025, §3.1, which replaces a skipped layer by a lightweight adapter). It
//! does not copy the layer: the block's update is not linearly predictable from the
//! normalised input (session 8, SmolLM2-135M). It costs `4·d·r` FLOPs per skipped token
//! (`r = 16`, `d = 576`: 1% of the layer's). `U` starts at zero, so a fresh adapter is the
//! paper's identity.

use crate::error::Result;
use crate::model::linear::linear;
use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

/// The rank `convert` and the sweep's default recipe use. Measured on SmolLM2-135M
/// (session 8, README): at matched held-out compute it lowered the worst perplexity ratio
/// by 0.04-0.15 against no adapter, from 0.94 down to 0.85 of the dense compute.
pub const DEFAULT_RANK: usize = 16;

/// `U · silu(D · n)` for the normalised input `n`: `D` `(r, d)`, `U` `(d, r)`, f32.
///
/// Checkpoint names: `model.layers.{j}.skip_adapter.down.weight` `(r, d)` and
/// `model.layers.{j}.skip_adapter.up.weight` `(d, r)`.
#[derive(Debug, Clone)]
pub struct SkipAdapter {
    down: Tensor,
    up: Tensor,
}

impl SkipAdapter {
    /// Loads or creates the adapter of a layer from `vb` (`model.layers.{j}.skip_adapter`).
    /// New tensors (a `VarMap`-backed `vb`): `D` uniform in `±1/√d` (the caller reseeds it
    /// for a reproducible conversion), `U` zero.
    ///
    /// Errors: [`crate::Error::Candle`] if a stored tensor has another shape.
    pub fn load(vb: VarBuilder, hidden: usize, rank: usize) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        let down = vb.pp("down").get_with_hints_dtype(
            (rank, hidden),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
            DType::F32,
        )?;
        let up = vb.pp("up").get_with_hints_dtype(
            (hidden, rank),
            "weight",
            Init::Const(0.0),
            DType::F32,
        )?;
        Ok(Self { down, up })
    }

    /// The update `U · silu(D · n)` of every token: `normed` `(B, T, d)` (the layer's
    /// input RMSNorm output, any float dtype) -> `(B, T, d)` in `normed`'s dtype.
    ///
    /// Errors: [`crate::Error::Candle`] if `normed`'s last dimension is not `d`.
    pub fn update(&self, normed: &Tensor) -> Result<Tensor> {
        let dtype = normed.dtype();
        let n = normed.to_dtype(DType::F32)?;
        // The crate's projection product: the decode and short-prompt kernels, and the
        // weights' gradients when they are trained.
        let hidden = candle_nn::ops::silu(&linear(&n, &self.down)?)?;
        Ok(linear(&hidden, &self.up)?.to_dtype(dtype)?)
    }

    /// The down projection `D` `(r, d)` and the up projection `U` `(d, r)`, f32.
    pub fn tensors(&self) -> (&Tensor, &Tensor) {
        (&self.down, &self.up)
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// FLOPs of the adapter for `tokens` tokens: `4·d·r` each (two products; the norm and
    /// the activation are O(d) and left out, as [`crate::model::flops`] does).
    pub fn flops(&self, tokens: usize) -> f64 {
        4.0 * self.down.elem_count() as f64 * tokens as f64
    }
}
