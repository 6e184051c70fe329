//! The SwiGLU feed-forward network of LLaMA (Shazeer 2020).

use crate::error::Result;
use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};

/// `down(silu(gate(x)) * up(x))`, no biases.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// Loads `gate_proj` / `up_proj` `(ffn, d)` and `down_proj` `(d, ffn)` from `vb`
    /// (`model.layers.{i}.mlp`).
    pub fn load(vb: VarBuilder, hidden: usize, ffn: usize) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::new(vb.pp("gate_proj").get((ffn, hidden), "weight")?, None),
            up_proj: Linear::new(vb.pp("up_proj").get((ffn, hidden), "weight")?, None),
            down_proj: Linear::new(vb.pp("down_proj").get((hidden, ffn), "weight")?, None),
        })
    }

    /// `x`: `(B, T, d)` -> `(B, T, d)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = crate::model::ops::silu(&self.gate_proj.forward(x)?)?;
        let up = self.up_proj.forward(x)?;
        Ok(self.down_proj.forward(&(gate * up)?)?)
    }
}
