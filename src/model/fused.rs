//! Fused CPU kernels, each with a backward, for the element-wise parts of a LLaMA layer:
//! RMSNorm, SwiGLU and RoPE.
//!
//! With gradients tracked, candle 0.11 composes these from primitive ops: an RMSNorm is
//! six passes over its input forward and about twice as many backward, each into a fresh
//! allocation, and autograd keeps every intermediate until the backward runs. Each kernel
//! here is one pass forward and one backward and keeps only its inputs. They take
//! contiguous CPU tensors of f32 (what the model runs) or f64 (what the finite-difference
//! tests check); [`super::ops`] chooses them for f32 CPU tensors and keeps the composed
//! ops elsewhere, so an f64 model is the composed reference.

use super::vector_math;
use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Rows (of `d` values) per parallel task, so that a task is worth handing to a thread.
const ROWS_PER_TASK: usize = 16;
/// Elements per parallel task of the purely element-wise SwiGLU.
const ELEMENTS_PER_TASK: usize = 1 << 14;

/// Whether the model's fused CPU kernels (this module's, [`super::prefix_attention`] and
/// [`super::token_losses`]) run for activations like `x`: f32 on the CPU, in inference
/// and in training (every kernel has a backward). Elsewhere candle's composed ops run.
pub fn runs_fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// RMSNorm over the last dimension, `x / sqrt(mean(x²) + eps) · weight` (Zhang & Sennrich
/// 2019, eq. 4), with a backward for `x` and, when it tracks gradients, `weight`.
///
/// `x`: `(..., d)`; `weight`: `(d,)`; both f32 or both f64, on the CPU. Returns the shape
/// and dtype of `x`.
///
/// Errors: [`Error::InvalidArgument`] when `weight` is not `(d,)`, `d` is 0, or the dtypes
/// differ; [`Error::Candle`] for another dtype or device.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    if d == 0 || weight.dims() != [d] || weight.dtype() != x.dtype() {
        return Err(Error::InvalidArgument(format!(
            "RMSNorm: weight {:?} {:?} for input {:?} {:?}",
            weight.dims(),
            weight.dtype(),
            x.dims(),
            x.dtype()
        )));
    }
    Ok(x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })?)
}

/// SwiGLU's gating, `silu(gate) ⊙ up` with `silu(a) = a · σ(a)` (Shazeer 2020, "GLU
/// Variants Improve Transformer", FFN_SwiGLU),
/// with a backward for both operands.
///
/// `gate`, `up`: the same shape, both f32 or both f64, on the CPU. Returns that shape.
///
/// Errors: [`Error::InvalidArgument`] for different shapes or dtypes; [`Error::Candle`]
/// for another dtype or device.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        return Err(Error::InvalidArgument(format!(
            "SwiGLU: gate {:?} {:?} and up {:?} {:?} differ",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        )));
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

/// Rotary position embedding in the half-split (HF LLaMA) layout, `x · cos + rotate_half(x)
/// · sin` (Su et al. 2021, RoFormer, eq. 34), with a backward for `x` (the rotation by the
/// opposite angles).
///
/// `x`: `(B, H, T, hd)`; `cos`, `sin`: `(B, T, hd / 2)` at each token's position; all f32
/// or all f64, on the CPU. Returns `(B, H, T, hd)`.
///
/// Errors: [`Error::InvalidArgument`] when the tables do not fit `x`, `B`, `T` or `hd` is
/// 0, or the dtypes differ; [`Error::Candle`] for an `x` that is not 4-D, another dtype
/// or device.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, hd) = x.dims4()?;
    let fits = hd % 2 == 0
        && b * t * hd > 0
        && cos.dims() == [b, t, hd / 2]
        && sin.dims() == cos.dims()
        && cos.dtype() == x.dtype()
        && sin.dtype() == x.dtype();
    if !fits {
        return Err(Error::InvalidArgument(format!(
            "RoPE: tables {:?} / {:?} for input {:?}",
            cos.dims(),
            sin.dims(),
            x.dims()
        )));
    }
    let rotation = Rope { inverse: false };
    Ok(x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, rotation)?)
}

/// The float types the kernels are written for.
trait Real: WithDType + Send + Sync {
    fn sqrt(self) -> Self;
    /// `1 / (1 + e⁻ˣ)`.
    fn sigmoid(self) -> Self;
}

