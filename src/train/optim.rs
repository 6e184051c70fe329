//! AdamW with state that can be saved and restored (candle-nn's `AdamW` keeps its moments
//! private, so a checkpoint could not hold them).

use crate::error::Result;
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

/// Hyper-parameters of [`AdamW`] (Loshchilov & Hutter 2019).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One trainable tensor with its base learning rate and moments.
struct Slot {
    name: String,
    var: Var,
    lr: f64,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named [`Var`]s, each with its own base learning rate (routers and base
/// weights train at different rates).
pub struct AdamW {
    slots: Vec<Slot>,
    params: AdamWParams,
    step: usize,
}

impl AdamW {
    /// An optimizer over `(name, var, base lr)` triples with zero moments.
    pub fn new(vars: Vec<(String, Var, f64)>, params: AdamWParams) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var, lr)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    name,
                    var,
                    lr,
                    m: zeros.clone(),
                    v: zeros,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            params,
            step: 0,
        })
    }

    /// The parameters being trained.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// Number of updates applied so far.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// Applies one update with gradients `grads` (by var name; a var without a gradient is
    /// left unchanged) and learning-rate multiplier `lr_scale`.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr_scale: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.step as i32);
        let bc2 = 1.0 - p.beta2.powi(self.step as i32);
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.name) else {
                continue;
            };
            let lr = s.lr * lr_scale;
            s.m = ((&s.m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            s.v = ((&s.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&s.m / bc1)?;
            let v_hat = (&s.v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let decayed = (s.var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            s.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`{name}.adam_m`, `{name}.adam_v`) for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("{}.adam_m", s.name), s.m.clone());
            out.insert(format!("{}.adam_v", s.name), s.v.clone());
        }
        out
    }

    /// Restores moments saved by [`state`](Self::state) and the update count.
    ///
    /// Errors: [`crate::Error::MissingTensor`] for a moment that is not in `state`.
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        steps_taken: usize,
    ) -> Result<()> {
        // Read and check every moment before replacing any.
        let mut moments = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let read = |suffix: &str| -> Result<Tensor> {
                let name = format!("{}.{suffix}", s.name);
                let t = state
                    .get(&name)
                    .ok_or_else(|| crate::Error::MissingTensor { name: name.clone() })?;
                if t.dims() != s.var.dims() {
                    return Err(crate::Error::ShapeMismatch {
                        name,
                        expected: s.var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                Ok(t.to_device(s.var.device())?.to_dtype(s.var.dtype())?)
            };
            moments.push((read("adam_m")?, read("adam_v")?));
        }
        for (s, (m, v)) in self.slots.iter_mut().zip(moments) {
            (s.m, s.v) = (m, v);
        }
        self.step = steps_taken;
        Ok(())
    }
}

/// The global L2 norm of `grads` (in f64), after which, with `clip` given and the norm
/// above it, every gradient is scaled by `clip / norm` (Pascanu et al. 2013). A non-finite
/// norm is returned as it is and nothing is scaled.
///
/// Errors: [`crate::Error::Candle`] on a tensor failure.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, clip: Option<f64>) -> Result<f64> {
    let mut sq = 0.0;
    for g in grads.values() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if let Some(clip) = clip.filter(|&c| norm.is_finite() && norm > c) {
        for g in grads.values_mut() {
            *g = (&*g * (clip / norm))?;
        }
    }
    Ok(norm)
}
