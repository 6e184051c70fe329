//! AdamW with state that can be saved and restored (candle-nn's `AdamW` keeps its moments
//! private, so a checkpoint could not hold them), in f32 whatever the weights' dtype.

use crate::error::Result;
use crate::model::fused::values;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;

/// Parameters per parallel task of the in-place update.
const UPDATE_TASK: usize = 1 << 15;

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
    /// Whether [`AdamW::step`] updates this slot in place, in three fused passes: an f32
    /// var on the CPU with contiguous moments. (Composed, the update is a dozen passes
    /// over the parameter, each into a fresh buffer: over a second a step for the 135 M
    /// parameters of full-parameter training.)
    fn updates_in_place(&self) -> bool {
        let contiguous = |t: &Tensor| t.is_contiguous();
        self.master.is_none()
            && self.var.device().is_cpu()
            && self.var.dtype() == DType::F32
            && contiguous(self.var.as_tensor())
            && contiguous(&self.m)
            && contiguous(&self.v)
    }

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
                // Two buffers: the moments are updated in place.
                let zeros = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                let master = match var.dtype() {
                    DType::F32 => None,
                    _ => Some(var.as_tensor().to_dtype(DType::F32)?),
                };
                Ok(Slot {
                    name,
                    var,
                    lr,
                    m: zeros.copy()?,
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
    ///
    /// Errors: [`crate::Error::ShapeMismatch`] for a gradient of another shape than its var,
    /// before any var is updated.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr_scale: f64) -> Result<()> {
        // Checked first, for every var: the in-place kernels zip their operands, so a
        // gradient of another shape would update part of a parameter silently.
        for s in &self.slots {
            if let Some(g) = grads.get(&s.name).filter(|g| g.dims() != s.var.dims()) {
                return Err(crate::Error::ShapeMismatch {
                    name: format!("gradient of {}", s.name),
                    expected: s.var.dims().to_vec(),
                    found: g.dims().to_vec(),
                });
            }
        }
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
            if s.updates_in_place() {
                let g = g.contiguous()?;
                s.m.inplace_op2(
                    &g,
                    &Moment {
                        decay: p.beta1,
                        square: false,
                    },
                )?;
                s.v.inplace_op2(
                    &g,
                    &Moment {
                        decay: p.beta2,
                        square: true,
                    },
                )?;
                let update = Update {
                    lr,
                    bc1,
                    bc2,
                    eps: p.eps,
                    weight_decay: p.weight_decay,
                };
                s.var.as_tensor().inplace_op3(&s.m, &s.v, &update)?;
                continue;
            }
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
    /// Copies: later steps, which update the moments in place, do not change them.
    ///
    /// Errors: [`crate::Error::Candle`] when a copy cannot be allocated.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("{}.adam_m", s.name), s.m.copy()?);
            out.insert(format!("{}.adam_v", s.name), s.v.copy()?);
            if let Some(master) = &s.master {
                out.insert(format!("{}.master", s.name), master.clone());
            }
        }
        Ok(out)
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
                // A copy of its own: the moments are updated in place.
                Ok(Some(
                    t.to_device(s.var.device())?.to_dtype(DType::F32)?.copy()?,
                ))
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

/// The f32 values of the contiguous CPU tensor the in-place update writes.
fn f32_values_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("the in-place AdamW update takes contiguous f32 tensors"),
    }
}

/// A moment's update in place: `m ← decay·m + (1 − decay)·g` (`g²` with `square`).
struct Moment {
    decay: f64,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (m, g) = (f32_values_mut(s1, l1)?, values::<f32>(s2, l2)?);
        let (decay, rest) = (self.decay as f32, (1.0 - self.decay) as f32);
        (m.par_chunks_mut(UPDATE_TASK).zip(g.par_chunks(UPDATE_TASK))).for_each(|(m, g)| {
            for (m, &g) in m.iter_mut().zip(g) {
                let g = if self.square { g * g } else { g };
                *m = decay * *m + rest * g;
            }
        });
        Ok(())
    }
}