impl Real for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }

    #[inline(always)]
    fn sigmoid(self) -> Self {
        // e^{-|x|} ≤ 1 never overflows, and the vectorisable exp needs an exponent ≤ 0.
        let e = vector_math::exp(-self.abs());
        let s = 1.0 / (1.0 + e);
        if self >= 0.0 {
            s
        } else {
            e * s
        }
    }
}

impl Real for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }

    fn sigmoid(self) -> Self {
        1.0 / (1.0 + (-self).exp())
    }
}

/// The values of a contiguous CPU operand of a custom op, as `T` (the crate's CPU kernels
/// share it).
///
/// Errors: [`candle_core::Error`] for a non-contiguous layout or another dtype than `T`.
pub(crate) fn values<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("fused kernels take contiguous operands"),
    }
}

/// Runs `$body` with `$T` bound to the element type of `$storage` (f32 or f64).
macro_rules! with_real {
    ($storage:expr, $T:ident => $body:expr) => {
        match $storage {
            CpuStorage::F32(_) => {
                type $T = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $T = f64;
                $body
            }
            other => {
                let dtype = candle_core::backend::BackendStorage::dtype(other);
                candle_core::bail!("fused kernels run on f32 and f64, not {dtype:?}")
            }
        }
    };
}

/// `1 / sqrt(mean(x²) + eps)` of one row, summed in eight independent lanes so that the
/// loop vectorises.
#[inline(always)]
fn inverse_rms<T: Real>(row: &[T], eps: f64) -> T {
    let zero = T::from_f64(0.0);
    let mut lanes = [zero; 8];
    let chunks = row.chunks_exact(8);
    let mut sum = chunks.remainder().iter().fold(zero, |s, &v| s + v * v);
    for c in chunks {
        for l in 0..8 {
            lanes[l] += c[l] * c[l];
        }
    }
    for l in lanes {
        sum += l;
    }
    let mean = sum / T::from_f64(row.len() as f64);
    T::from_f64(1.0) / (mean + T::from_f64(eps)).sqrt()
}

struct RmsNorm {
    eps: f64,
}

