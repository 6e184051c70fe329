//! AdamW with state that can be saved and restored (candle-nn's `AdamW` keeps its moments
//! private, so a checkpoint could not hold them), in f32 whatever the weights' dtype.

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

/// One trainable tensor with its base learning rate, its f32 moments and, for a var that is
/// not f32, its f32 master copy.
struct Slot {
    name: String,
    var: Var,
    lr: f64,
    m: Tensor,
    v: Tensor,
    master: Option<Tensor>,
}

impl Slot {
    /// The parameter in f32: the master copy, or the var itself.
    fn param(&self) -> Result<Tensor> {
        Ok(match &self.master {
            Some(master) => master.clone(),
            None => self.var.as_tensor().to_dtype(DType::F32)?,
        })
    }
}

/// AdamW over named [`Var`]s, each with its own base learning rate (routers and base
/// weights train at different rates).
///
/// Moments are f32 and a var of another dtype (bf16, f16) is updated through an f32 master
/// copy that it is rounded from after each step (mixed-precision training as in
/// Micikevicius et al. 2018): updates far below a bf16 weight's resolution still
/// accumulate.
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
                let zeros = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                let master = match var.dtype() {
                    DType::F32 => None,
                    _ => Some(var.as_tensor().to_dtype(DType::F32)?),
                };
                Ok(Slot {
                    name,
                    var,
                    lr,
                    m: zeros.clone(),
                    v: zeros,
                    master,
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
            let g = g.to_dtype(DType::F32)?;
            s.m = ((&s.m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            s.v = ((&s.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&s.m / bc1)?;
            let v_hat = (&s.v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let decayed = (s.param()? * (1.0 - lr * p.weight_decay))?;
            let updated = (decayed - (update * lr)?)?;
            s.var.set(&updated.to_dtype(s.var.dtype())?)?;
            if s.master.is_some() {
                s.master = Some(updated);
            }
        }
        Ok(())
    }

    /// The moments as named f32 tensors (`{name}.adam_m`, `{name}.adam_v`) for a
    /// checkpoint, and the f32 master copies of vars that are not f32 (`{name}.master`).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("{}.adam_m", s.name), s.m.clone());
            out.insert(format!("{}.adam_v", s.name), s.v.clone());
            if let Some(master) = &s.master {
                out.insert(format!("{}.master", s.name), master.clone());
            }
        }
        out
    }

    /// Restores moments (and master copies) saved by [`state`](Self::state) and the update
    /// count. A master copy absent from `state` (a state saved by an f32 run) is taken from
    /// the var.
    ///
    /// Errors: [`crate::Error::MissingTensor`] for a moment that is not in `state`;
    /// [`crate::Error::ShapeMismatch`] for one of another shape.
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        steps_taken: usize,
    ) -> Result<()> {
        // Read and check every moment before replacing any.
        let mut moments = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let read = |suffix: &str| -> Result<Option<Tensor>> {
                let name = format!("{}.{suffix}", s.name);
                let Some(t) = state.get(&name) else {
                    return Ok(None);
                };
                if t.dims() != s.var.dims() {
                    return Err(crate::Error::ShapeMismatch {
                        name,
                        expected: s.var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                Ok(Some(t.to_device(s.var.device())?.to_dtype(DType::F32)?))
            };
            let required = |suffix: &str| -> Result<Tensor> {
                read(suffix)?.ok_or_else(|| crate::Error::MissingTensor {
                    name: format!("{}.{suffix}", s.name),
                })
            };
            let master = match &s.master {
                None => None,
                Some(_) => Some(match read("master")? {
                    Some(master) => master,
                    None => s.var.as_tensor().to_dtype(DType::F32)?,
                }),
            };
            moments.push((required("adam_m")?, required("adam_v")?, master));
        }
        for (s, (m, v, master)) in self.slots.iter_mut().zip(moments) {
            (s.m, s.v, s.master) = (m, v, master);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// With a constant gradient, Adam's bias-corrected step is lr (|m̂| / √v̂ = 1): after n
    /// steps the weight has moved by n·lr. A bf16 weight near 1 cannot hold a 1e-4 step
    /// (its resolution there is 2⁻⁸), so without an f32 master copy it would never move.
    #[test]
    fn bf16_weights_accumulate_small_steps_through_an_f32_master() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::ones(4, DType::BF16, &dev)?)?;
        let mut opt = AdamW::new(
            vec![("w".to_string(), var.clone(), 1e-4)],
            AdamWParams::default(),
        )?;
        let grads = HashMap::from([("w".to_string(), Tensor::ones(4, DType::BF16, &dev)?)]);
        for _ in 0..100 {
            opt.step(&grads, 1.0)?;
        }
        let state = opt.state();
        assert_eq!(state["w.adam_m"].dtype(), DType::F32);
        assert_eq!(state["w.adam_v"].dtype(), DType::F32);
        let master: Vec<f32> = state["w.master"].to_vec1()?;
        for m in master {
            assert!(
                (m - 0.99).abs() < 1e-5,
                "master {m}, expected 1 - 100 * 1e-4"
            );
        }
        let w: Vec<f32> = var.as_tensor().to_dtype(DType::F32)?.to_vec1()?;
        // bf16's nearest value to 0.99.
        assert_eq!(w, vec![0.98828125; 4]);
        Ok(())
    }
}
