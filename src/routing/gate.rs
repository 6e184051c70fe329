//! The router gate of one routed layer.

use crate::error::Result;
use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

/// `Linear(d, 1)` with bias followed by a sigmoid: `g_i = sigmoid(w · x_i + b)`
/// (MoDification, Eq. for the router; MoD's router without the sigmoid gives the logit).
///
/// Checkpoint names: `model.layers.{j}.router.weight` `(1, d)` and `.bias` `(1,)`, f32.
#[derive(Debug, Clone)]
pub struct Router {
    weight: Tensor,
    bias: Tensor,
}

impl Router {
    /// Loads or creates the router of a layer from `vb` (`model.layers.{j}.router`). When
    /// `vb` is backed by a `VarMap` and the tensors are new, the weight starts at zero and
    /// the bias at `init_bias`, so that the first decision is the bias alone.
    ///
    /// Errors: [`crate::Error::Candle`] if a stored tensor has another shape.
    pub fn load(vb: VarBuilder, hidden: usize, init_bias: f64) -> Result<Self> {
        let weight =
            vb.get_with_hints_dtype((1, hidden), "weight", Init::Const(0.0), DType::F32)?;
        let bias = vb.get_with_hints_dtype(1, "bias", Init::Const(init_bias), DType::F32)?;
        Ok(Self { weight, bias })
    }

    /// Builds a router from explicit tensors: `weight` `(1, d)`, `bias` `(1,)`, f32.
    ///
    /// Errors: [`crate::Error::ShapeMismatch`] for another shape;
    /// [`crate::Error::InvalidArgument`] for another dtype.
    pub fn from_tensors(weight: Tensor, bias: Tensor) -> Result<Self> {
        let d = weight.dims().last().copied().unwrap_or(0);
        for (name, t, want) in [
            ("weight", &weight, vec![1, d.max(1)]),
            ("bias", &bias, vec![1]),
        ] {
            if t.dims() != want.as_slice() {
                return Err(crate::Error::ShapeMismatch {
                    name: format!("router.{name}"),
                    expected: want,
                    found: t.dims().to_vec(),
                });
            }
            if t.dtype() != DType::F32 {
                return Err(crate::Error::InvalidArgument(format!(
                    "router {name} must be f32, got {:?}",
                    t.dtype()
                )));
            }
        }
        Ok(Self { weight, bias })
    }

    /// Router logits `w · x_i + b`: `x` `(B, T, d)` (any float dtype) -> `(B, T)` f32.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let logits = x.broadcast_matmul(&self.weight.t()?)?.squeeze(2)?;
        Ok(logits.broadcast_add(&self.bias)?)
    }

    /// Gate values `g = sigmoid(logits)`, `(B, T)` f32 in (0, 1). candle-nn's sigmoid op
    /// has the backward `g · (1 − g)`; one composed of `exp` and `recip` gives a NaN
    /// gradient (`0 · inf`) once a logit passes about −88.
    pub fn gates(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::sigmoid(logits)?)
    }

    /// The weight `(1, d)` and bias `(1,)`.
    pub fn tensors(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }
}
