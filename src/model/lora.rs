//! Low-rank adapters (LoRA, Hu et al. 2021, Eq. 3) on the frozen projections of a layer:
//! `y = x·Wᵀ + (α / r) · (x·Aᵀ)·Bᵀ`, with `A` `(r, in)` and `B` `(out, r)`.
//!
//! A conversion that heals its base model trains only `A` and `B` (plus the routers) and
//! merges `W + (α / r)·B·A` into the weights when it saves, so a converted model stays a
//! plain HF layout plus router tensors.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Rank and scale of the adapters. Adapters go on every projection of every layer
/// (q, k, v, o, gate, up, down).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank r of every adapter, in `1..=hidden_size`.
    pub rank: usize,
    /// Scale numerator α: the adapter's output is multiplied by `α / r` (default 2r).
    pub alpha: f64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
        }
    }
}

impl LoraConfig {
    /// The factor `α / r` applied to the adapter's output.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks the rank against a model of hidden size `hidden`.
    ///
    /// Errors: [`Error::InvalidArgument`] for rank 0, a rank above `hidden`, or an α that
    /// is not finite and positive.
    pub fn validate(&self, hidden: usize) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::InvalidArgument(
                "LoRA rank 0 is invalid: the rank must be at least 1".to_string(),
            ));
        }
        if self.rank > hidden {
            return Err(Error::InvalidArgument(format!(
                "LoRA rank {} is above the hidden size {hidden}",
                self.rank
            )));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "LoRA alpha {} must be finite and positive",
                self.alpha
            )));
        }
        Ok(())
    }
}

/// One adapter pair of a projection `(out, in)`.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `A` `(r, in)`, f32. Starts uniform in ±1/√in (Kaiming, as PEFT).
    pub a: Tensor,
    /// `B` `(out, r)`, f32. Starts at zero, so a fresh adapter changes nothing.
    pub b: Tensor,
    /// `α / r`.
    pub scale: f64,
}

impl Adapter {
    /// Loads or creates the adapter of a projection from `vb` (`...q_proj`): tensors
    /// `lora_a` `(r, in)` and `lora_b` `(out, r)`, f32. New tensors start at zero; see
    /// [`seeded_lora_a`] for the starting value of `A` that makes them trainable.
    ///
    /// Errors: [`crate::Error::Candle`] when a stored tensor has another shape.
    pub fn load(vb: VarBuilder, out: usize, inp: usize, cfg: &LoraConfig) -> Result<Self> {
        let r = cfg.rank;
        Ok(Self {
            a: vb.get_with_hints_dtype((r, inp), "lora_a", Init::Const(0.0), DType::F32)?,
            b: vb.get_with_hints_dtype((out, r), "lora_b", Init::Const(0.0), DType::F32)?,
            scale: cfg.scale(),
        })
    }

    /// The adapter's output `(α / r) · (x·Aᵀ)·Bᵀ`: `x` `(n, in)` -> `(n, out)` in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        // The scale multiplies the `(n, r)` activations, not the `(n, out)` output: r values
        // a row instead of `out`, forward and backward. The products stay f32 whatever the
        // matmul precision (candle's matmul, not `linear`).
        let low = (x.matmul(&self.a.t()?)? * self.scale)?;
        Ok(low.matmul(&self.b.t()?)?.to_dtype(dtype)?)
    }

    /// `weight + (α / r)·B·A` in the weight's dtype: the adapter merged into the weight
    /// `(out, in)` it adapts.
    pub fn merge_into(&self, weight: &Tensor) -> Result<Tensor> {
        let delta = (self.b.matmul(&self.a)? * self.scale)?;
        Ok((weight.to_dtype(DType::F32)? + delta)?.to_dtype(weight.dtype())?)
    }
}

/// A deterministic starting value for `A` `(r, in)`: uniform in ±1/√in, from a generator
/// seeded by `seed` and the tensor's `name`, so that a conversion is a pure function of its
/// seed.
pub fn seeded_lora_a(shape: (usize, usize), seed: u64, name: &str) -> Result<Tensor> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for byte in name.bytes() {
        h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = StdRng::seed_from_u64(h);
    let bound = 1.0 / (shape.1 as f32).sqrt();
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(Tensor::from_vec(data, shape, &candle_core::Device::Cpu)?)
}
