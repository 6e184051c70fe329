//! Softmax over a prefix of each score row: the causal (and routed) attention of a GPU
//! without a mask tensor.
//!
//! A query sees a prefix of its row's key slots (keys are held in ascending position, also
//! after routing and in the KV cache; see [`super::prefix_attention`]), so one count per
//! query replaces the additive mask. On a GPU, candle's composed masked softmax (scale,
//! build the mask from positions, broadcast-add it over the heads, softmax) was 80% of a
//! 2048-token prefill's GPU time on an H200: its broadcast add alone ran at a thirtieth of
//! the memory bandwidth. [`prefix_softmax`] is one kernel that reads each score once per
//! reduction and writes the probabilities once; its backward is one more.
//!
//! The CUDA kernels (f32 and bf16) are compiled with NVRTC when first used; the CPU
//! implementation (f32, f64, bf16) is the reference they are tested against.

use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};

/// Whether [`prefix_softmax`] runs as a GPU kernel for scores like `scores`: f32 or bf16
/// on a CUDA device.
pub fn runs_on_gpu(scores: &Tensor) -> bool {
    scores.device().is_cuda() && matches!(scores.dtype(), DType::F32 | DType::BF16)
}

/// `softmax(scale · s)` over the first `counts[q]` key slots of each query's score row, and
/// 0 over the slots after them (a row that sees no key is all 0).
///
/// `scores`: `(B, H, G·T, Tk)`, query heads grouped by KV head as in
/// [`super::Attention::attend`] (row `(b, h, g·T + t)` is query `t` of row `b`); `counts`:
/// `B·T` visible-key counts, row-major, as many as `Tk` at most. `scale`: the
/// `1/√head_dim` factor, applied inside. Returns `(B, H, G·T, Tk)` in the dtype of
/// `scores`, with a backward for `scores`:
/// `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`.
///
/// Errors: [`Error::InvalidArgument`] when `counts` does not hold `B·T` values for the
/// query axis, a count exceeds `Tk`, or `scale` is not positive and finite; [`Error::Candle`] for another dtype (f16 on the
/// CPU, anything but f32 and bf16 on a GPU) or when the kernel cannot be compiled.
pub fn prefix_softmax(scores: &Tensor, counts: &[usize], t: usize, scale: f32) -> Result<Tensor> {
    let (b, heads, group_rows, tk) = scores.dims4()?;
    // The row maximum is taken over the raw scores: right for a positive scale only.
    if !(scale > 0.0 && scale.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "prefix softmax: the scale must be positive and finite, got {scale}"
        )));
    }
    let well_formed =
        t > 0 && group_rows % t == 0 && counts.len() == b * t && counts.iter().all(|&n| n <= tk);
    if !well_formed {
        return Err(Error::InvalidArgument(format!(
            "prefix softmax: {} counts for scores {:?} and {t} queries a row (at most {tk} \
             keys each)",
            counts.len(),
            scores.dims()
        )));
    }
    if scores.elem_count() == 0 {
        return Ok(scores.zeros_like()?);
    }
    let counts: Vec<u32> = counts.iter().map(|&n| n as u32).collect();
    let counts = Tensor::from_vec(counts, b * t, scores.device())?;
    let op = PrefixSoftmax::new(t, heads * group_rows, scale);
    Ok(scores.contiguous()?.apply_op2(&counts, op)?)
}

/// The forward op: `(scores, counts) -> probabilities`, with a backward for the scores.
pub(super) struct PrefixSoftmax {
    /// Queries per batch row.
    t: usize,
    /// Score rows per batch row, `H·G·T`.
    rows_per_batch: usize,
    scale: f32,
}

impl PrefixSoftmax {
    /// Scores of `rows_per_batch` rows a batch row (`H·G·T`), `t` queries a batch row
    /// (each count serves the `H·G` rows of its query), scaled by `scale` inside.
    pub(super) fn new(t: usize, rows_per_batch: usize, scale: f32) -> Self {
        Self {
            t,
            rows_per_batch,
            scale,
        }
    }