impl RmsNorm {
    fn forward<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let d = w.len();
        let mut y = vec![T::from_f64(0.0); x.len()];
        (y.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK)))
        .for_each(|(ys, xs)| {
            for (y, x) in ys.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                let r = inverse_rms(x, self.eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            }
        });
        y
    }

    /// `dx = r·(g⊙w) − x·r³·mean(g⊙w⊙x)` per row, `r = 1/sqrt(mean(x²) + eps)`.
    fn input_grad<T: Real>(&self, x: &[T], w: &[T], g: &[T]) -> Vec<T> {
        let d = w.len();
        let chunk = d * ROWS_PER_TASK;
        let mut dx = vec![T::from_f64(0.0); x.len()];
        (dx.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .zip(g.par_chunks(chunk)))
        .for_each(|((dxs, xs), gs)| {
            let rows = dxs.chunks_exact_mut(d).zip(xs.chunks_exact(d));
            for ((dx, x), g) in rows.zip(gs.chunks_exact(d)) {
                let r = inverse_rms(x, self.eps);
                let mut dot = T::from_f64(0.0);
                for ((&g, &w), &x) in g.iter().zip(w).zip(x) {
                    dot += g * w * x;
                }
                let c = dot * r * r * r / T::from_f64(d as f64);
                for (((dx, &g), &w), &x) in dx.iter_mut().zip(g).zip(w).zip(x) {
                    *dx = r * g * w - x * c;
                }
            }
        });
        dx
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        with_real!(s1, T => {
            let y = self.forward::<T>(values(s1, l1)?, values(s2, l2)?);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    /// `dx` by [`RmsNormGrad`]; `dw = Σ_rows g ⊙ x·r` only when the weight trains
    /// (full-parameter training), from the input normalised without weight.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let weight_trains = w.track_op();
        let (x, w, g) = (x.detach(), w.detach(), g.detach().contiguous()?);
        let dx = x.apply_op3_no_bwd(&w, &g, &RmsNormGrad { eps: self.eps })?;
        let dw = if weight_trains {
            let normed = x.apply_op2_no_bwd(&w.ones_like()?, self)?;
            Some((g * normed)?.reshape(((), w.dim(0)?))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// The input gradient of [`RmsNorm`]: `(x, w, g)` -> `dx`.
struct RmsNormGrad {
    eps: f64,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let norm = RmsNorm { eps: self.eps };
        with_real!(s1, T => {
            let dx = norm.input_grad::<T>(values(s1, l1)?, values(s2, l2)?, values(s3, l3)?);
            Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
        })
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        with_real!(s1, T => {
            let (a, b) = (values::<T>(s1, l1)?, values::<T>(s2, l2)?);
            let mut y = vec![T::from_f64(0.0); a.len()];
            (y.par_chunks_mut(ELEMENTS_PER_TASK).zip(a.par_chunks(ELEMENTS_PER_TASK)))
                .zip(b.par_chunks(ELEMENTS_PER_TASK))
                .for_each(|((y, a), b)| {
                    for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                        *y = a * a.sigmoid() * b;
                    }
                });
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    /// Both gradients in one pass ([`SwiGluGrad`]), then split.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.detach().contiguous()?;
        let both = a.detach().apply_op3_no_bwd(&b.detach(), &g, &SwiGluGrad)?;
        let half = |i| both.narrow(0, i, 1)?.reshape(a.shape());
        Ok((Some(half(0)?), Some(half(1)?)))
    }
}

/// The gradients of [`SwiGlu`]: `(a, b, g)` -> `(2, n)` holding
/// `da = g·b·σ(a)·(1 + a·(1 − σ(a)))` and `db = g·a·σ(a)`.
struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        with_real!(s1, T => {
            let (a, b, g) = (values::<T>(s1, l1)?, values::<T>(s2, l2)?, values::<T>(s3, l3)?);
            let n = a.len();
            let mut out = vec![T::from_f64(0.0); 2 * n];
            let (da, db) = out.split_at_mut(n);
            let one = T::from_f64(1.0);
            (da.par_chunks_mut(ELEMENTS_PER_TASK).zip(db.par_chunks_mut(ELEMENTS_PER_TASK)))
                .zip(a.par_chunks(ELEMENTS_PER_TASK))
                .zip(b.par_chunks(ELEMENTS_PER_TASK).zip(g.par_chunks(ELEMENTS_PER_TASK)))
                .for_each(|(((da, db), a), (b, g))| {
                    for i in 0..a.len() {
                        let s = a[i].sigmoid();
                        da[i] = g[i] * b[i] * s * (one + a[i] * (one - s));
                        db[i] = g[i] * a[i] * s;
                    }
                });
            Ok((T::to_cpu_storage_owned(out), Shape::from((2, n))))
        })
    }
}

/// The rotation of [`rope`]; `inverse` rotates by the opposite angles (its backward).
struct Rope {
    inverse: bool,
}

impl Rope {
    fn rotate<T: Real>(&self, x: &[T], cos: &[T], sin: &[T], (_, h, t, hd): Dims4) -> Vec<T> {
        let half = hd / 2;
        let mut y = vec![T::from_f64(0.0); x.len()];
        let planes = y
            .par_chunks_mut(t * hd)
            .zip(x.par_chunks(t * hd))
            .enumerate();
        planes.for_each(|(plane, (y, x))| {
            let row = plane / h;
            let tables = row * t * half..(row + 1) * t * half;
            let (cos, sin) = (&cos[tables.clone()], &sin[tables]);
            for (((y, x), c), s) in (y.chunks_exact_mut(hd).zip(x.chunks_exact(hd)))
                .zip(cos.chunks_exact(half))
                .zip(sin.chunks_exact(half))
            {
                let zero = T::from_f64(0.0);
                let (x1, x2) = x.split_at(half);
                let (y1, y2) = y.split_at_mut(half);
                for i in 0..half {
                    let s = if self.inverse { zero - s[i] } else { s[i] };
                    y1[i] = x1[i] * c[i] - x2[i] * s;
                    y2[i] = x2[i] * c[i] + x1[i] * s;
                }
            }
        });
        y
    }
}

type Dims4 = (usize, usize, usize, usize);

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims4()?;
        with_real!(s1, T => {
            let (x, cos, sin) = (values::<T>(s1, l1)?, values::<T>(s2, l2)?, values::<T>(s3, l3)?);
            let y = self.rotate(x, cos, sin, dims);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    /// A rotation is orthogonal: its gradient is the rotation by the opposite angles. The
    /// tables are constants of the positions and get none.
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = Rope {
            inverse: !self.inverse,
        };
        let dx =
            (g.detach().contiguous()?).apply_op3_no_bwd(&cos.detach(), &sin.detach(), &back)?;
        Ok((Some(dx), None, None))
    }
}
