//! CUDA C kernels compiled with NVRTC at first use, for the crate's custom ops on a GPU
//! ([`super::prefix_softmax`], [`super::fused`]).
//!
//! Every module's source starts with [`PRELUDE`]: bf16 handled as its bits (so that NVRTC
//! needs no CUDA header), loads that widen to f32 and stores that round to nearest even
//! (NaN stays NaN), and warp reductions. Kernels compute in f32 whatever they store.

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::CudaDevice;
use std::sync::OnceLock;

/// The helpers every kernel source is compiled with.
const PRELUDE: &str = r#"
typedef unsigned short bf16;
__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const bf16* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16* p, long long i, float v) {
    unsigned int b = __float_as_uint(v);
    if ((b & 0x7fffffffu) > 0x7f800000u) { p[i] = (bf16)((b >> 16) | 0x40u); return; }  // NaN stays NaN
    p[i] = (bf16)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);  // round to nearest even
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
"#;

/// One CUDA C source, its PTX compiled once per process and loaded once per device under
/// `name`.
pub(crate) struct KernelModule {
    name: &'static str,
    body: &'static str,
    ptx: OnceLock<Result<String, String>>,
}

impl KernelModule {
    /// The kernels of `body` (compiled after [`PRELUDE`]), loaded under `name`.
    pub(crate) const fn new(name: &'static str, body: &'static str) -> Self {
        Self {
            name,
            body,
            ptx: OnceLock::new(),
        }
    }

    /// The kernel `kernel` of this module on `dev`, to launch on `dev.cuda_stream()`.
    ///
    /// Errors: [`candle_core::Error`] when NVRTC cannot compile the source (the message
    /// holds its log) or the kernel cannot be loaded.
    pub(crate) fn function(
        &self,
        dev: &CudaDevice,
        kernel: &str,
    ) -> candle_core::Result<CudaFunction> {
        let ptx = self.ptx.get_or_init(|| {
            nvrtc::compile_ptx(format!("{PRELUDE}{}", self.body))
                .map(|p| p.to_src())
                .map_err(|e| format!("{e:?}"))
        });
        match ptx {
            Ok(ptx) => Ok(dev
                .get_or_load_custom_func(kernel, self.name, ptx)?
                .into_cuda_function()),
            Err(e) => candle_core::bail!("{}: NVRTC failed: {e}", self.name),
        }
    }
}

/// Threads per block of the kernels that take one warp per row or one thread per element.
pub(crate) const BLOCK_THREADS: u32 = 256;

/// A launch of `blocks` blocks of `threads` threads, at most 2²⁰ blocks: the kernels loop
/// over whatever work a grid this size does not cover (grid-stride loops).
pub(crate) fn grid(work_items: usize, items_per_block: usize, threads: u32) -> LaunchConfig {
    let blocks = work_items
        .div_ceil(items_per_block.max(1))
        .clamp(1, 1 << 20);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
