//! The SwiGLU feed-forward network of LLaMA (Shazeer 2020).

use super::linear::linear;
use crate::error::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// `down(silu(gate(x)) * up(x))`, no biases.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

impl Mlp {
    /// Loads `gate_proj` / `up_proj` `(ffn, d)` and `down_proj` `(d, ffn)` from `vb`
    /// (`model.layers.{i}.mlp`).
    pub fn load(vb: VarBuilder, hidden: usize, ffn: usize) -> Result<Self> {
        Ok(Self {
            gate_proj: vb.pp("gate_proj").get((ffn, hidden), "weight")?,
            up_proj: vb.pp("up_proj").get((ffn, hidden), "weight")?,
            down_proj: vb.pp("down_proj").get((hidden, ffn), "weight")?,
        })
    }

    /// `x`: `(B, T, d)` -> `(B, T, d)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = crate::model::ops::silu(&linear(x, &self.gate_proj)?)?;
        let up = linear(x, &self.up_proj)?;
        Ok(linear(&(gate * up)?, &self.down_proj)?)
    }
}