    /// The visible-key count of score row `row`.
    fn count(&self, counts: &[u32], row: usize) -> usize {
        counts[(row / self.rows_per_batch) * self.t + row % self.t] as usize
    }
}

/// The backward op: `(P, dP) -> dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`.
pub(super) struct PrefixSoftmaxBackward {
    pub(super) scale: f32,
}

/// `(rows, Tk)` of a contiguous tensor's layout, and its offsets.
fn rows_and_width(layout: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("prefix softmax: the scores must be contiguous");
    };
    let width = layout.dims().last().copied().unwrap_or(0);
    Ok((
        layout.shape().elem_count() / width.max(1),
        width,
        start,
        end,
    ))
}

fn forward_host<T: WithDType>(op: &PrefixSoftmax, s: &[T], counts: &[u32], tk: usize) -> Vec<T> {
    let mut p = vec![T::zero(); s.len()];
    for (row, (s, p)) in s.chunks(tk).zip(p.chunks_mut(tk)).enumerate() {
        let n = op.count(counts, row);
        let s = &s[..n];
        let max = s
            .iter()
            .map(|v| v.to_f64())
            .fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s
            .iter()
            .map(|v| ((v.to_f64() - max) * op.scale as f64).exp())
            .collect();
        let z: f64 = e.iter().sum();
        for (p, e) in p.iter_mut().zip(&e) {
            *p = T::from_f64(e / z);
        }
    }
    p
}

fn backward_host<T: WithDType>(scale: f32, p: &[T], dp: &[T], tk: usize) -> Vec<T> {
    let mut ds = vec![T::zero(); p.len()];
    for ((p, dp), ds) in p.chunks(tk).zip(dp.chunks(tk)).zip(ds.chunks_mut(tk)) {
        let dot: f64 = p.iter().zip(dp).map(|(p, g)| p.to_f64() * g.to_f64()).sum();
        for ((ds, p), g) in ds.iter_mut().zip(p).zip(dp) {
            *ds = T::from_f64(scale as f64 * p.to_f64() * (g.to_f64() - dot));
        }
    }
    ds
}

impl CustomOp2 for PrefixSoftmax {
    fn name(&self) -> &'static str {
        "prefix-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        counts: &CpuStorage,
        lc: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, tk, start, end) = rows_and_width(ls)?;
        let Some((c0, c1)) = lc.contiguous_offsets() else {
            candle_core::bail!("prefix softmax: the counts must be contiguous");
        };
        let CpuStorage::U32(counts) = counts else {
            candle_core::bail!("prefix softmax: the counts must be u32");
        };
        let counts = &counts[c0..c1];
        let p = match s {
            CpuStorage::F32(s) => CpuStorage::F32(forward_host(self, &s[start..end], counts, tk)),
            CpuStorage::F64(s) => CpuStorage::F64(forward_host(self, &s[start..end], counts, tk)),
            CpuStorage::BF16(s) => CpuStorage::BF16(forward_host(self, &s[start..end], counts, tk)),
            _ => candle_core::bail!("prefix softmax: f32, f64 or bf16 scores on the CPU"),
        };
        Ok((p, ls.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        ls: &Layout,
        counts: &candle_core::CudaStorage,
        lc: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, tk, start, end) = rows_and_width(ls)?;
        let Some((c0, c1)) = lc.contiguous_offsets() else {
            candle_core::bail!("prefix softmax: the counts must be contiguous");
        };
        let counts = counts.as_cuda_slice::<u32>()?.slice(c0..c1);
        let args = gpu::Args {
            rows,
            tk,
            t: self.t,
            rows_per_batch: self.rows_per_batch,
            scale: self.scale,
        };
        let p = gpu::forward(s, start..end, &counts, args)?;
        Ok((p, ls.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _counts: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let backward = PrefixSoftmaxBackward { scale: self.scale };
        let ds = probs.apply_op2_no_bwd(&grad.contiguous()?, &backward)?;
        Ok((Some(ds), None))
    }
}

impl CustomOp2 for PrefixSoftmaxBackward {
    fn name(&self) -> &'static str {
        "prefix-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        lp: &Layout,
        dp: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, tk, p0, p1) = rows_and_width(lp)?;
        let (_, _, d0, d1) = rows_and_width(ld)?;
        let ds = match (p, dp) {
            (CpuStorage::F32(p), CpuStorage::F32(dp)) => {
                CpuStorage::F32(backward_host(self.scale, &p[p0..p1], &dp[d0..d1], tk))
            }
            (CpuStorage::F64(p), CpuStorage::F64(dp)) => {
                CpuStorage::F64(backward_host(self.scale, &p[p0..p1], &dp[d0..d1], tk))
            }
            (CpuStorage::BF16(p), CpuStorage::BF16(dp)) => {
                CpuStorage::BF16(backward_host(self.scale, &p[p0..p1], &dp[d0..d1], tk))
            }
            _ => candle_core::bail!("prefix softmax backward: f32, f64 or bf16 on the CPU"),
        };
        Ok((ds, lp.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        lp: &Layout,
        dp: &candle_core::CudaStorage,
        ld: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, tk, p0, p1) = rows_and_width(lp)?;
        let (_, _, d0, d1) = rows_and_width(ld)?;
        let ds = gpu::backward(p, p0..p1, dp, d0..d1, rows, tk, self.scale)?;
        Ok((ds, lp.shape().clone()))
    }
}

