//! Fused kernels, each with a backward, for the element-wise parts of a LLaMA layer:
//! RMSNorm, SwiGLU and RoPE, on the CPU (f32, f64) and, with the `cuda` feature, on a
//! CUDA GPU (f32, bf16; compiled with NVRTC at first use, see `model/nvrtc.rs`).
//!
//! With gradients tracked, candle 0.11 composes these from primitive ops: an RMSNorm is
//! six passes over its input forward and about twice as many backward, each into a fresh
//! allocation, and autograd keeps every intermediate until the backward runs. Each kernel
//! here is one pass forward and one backward and keeps only its inputs. They take
//! contiguous tensors; [`super::ops`] and [`super::RopeAt`] choose them where
//! [`has_kernel`] says so and keep the composed ops elsewhere, so an f64 model is the
//! composed reference on the CPU, as the CPU is the GPU kernels' reference.

use super::vector_math;
use crate::error::{Error, Result};
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// Rows (of `d` values) per parallel task, so that a task is worth handing to a thread.
const ROWS_PER_TASK: usize = 16;
/// Elements per parallel task of the purely element-wise SwiGLU.
const ELEMENTS_PER_TASK: usize = 1 << 14;

/// Whether the model's fused CPU-only kernels ([`super::prefix_attention`] and
/// [`super::token_losses`]) run for activations like `x`: f32 on the CPU, in inference
/// and in training (every kernel has a backward). Elsewhere candle's composed ops run.
pub fn runs_fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Whether [`rms_norm`], [`swiglu`] and [`rope`] have a kernel for activations like `x`:
/// f32 on the CPU; f32 or bf16 on a CUDA GPU (a build with the `cuda` feature).
pub fn has_kernel(x: &Tensor) -> bool {
    match x.device() {
        Device::Cpu => x.dtype() == DType::F32,
        Device::Cuda(_) => cfg!(feature = "cuda") && matches!(x.dtype(), DType::F32 | DType::BF16),
        Device::Metal(_) => false,
    }
}

/// RMSNorm over the last dimension, `x / sqrt(mean(x²) + eps) · weight` (Zhang & Sennrich
/// 2019, eq. 4), with a backward for `x` and, when it tracks gradients, `weight`.
///
/// `x`: `(..., d)`; `weight`: `(d,)`; of one dtype, where [`has_kernel`] (or f64 on the
/// CPU). Returns the shape and dtype of `x`.
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
/// `gate`, `up`: the same shape and dtype, where [`has_kernel`] (or f64 on the CPU).
/// Returns that shape.
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
/// `x`: `(B, H, T, hd)`; `cos`, `sin`: `(B, T, hd / 2)` at each token's position; of one
/// dtype, where [`has_kernel`] (or f64 on the CPU). Returns `(B, H, T, hd)`.
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, d) = (l1.shape().elem_count(), l2.shape().elem_count());
        let params = gpu::Params::rows(n / d, d, self.eps)?;
        let y = gpu::run(
            "rms_norm",
            &[(s1, l1), (s2, l2)],
            n,
            gpu::Work::Rows(n / d),
            params,
        )?;
        Ok((y, l1.shape().clone()))
    }

    /// `dx` by [`RmsNormGrad`]; `dw = Σ_rows g ⊙ x·r` only when the weight trains
    /// (full-parameter training), from the input normalised without weight (bf16 summed in f32).
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
            // Half-precision gradients (bf16 on a GPU) are summed in f32: a bf16 sum over
            // thousands of rows drifts.
            let normed = x.apply_op2_no_bwd(&w.ones_like()?, self)?;
            let wide = |t: &Tensor| match t.dtype() {
                DType::BF16 | DType::F16 => t.to_dtype(DType::F32),
                _ => Ok(t.clone()),
            };
            let rows = (wide(&g)? * wide(&normed)?)?.reshape(((), w.dim(0)?))?;
            Some(rows.sum(0)?.to_dtype(w.dtype())?)
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, d) = (l1.shape().elem_count(), l2.shape().elem_count());
        let params = gpu::Params::rows(n / d, d, self.eps)?;
        let operands = [(s1, l1), (s2, l2), (s3, l3)];
        let dx = gpu::run(
            "rms_norm_grad",
            &operands,
            n,
            gpu::Work::Rows(n / d),
            params,
        )?;
        Ok((dx, l1.shape().clone()))
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.shape().elem_count();
        let params = gpu::Params::elements(n);
        let y = gpu::run(
            "swiglu",
            &[(s1, l1), (s2, l2)],
            n,
            gpu::Work::Items(n),
            params,
        )?;
        Ok((y, l1.shape().clone()))
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.shape().elem_count();
        let params = gpu::Params::elements(n);
        let operands = [(s1, l1), (s2, l2), (s3, l3)];
        let both = gpu::run("swiglu_grad", &operands, 2 * n, gpu::Work::Items(n), params)?;
        Ok((both, Shape::from((2, n))))
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let params = gpu::Params::rope(l1.shape().dims4()?, self.inverse)?;
        let pairs = params.n as usize;
        let operands = [(s1, l1), (s2, l2), (s3, l3)];
        let n = l1.shape().elem_count();
        let y = gpu::run("rope", &operands, n, gpu::Work::Items(pairs), params)?;
        Ok((y, l1.shape().clone()))
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

