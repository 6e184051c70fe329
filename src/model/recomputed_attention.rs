//! Attention over each query's prefix of keys as one autograd node whose backward
//! recomputes the probabilities: the GPU's training attention.
//!
//! Composed for the autograd, `softmax(q·Kᵀ)·V` keeps its `(B, H, Tq, Tk)` scores and
//! probabilities until the backward (about 0.6 GB a layer for 16 × 1024 tokens of
//! SmolLM2 in bf16), and candle's backward starts the gradient of each of them as a
//! zero-filled tensor of that size and adds into it. Here the forward's scores and
//! probabilities are temporaries; the node keeps `q`, `K`, `V` and its output, and its
//! backward computes the scores again (one more `q·Kᵀ` product and one more
//! [`prefix_softmax`](super::prefix_softmax::prefix_softmax) pass per layer), which is
//! what flash attention's backward does too (Dao et al. 2022, "FlashAttention", §3.1).
//! The products are candle's (cuBLAS on a GPU); the softmax is the prefix softmax's
//! kernel. On the CPU, where the fused [`prefix_attention`](super::prefix_attention)
//! runs instead, this op is the tests' way to check the same code.

use super::prefix_attention::queries_per_row;
use super::prefix_softmax::{PrefixSoftmax, PrefixSoftmaxBackward};
use crate::error::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

/// `softmax(scale · q·Kᵀ)·V` of each query over its visible prefix of keys, with a
/// backward for `q`, `k` and `v` that recomputes the probabilities.
///
/// - `q`: `(B, n_kv, G·Tq, hd)`, the `G` query heads that share KV head `h` stacked along
///   the query axis (query slot `t` of group member `g` at `g·Tq + t`);
/// - `k`, `v`: `(B, n_kv, Tk, hd)`, each row's keys in ascending original position;
/// - `visible`: `B·Tq` counts, row-major: query slot `t` of row `b` sees keys
///   `0..visible[b·Tq + t]` (0: a padding slot, whose output and gradients are 0);
/// - `scale`: `1/√hd` for LLaMA.
///
/// One dtype for all three: f32 or bf16 on a CUDA GPU; f32, f64 or bf16 on the CPU.
/// Returns `(B, n_kv, G·Tq, hd)` (zeros without queries or keys).
///
/// Errors: [`Error::InvalidArgument`] for mismatched shapes, a count above `Tk`, `G·Tq`
/// not a multiple of `Tq`, or a scale that is not positive and finite;
/// [`Error::Candle`] for another dtype or device.
pub fn recomputed_prefix_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let (b, n_kv, _, hd) = q.dims4()?;
    let (kb, k_heads, tk, k_hd) = k.dims4()?;
    if k.dims() == v.dims() && (kb, k_heads, k_hd) == (b, n_kv, hd) && q.elem_count() * tk == 0 {
        // No query or no key: every output is 0 (as a prefix of no key gives).
        return Ok(q.zeros_like()?);
    }
    let tq = queries_per_row(q, k, v, visible)?.filter(|_| scale > 0.0 && scale.is_finite());
    let Some(tq) = tq else {
        return Err(Error::InvalidArgument(format!(
            "recomputed attention: q {:?}, k {:?}, v {:?}, {} visible counts, scale {scale}",
            q.dims(),
            k.dims(),
            v.dims(),
            visible.len()
        )));
    };
    let op = RecomputedAttention {
        visible: visible.iter().map(|&n| n as u32).collect(),
        tq,
        scale,
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct RecomputedAttention {
    /// `B·Tq` visible-key counts.
    visible: Vec<u32>,
    /// Queries per batch row.
    tq: usize,
    scale: f32,
}

impl RecomputedAttention {
    /// The prefix softmax of scores `(B, n_kv, G·Tq, Tk)`.
    fn softmax(&self, score_dims: &[usize]) -> PrefixSoftmax {
        let rows_per_batch = score_dims[1] * score_dims[2];
        PrefixSoftmax::new(self.tq, rows_per_batch, self.scale)
    }

    /// The forward on storages of any backend: scores, prefix softmax (`softmax` applies
    /// it to the scores' storage and layout), product with `V`; the scores and
    /// probabilities are dropped on return.
    #[allow(clippy::too_many_arguments)]
    fn forward<S: BackendStorage>(
        &self,
        q: &S,
        lq: &Layout,
        k: &S,
        lk: &Layout,
        v: &S,
        lv: &Layout,
        softmax: impl FnOnce(&PrefixSoftmax, &S, &Layout) -> candle_core::Result<(S, Shape)>,
    ) -> candle_core::Result<(S, Shape)> {
        let (b, n_kv, gq, hd) = lq.shape().dims4()?;
        let tk = lk.dims()[2];
        let scores = q.matmul(k, (b * n_kv, gq, tk, hd), lq, &lk.transpose(2, 3)?)?;
        let ls = Layout::contiguous((b, n_kv, gq, tk));
        let (p, _) = softmax(&self.softmax(ls.dims()), &scores, &ls)?;
        let out = p.matmul(v, (b * n_kv, gq, hd, tk), &ls, lv)?;
        Ok((out, Shape::from((b, n_kv, gq, hd))))
    }
}

impl CustomOp3 for RecomputedAttention {
    fn name(&self) -> &'static str {
        "recomputed-prefix-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let counts = CpuStorage::U32(self.visible.clone());
        let lc = Layout::contiguous(self.visible.len());
        self.forward(q, lq, k, lk, v, lv, |op, s, ls| {
            op.cpu_fwd(s, ls, &counts, &lc)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dev = q.device.clone();
        let counts = dev.clone_htod(self.visible.as_slice())?;
        let counts = candle_core::CudaStorage::wrap_cuda_slice(counts, dev);
        let lc = Layout::contiguous(self.visible.len());
        self.forward(q, lq, k, lk, v, lv, |op, s, ls| {
            op.cuda_fwd(s, ls, &counts, &lc)
        })
    }

    /// With `S = q·Kᵀ` and `P` its prefix softmax, recomputed: `dV = Pᵀ·dO`,
    /// `dP = dO·Vᵀ`, `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`, `dq = dS·K`, `dK = dSᵀ·q`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A GPU's products take no broadcast (zero-stride) operand: the incoming gradient
        // may be one.
        let grad = grad.detach().contiguous()?;
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let counts = Tensor::new(self.visible.as_slice(), q.device())?;
        let p = {
            let scores = q.matmul(&k.t()?)?;
            scores.apply_op2_no_bwd(&counts, &self.softmax(scores.dims()))?
        };
        let dv = p.t()?.matmul(&grad)?;
        let dp = grad.matmul(&v.t()?)?;
        let backward = PrefixSoftmaxBackward { scale: self.scale };
        let ds = p.apply_op2_no_bwd(&dp.contiguous()?, &backward)?;
        let dq = ds.matmul(&k)?;
        let dk = ds.t()?.matmul(&q)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