/// The CUDA kernels: one warp per score row, f32 and bf16, sums in f32.
#[cfg(feature = "cuda")]
mod gpu {
    use crate::model::nvrtc::KernelModule;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType};
    use std::ops::Range;

    const SOURCE: &str = r#"
template <typename T>
__device__ void forward(const T* s, const unsigned int* counts, T* p, long long rows, int tk,
                        int t, long long rows_per_batch, float scale) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int n = (int)counts[(row / rows_per_batch) * t + row % t];
    const T* sr = s + row * tk;
    T* pr = p + row * tk;
    float m = -__int_as_float(0x7f800000);
    for (int j = lane; j < n; j += 32) m = fmaxf(m, load(sr, j));
    m = warp_max(m);
    float z = 0.f;
    for (int j = lane; j < n; j += 32) z += expf((load(sr, j) - m) * scale);
    z = warp_sum(z);
    float inv = n > 0 ? 1.f / z : 0.f;
    for (int j = lane; j < tk; j += 32)
        store(pr, j, j < n ? expf((load(sr, j) - m) * scale) * inv : 0.f);
}

template <typename T>
__device__ void backward(const T* p, const T* dp, T* ds, long long rows, int tk, float scale) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* pr = p + row * tk;
    const T* gr = dp + row * tk;
    T* dr = ds + row * tk;
    float dot = 0.f;
    for (int j = lane; j < tk; j += 32) dot += load(pr, j) * load(gr, j);
    dot = warp_sum(dot);
    for (int j = lane; j < tk; j += 32) store(dr, j, scale * load(pr, j) * (load(gr, j) - dot));
}

extern "C" __global__ void prefix_softmax_f32(const float* s, const unsigned int* c, float* p,
        long long rows, int tk, int t, long long rpb, float scale) { forward(s, c, p, rows, tk, t, rpb, scale); }
extern "C" __global__ void prefix_softmax_bf16(const bf16* s, const unsigned int* c, bf16* p,
        long long rows, int tk, int t, long long rpb, float scale) { forward(s, c, p, rows, tk, t, rpb, scale); }
extern "C" __global__ void prefix_softmax_bwd_f32(const float* p, const float* dp, float* ds,
        long long rows, int tk, float scale) { backward(p, dp, ds, rows, tk, scale); }
extern "C" __global__ void prefix_softmax_bwd_bf16(const bf16* p, const bf16* dp, bf16* ds,
        long long rows, int tk, float scale) { backward(p, dp, ds, rows, tk, scale); }