/// The CUDA kernels of the fused ops, f32 and bf16 (computed in f32): one warp per row for
/// RMSNorm and its gradient, one thread per element for SwiGLU and its gradients, one
/// thread per rotated pair for RoPE.
#[cfg(feature = "cuda")]
mod gpu {
    use crate::model::nvrtc::{grid, KernelModule, BLOCK_THREADS};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout};

    const SOURCE: &str = r#"
struct Params { long long n; int d; int t; int h; float eps; int inverse; };

__device__ __forceinline__ float sigmoid(float a) { return 1.f / (1.f + expf(-a)); }

// Rows of p.d values, one warp each: y = x / sqrt(mean(x²) + eps) · w.
template <typename T>
__device__ void rms_norm(const T* x, const T* w, const T*, T* y, Params p) {
    int lane = threadIdx.x % 32;
    long long warps = (long long)gridDim.x * (blockDim.x / 32);
    for (long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
         row < p.n; row += warps) {
        const T* xr = x + row * p.d;
        T* yr = y + row * p.d;
        float ss = 0.f;
        for (int j = lane; j < p.d; j += 32) { float v = load(xr, j); ss += v * v; }
        float r = 1.f / sqrtf(warp_sum(ss) / p.d + p.eps);
        for (int j = lane; j < p.d; j += 32) store(yr, j, load(xr, j) * r * load(w, j));
    }
}

// dx = r·(g⊙w) − x·r³·mean(g⊙w⊙x) per row.
template <typename T>
__device__ void rms_norm_grad(const T* x, const T* w, const T* g, T* dx, Params p) {
    int lane = threadIdx.x % 32;
    long long warps = (long long)gridDim.x * (blockDim.x / 32);
    for (long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
         row < p.n; row += warps) {
        const T* xr = x + row * p.d;
        const T* gr = g + row * p.d;
        T* dr = dx + row * p.d;
        float ss = 0.f, dot = 0.f;
        for (int j = lane; j < p.d; j += 32) {
            float v = load(xr, j);
            ss += v * v;
            dot += load(gr, j) * load(w, j) * v;
        }
        float r = 1.f / sqrtf(warp_sum(ss) / p.d + p.eps);
        float c = warp_sum(dot) * r * r * r / p.d;
        for (int j = lane; j < p.d; j += 32)
            store(dr, j, r * load(gr, j) * load(w, j) - load(xr, j) * c);
    }
}

// y = silu(a) ⊙ b over p.n elements.
template <typename T>
__device__ void swiglu(const T* a, const T* b, const T*, T* y, Params p) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n;
         i += (long long)gridDim.x * blockDim.x) {
        float av = load(a, i);
        store(y, i, av * sigmoid(av) * load(b, i));
    }
}

// out[0..n] = da = g·b·σ(a)·(1 + a·(1 − σ(a))), out[n..2n] = db = g·a·σ(a).
template <typename T>
__device__ void swiglu_grad(const T* a, const T* b, const T* g, T* out, Params p) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n;
         i += (long long)gridDim.x * blockDim.x) {
        float av = load(a, i), gv = load(g, i), s = sigmoid(av);
        store(out, i, gv * load(b, i) * s * (1.f + av * (1.f - s)));
        store(out, p.n + i, gv * av * s);
    }
}

// x (B, H, T, d) rotated by the angles of cos / sin (B, T, d/2); p.n = B·H·T·d/2 pairs
// (i, i + d/2); p.inverse rotates by the opposite angles.
template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* y, Params p) {
    int half = p.d / 2;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n;
         i += (long long)gridDim.x * blockDim.x) {
        long long vec = i / half;
        int k = (int)(i % half);
        long long table = ((vec / ((long long)p.h * p.t)) * p.t + vec % p.t) * half + k;
        float c = load(cos, table), s = load(sin, table);
        if (p.inverse) s = -s;
        const T* xr = x + vec * p.d;
        T* yr = y + vec * p.d;
        float x1 = load(xr, k), x2 = load(xr, k + half);
        store(yr, k, x1 * c - x2 * s);
        store(yr, k + half, x2 * c + x1 * s);
    }
}

