//! The SwiGLU feed-forward network of LLaMA (Shazeer 2020).

use super::linear::Projection;
use crate::error::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// `down(silu(gate(x)) * up(x))`, no biases.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
}

impl Mlp {
    /// Loads `gate_proj` / `up_proj` `(ffn, d)` and `down_proj` `(d, ffn)` from `vb`
    /// (`model.layers.{i}.mlp`).
    pub fn load(vb: VarBuilder, hidden: usize, ffn: usize) -> Result<Self> {
        Ok(Self {
            gate_proj: Projection::load(vb.pp("gate_proj"), ffn, hidden)?,
            up_proj: Projection::load(vb.pp("up_proj"), ffn, hidden)?,
            down_proj: Projection::load(vb.pp("down_proj"), hidden, ffn)?,
        })
    }

    /// The projections by their HF names (`gate_proj`, `up_proj`, `down_proj`).
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Projection); 3] {
        [
            ("gate_proj", &mut self.gate_proj),
            ("up_proj", &mut self.up_proj),
            ("down_proj", &mut self.down_proj),
        ]
    }

    /// The projections by their HF names, read-only.
    pub fn projections(&self) -> [(&'static str, &Projection); 3] {
        [
            ("gate_proj", &self.gate_proj),
            ("up_proj", &self.up_proj),
            ("down_proj", &self.down_proj),
        ]
    }

    /// `x`: `(B, T, d)` -> `(B, T, d)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&super::ops::swiglu(&gate, &up)?)
    }
}