"#;

    /// Rows (warps) per block.
    const ROWS_PER_BLOCK: u32 = 4;

    /// The kernels index columns with `int` and launch a block per 4 rows.
    fn check_sizes(rows: usize, tk: usize) -> candle_core::Result<()> {
        let blocks = rows.div_ceil(ROWS_PER_BLOCK as usize);
        if blocks > i32::MAX as usize || tk > i32::MAX as usize {
            candle_core::bail!(
                "prefix softmax: {rows} rows of {tk} keys exceed the kernel's range"
            );
        }
        Ok(())
    }

    fn launch_config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(ROWS_PER_BLOCK as usize) as u32, 1, 1),
            block_dim: (32 * ROWS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    static KERNELS: KernelModule = KernelModule::new("modification_prefix_softmax", SOURCE);

    pub(super) struct Args {
        pub rows: usize,
        pub tk: usize,
        pub t: usize,
        pub rows_per_batch: usize,
        pub scale: f32,
    }

    pub(super) fn forward(
        s: &CudaStorage,
        range: Range<usize>,
        counts: &CudaView<u32>,
        a: Args,
    ) -> candle_core::Result<CudaStorage> {
        check_sizes(a.rows, a.tk)?;
        let dev = s.device.clone();
        let (rows, tk, t, rpb) = (
            a.rows as i64,
            a.tk as i32,
            a.t as i32,
            a.rows_per_batch as i64,
        );
        macro_rules! run {
            ($ty:ty, $name:literal) => {{
                let src = s.as_cuda_slice::<$ty>()?.slice(range);
                // SAFETY: every element is written by the kernel.
                let dst: CudaSlice<$ty> = unsafe { dev.alloc::<$ty>(a.rows * a.tk)? };
                let func = KERNELS.function(&dev, $name)?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&func);
                b.arg(&src)
                    .arg(counts)
                    .arg(&dst)
                    .arg(&rows)
                    .arg(&tk)
                    .arg(&t)
                    .arg(&rpb);
                b.arg(&a.scale);
                // SAFETY: the arguments match the kernel's signature.
                unsafe { b.launch(launch_config(a.rows)) }.w()?;
                CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        Ok(match s.dtype() {
            DType::F32 => run!(f32, "prefix_softmax_f32"),
            DType::BF16 => run!(half::bf16, "prefix_softmax_bf16"),
            other => candle_core::bail!("prefix softmax: {other:?} scores on a GPU"),
        })
    }

    pub(super) fn backward(
        p: &CudaStorage,
        pr: Range<usize>,
        dp: &CudaStorage,
        dr: Range<usize>,
        rows: usize,
        tk: usize,
        scale: f32,
    ) -> candle_core::Result<CudaStorage> {
        check_sizes(rows, tk)?;
        let dev = p.device.clone();
        let (n_rows, width) = (rows as i64, tk as i32);
        macro_rules! run {
            ($ty:ty, $name:literal) => {{
                let (p, dp) = (
                    p.as_cuda_slice::<$ty>()?.slice(pr),
                    dp.as_cuda_slice::<$ty>()?.slice(dr),
                );
                // SAFETY: every element is written by the kernel.
                let dst: CudaSlice<$ty> = unsafe { dev.alloc::<$ty>(rows * tk)? };
                let func = KERNELS.function(&dev, $name)?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&func);
                b.arg(&p)
                    .arg(&dp)
                    .arg(&dst)
                    .arg(&n_rows)
                    .arg(&width)
                    .arg(&scale);
                // SAFETY: the arguments match the kernel's signature.
                unsafe { b.launch(launch_config(rows)) }.w()?;
                CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        Ok(match p.dtype() {
            DType::F32 => run!(f32, "prefix_softmax_bwd_f32"),
            DType::BF16 => run!(half::bf16, "prefix_softmax_bwd_bf16"),
            other => candle_core::bail!("prefix softmax backward: {other:?} on a GPU"),
        })
    }
}