/// The parameter's update in place from its moments (`m`, `v`):
/// `θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε)`, `m̂ = m / bc1`, `v̂ = v / bc2`
/// (Loshchilov & Hutter 2019, algorithm 2).
struct Update {
    lr: f64,
    bc1: f64,
    bc2: f64,
    eps: f64,
    weight_decay: f64,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (theta, m, v) = (
            f32_values_mut(s1, l1)?,
            values::<f32>(s2, l2)?,
            values::<f32>(s3, l3)?,
        );
        let keep = (1.0 - self.lr * self.weight_decay) as f32;
        let (lr, eps) = (self.lr as f32, self.eps as f32);
        let (bc1, bc2) = (self.bc1 as f32, self.bc2 as f32);
        let tasks = theta
            .par_chunks_mut(UPDATE_TASK)
            .zip(m.par_chunks(UPDATE_TASK));
        (tasks.zip(v.par_chunks(UPDATE_TASK))).for_each(|((theta, m), v)| {
            for ((theta, &m), &v) in theta.iter_mut().zip(m).zip(v) {
                let step = (m / bc1) / ((v / bc2).sqrt() + eps);
                *theta = *theta * keep - lr * step;
            }
        });
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
        let state = opt.state()?;
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

    /// The fused in-place update against AdamW computed by hand in f64, over steps with
    /// changing gradients, weight decay and a learning-rate multiplier; a saved state is
    /// not changed by later steps.
    #[test]
    fn in_place_update_equals_adamw_computed_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let start = [0.5f32, -1.0, 2.0, 0.0, 3.0];
        let var = Var::from_tensor(&Tensor::new(&start, &dev)?)?;
        let params = AdamWParams {
            weight_decay: 0.1,
            ..AdamWParams::default()
        };
        let mut opt = AdamW::new(vec![("w".to_string(), var.clone(), 1e-2)], params)?;
        assert!(opt.slots[0].updates_in_place());
        let (mut w, mut m, mut v) = (start.map(f64::from), [0f64; 5], [0f64; 5]);
        let mut first_m = Vec::new();
        for step in 1..=3 {
            let g: Vec<f32> = (0..5)
                .map(|i| (i as f32 - 2.0) * step as f32 * 0.3)
                .collect();
            let grads = HashMap::from([("w".to_string(), Tensor::new(g.as_slice(), &dev)?)]);
            opt.step(&grads, 0.5)?;
            let lr = 1e-2 * 0.5;
            for i in 0..5 {
                let g = f64::from(g[i]);
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let m_hat = m[i] / (1.0 - 0.9f64.powi(step));
                let v_hat = v[i] / (1.0 - 0.999f64.powi(step));
                w[i] = w[i] * (1.0 - lr * 0.1) - lr * m_hat / (v_hat.sqrt() + 1e-8);
            }
            if step == 1 {
                first_m = opt.state()?["w.adam_m"].to_vec1::<f32>()?;
            }
            let got: Vec<f32> = var.as_tensor().to_vec1()?;
            for (got, want) in got.iter().zip(w) {
                assert!(
                    (f64::from(*got) - want).abs() < 1e-6,
                    "step {step}: {got} vs {want}"
                );
            }
        }
        let want_first: Vec<f32> = (0..5).map(|i| 0.1 * (i as f32 - 2.0) * 0.3).collect();
        for (got, want) in first_m.iter().zip(want_first) {
            assert!((got - want).abs() < 1e-7, "saved moment {got} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn a_gradient_of_another_shape_is_refused_before_any_update() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::ones(3, DType::F32, &dev)?)?;
        let b = Var::from_tensor(&Tensor::ones(4, DType::F32, &dev)?)?;
        let vars = vec![("a".to_string(), a.clone(), 0.1), ("b".to_string(), b, 0.1)];
        let mut opt = AdamW::new(vars, AdamWParams::default())?;
        let grads = HashMap::from([
            ("a".to_string(), Tensor::ones(3, DType::F32, &dev)?),
            ("b".to_string(), Tensor::ones(2, DType::F32, &dev)?),
        ]);
        let err = opt.step(&grads, 1.0).unwrap_err();
        assert!(matches!(err, crate::Error::ShapeMismatch { .. }), "{err:?}");
        assert_eq!(a.as_tensor().to_vec1::<f32>()?, vec![1.0; 3]);
        assert_eq!(opt.steps_taken(), 0);
        Ok(())
    }
}