#define EXPORT(name) \
extern "C" __global__ void name##_f32(const float* a, const float* b, const float* c, \
        float* out, Params p) { name(a, b, c, out, p); } \
extern "C" __global__ void name##_bf16(const bf16* a, const bf16* b, const bf16* c, \
        bf16* out, Params p) { name(a, b, c, out, p); }
EXPORT(rms_norm)
EXPORT(rms_norm_grad)
EXPORT(swiglu)
EXPORT(swiglu_grad)
EXPORT(rope)
"#;

    static KERNELS: KernelModule = KernelModule::new("modification_fused", SOURCE);

    /// The kernels' one parameter block, laid out as the source's `Params`: `n` rows,
    /// elements or pairs; `d` the row width; `t`, `h` RoPE's tokens and heads; `eps`
    /// RMSNorm's; `inverse` 1 to rotate by the opposite angles.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub(super) struct Params {
        pub n: i64,
        pub d: i32,
        pub t: i32,
        pub h: i32,
        pub eps: f32,
        pub inverse: i32,
    }

    // SAFETY: plain old data of the same layout as the kernels' `Params`.
    unsafe impl DeviceRepr for Params {}

    /// `v` as the kernels' `int`.
    fn int(v: usize) -> candle_core::Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{v} exceeds a kernel's int")))
    }

    impl Params {
        /// `rows` rows of `d` values, RMSNorm's `eps`.
        pub fn rows(rows: usize, d: usize, eps: f64) -> candle_core::Result<Self> {
            Ok(Self {
                n: rows as i64,
                d: int(d)?,
                eps: eps as f32,
                ..Self::default()
            })
        }

        /// `n` independent elements.
        pub fn elements(n: usize) -> Self {
            Self {
                n: n as i64,
                ..Self::default()
            }
        }

        /// RoPE over `(b, h, t, d)`, by the opposite angles when `inverse`.
        pub fn rope((b, h, t, d): super::Dims4, inverse: bool) -> candle_core::Result<Self> {
            Ok(Self {
                n: (b * h * t * (d / 2)) as i64,
                d: int(d)?,
                t: int(t)?,
                h: int(h)?,
                inverse: inverse as i32,
                ..Self::default()
            })
        }
    }

    /// How a kernel's work is spread: one warp per row, or one thread per item.
    pub(super) enum Work {
        Rows(usize),
        Items(usize),
    }

    /// Runs `kernel` (the name without its dtype suffix) on up to three contiguous
    /// operands of one dtype (f32 or bf16; a two-operand kernel gets its second operand
    /// again as the unused third) into a fresh output of `out_len` elements.
    ///
    /// Errors: [`candle_core::Error`] for another dtype, a non-contiguous operand, or a
    /// failed compile or launch.
    pub(super) fn run(
        kernel: &str,
        operands: &[(&CudaStorage, &Layout)],
        out_len: usize,
        work: Work,
        params: Params,
    ) -> candle_core::Result<CudaStorage> {
        let config = match work {
            Work::Rows(rows) => grid(rows, (BLOCK_THREADS / 32) as usize, BLOCK_THREADS),
            Work::Items(items) => grid(items, BLOCK_THREADS as usize, BLOCK_THREADS),
        };
        match operands[0].0.dtype() {
            DType::F32 => {
                launch::<f32>(&format!("{kernel}_f32"), operands, out_len, config, params)
            }
            DType::BF16 => {
                launch::<half::bf16>(&format!("{kernel}_bf16"), operands, out_len, config, params)
            }
            other => candle_core::bail!("{kernel}: f32 or bf16 on a GPU, not {other:?}"),
        }
    }

    fn launch<T: CudaDType + DeviceRepr>(
        name: &str,
        operands: &[(&CudaStorage, &Layout)],
        out_len: usize,
        config: LaunchConfig,
        params: Params,
    ) -> candle_core::Result<CudaStorage> {
        let views = operands
            .iter()
            .map(|(s, l)| -> candle_core::Result<CudaView<'_, T>> {
                match l.contiguous_offsets() {
                    Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
                    None => candle_core::bail!("{name}: operands must be contiguous"),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let dev = operands[0].0.device.clone();
        // SAFETY: every element is written by the kernel.
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(out_len.max(1))? };
        let func = KERNELS.function(&dev, name)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        for i in 0..3 {
            b.arg(&views[i.min(views.len() - 1)]);
        }
        b.arg(&out).arg(&params);
        // SAFETY: the arguments match the kernel's signature `(a, b, c, out, Params)`.
        unsafe { b.launch(config) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev))
    }
}
