//! Attention of each query over a prefix of its row's keys, fused on the CPU.
//!
//! A query of a (routed or dense) causal layer sees exactly the keys of its row whose
//! original position is not later than its own. Keys are held in ascending position, so
//! that set is a prefix of the row's key slots, and the whole causal mask is one count per
//! query. This kernel computes `softmax(q·Kᵀ · scale) · V` over that prefix for each query
//! in one pass: no `(Tq, Tk)` score or mask tensor is built, masked keys are never
//! touched, and the exponential is a vectorised polynomial instead of scalar `expf`
//! (the composed candle ops spent 40% of a 512-token prefill on attention).
//!
//! Its backward recomputes the probabilities and applies the softmax Jacobian with candle
//! ops, so training runs the same forward. Non-CPU devices build the equivalent additive
//! mask and run the composed ops ([`super::attention::Visible`]).

use super::attention::{masked_value, prefix_mask_values};
use super::vector_math::{exp, lane_max, lane_sum, madd, LANES};
use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Keys per block of the transposed key layout.
const KEY_BLOCK: usize = 64;
/// Width in floats of the register tile of the score and value loops (`GROUP` rows of
/// it) with AVX-512: four 16-lane vectors, 24 of its 32 registers. Also the value tile of
/// a decode step, which streams each value row once.
const TILE_WIDE: usize = 64;
/// The tile width with AVX2 (and in the portable build): AVX2 has 16 registers of 8
/// lanes, so a tile of 64 spilled its sums to the stack on every key (a 2048-token
/// prefill ran 16-30% slower on a Zen 3 EPYC); two vectors of 8 (12 registers) stay put.
const TILE_NARROW: usize = 16;
/// Queries per parallel task.
const QUERY_TASK: usize = 36;

/// `softmax(q·Kᵀ·scale)·V` of each query over its visible prefix of keys.
///
/// - `q`: `(B, n_kv, G·Tq, hd)` f32, the `G` query heads that share KV head `h` stacked
///   along the query axis (query slot `t` of group member `g` at `g·Tq + t`);
/// - `k`, `v`: `(B, n_kv, Tk, hd)` f32, each row's keys in ascending original position
///   (any strides over the first two dimensions; rows of `hd` contiguous values);
/// - `visible`: `B·Tq` counts, row-major: query slot `t` of row `b` sees keys
///   `0..visible[b·Tq + t]` (0: the slot is padding and gets a zero output);
/// - `scale`: the score scale, `1/√hd` for LLaMA.
///
/// Returns `(B, n_kv, G·Tq, hd)` f32, as `softmax(..)·V` of the composed path.
///
/// Errors: [`Error::InvalidArgument`] for mismatched shapes, a count above `Tk`, or `G·Tq`
/// not a multiple of `Tq`; [`Error::Candle`] for a dtype other than f32, a device other
/// than the CPU, or keys whose rows of `hd` values are not contiguous.
pub fn prefix_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let Some(tq) = queries_per_row(q, k, v, visible)? else {
        return Err(Error::InvalidArgument(format!(
            "prefix attention: queries {:?}, keys {:?}, values {:?} and {} visible counts \
             do not fit together",
            q.dims(),
            k.dims(),
            v.dims(),
            visible.len()
        )));
    };
    let op = PrefixAttention {
        visible: visible.to_vec(),
        tq,
        scale,
    };
    Ok(q.contiguous()?.apply_op3(k, v, op)?)
}

/// `Tq`, the queries per batch row, when `q` `(B, n_kv, G·Tq, hd)`, `k` and `v`
/// `(B, n_kv, Tk, hd)` and the `B·Tq` `visible` counts (each at most `Tk`) fit together as
/// [`prefix_attention`] takes them; `None` when they do not.
///
/// Errors: [`Error::Candle`] when a tensor is not 4-D.
pub(super) fn queries_per_row(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &[usize],
) -> Result<Option<usize>> {
    let (b, n_kv, gq, hd) = q.dims4()?;
    let (kb, k_heads, tk, k_hd) = k.dims4()?;
    let tq = visible.len() / b.max(1);
    let fits = k.dims() == v.dims()
        && (kb, k_heads, k_hd) == (b, n_kv, hd)
        && tq > 0
        && visible.len() == b * tq
        && gq % tq == 0
        && visible.iter().all(|&n| n <= tk);
    Ok(fits.then_some(tq))
}

struct PrefixAttention {
    visible: Vec<usize>,
    tq: usize,
    scale: f32,
}

/// A `(B, n_kv, T, hd)` operand as a slice and the offsets of its `(b, h)` planes.
struct Planes<'a> {
    data: &'a [f32],
    start: usize,
    stride_b: usize,
    stride_h: usize,
}

impl<'a> Planes<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Self> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("prefix attention runs on f32 only");
        };
        let (_, _, t, hd) = layout.shape().dims4()?;
        let stride = layout.stride();
        // A dimension of size 1 may carry any stride.
        if (hd > 1 && stride[3] != 1) || (t > 1 && stride[2] != hd) {
            candle_core::bail!("prefix attention needs rows of contiguous head values");
        }
        Ok(Self {
            data,
            start: layout.start_offset(),
            stride_b: stride[0],
            stride_h: stride[1],
        })
    }

    /// The first `len` values of plane `(b, h)`.
    fn plane(&self, b: usize, h: usize, len: usize) -> &'a [f32] {
        &self.data[self.start + b * self.stride_b + h * self.stride_h..][..len]
    }
}

impl CustomOp3 for PrefixAttention {
    fn name(&self) -> &'static str {
        "prefix-attention"
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
        let (b, n_kv, gq, hd) = l1.shape().dims4()?;
        let tk = l2.shape().dims4()?.2;
        let (q, k, v) = (
            Planes::new(s1, l1)?,
            Planes::new(s2, l2)?,
            Planes::new(s3, l3)?,
        );
        let tk_pad = tk.div_ceil(KEY_BLOCK) * KEY_BLOCK;
        if gq <= GROUP {
            // A decode step: each plane's queries are one group. Transposing the keys would
            // cost as much as reading them once; the planes run on the threads that stay
            // awake between the step's products (waking rayon's cost more than a plane).
            let plane_len = gq * hd;
            let mut out = vec![0f32; b * n_kv * plane_len];
            let kernel = kernel(Keys::Rows);
            super::awake_pool::fill_parts(
                &mut out,
                plane_len,
                plane_len,
                super::awake_pool::Next::Soon,
                |offset, part| {
                    let mut group = Group::new(hd, tk_pad);
                    for (i, out_plane) in part.chunks_mut(plane_len).enumerate() {
                        let plane = offset / plane_len + i;
                        let (bi, h) = (plane / n_kv, plane % n_kv);
                        let visible = &self.visible[bi * self.tq..][..self.tq];
                        group.load(q.plane(bi, h, plane_len), |r| visible[r % self.tq]);
                        let (keys, values) = (k.plane(bi, h, tk * hd), v.plane(bi, h, tk * hd));
                        kernel(&mut group, keys, values, self.scale, out_plane);
                    }
                },
            );
            return Ok((CpuStorage::F32(out), Shape::from((b, n_kv, gq, hd))));
        }
        // Keys transposed per plane in blocks of `KEY_BLOCK` keys, `(blocks, hd, KEY_BLOCK)`,
        // so that the score loop reads each block as one contiguous run.
        let planes: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..n_kv).map(move |h| (bi, h)))
            .collect();
        let keys_t: Vec<Vec<f32>> = planes
            .par_iter()
            .map(|&(bi, h)| transpose_keys(k.plane(bi, h, tk * hd), tk, hd, tk_pad))
            .collect();
        let kernel = kernel(Keys::Transposed);
        let mut out = vec![0f32; b * n_kv * gq * hd];
        (out.par_chunks_mut(gq * hd)
            .zip(planes.par_iter())
            .zip(&keys_t))
        .for_each(|((out_plane, &(bi, h)), kt)| {
            let (qp, vp) = (q.plane(bi, h, gq * hd), v.plane(bi, h, tk * hd));
            let visible = &self.visible[bi * self.tq..][..self.tq];
            (out_plane.par_chunks_mut(QUERY_TASK * hd).enumerate()).for_each(|(task, out_task)| {
                let mut group = Group::new(hd, tk_pad);
                let first = task * QUERY_TASK;
                for (i, out) in out_task.chunks_mut(GROUP * hd).enumerate() {
                    let slots = first + i * GROUP..first + i * GROUP + out.len() / hd;
                    group.load(&qp[slots.start * hd..slots.end * hd], |r| {
                        visible[(slots.start + r) % self.tq]
                    });
                    kernel(&mut group, kt, vp, self.scale, out);
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n_kv, gq, hd))))
    }

    /// Gradients of `q`, `k` and `v` from the output's gradient `dO`, with the
    /// probabilities `P` recomputed (the forward keeps no `(Tq, Tk)` tensor):
    /// `dV = Pᵀ·dO`, `dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O))`, `dQ = dS·K·scale`,
    /// `dK = dSᵀ·Q·scale` (the softmax Jacobian; Dao et al. 2022, FlashAttention, eq. in
    /// its appendix B.2). Built from candle ops on detached tensors.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n_kv, gq, _) = q.dims4()?;
        let tk = k.dim(2)?;
        let (tq, groups) = (self.tq, gq / self.tq);
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (out, grad) = (out.detach(), grad.detach().contiguous()?);
        // The additive prefix mask, and which query slots see any key at all (a padding
        // slot sees none: its output is zero, and so are its probabilities here).
        let masked = masked_value(DType::F32) as f32;
        let mask = prefix_mask_values(&self.visible, tk, masked);
        let mask = Tensor::from_vec(mask, (b, 1, 1, tq, tk), q.device())?;
        let seen: Vec<f32> = (self.visible.iter()).map(|&n| f32::from(n > 0)).collect();
        let seen = Tensor::from_vec(seen, (b, 1, 1, tq, 1), q.device())?;
        let scores = (q.matmul(&k.t()?)? * self.scale as f64)?
            .reshape((b, n_kv, groups, tq, tk))?
            .broadcast_add(&mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?
            .broadcast_mul(&seen)?
            .reshape((b, n_kv, gq, tk))?;
        let dv = probs.t()?.matmul(&grad)?;
        let dp = grad.matmul(&v.t()?)?;
        let row = (&grad * &out)?.sum_keepdim(3)?;
        let ds = (probs * dp.broadcast_sub(&row)?)?;
        let dq = (ds.matmul(&k.contiguous()?)? * self.scale as f64)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale as f64)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `k` `(Tk, hd)` row-major as blocks of `KEY_BLOCK` keys transposed,
/// `(tk_pad / KEY_BLOCK, hd, KEY_BLOCK)`, zero beyond `Tk`.
fn transpose_keys(k: &[f32], tk: usize, hd: usize, tk_pad: usize) -> Vec<f32> {
    let mut kt = vec![0f32; hd * tk_pad];
    for (j, row) in k.chunks_exact(hd).take(tk).enumerate() {
        let block = &mut kt[j / KEY_BLOCK * hd * KEY_BLOCK..][..hd * KEY_BLOCK];
        for (d, &x) in row.iter().enumerate() {
            block[d * KEY_BLOCK + j % KEY_BLOCK] = x;
        }
    }
    kt
}

/// Queries computed together: each key and value read serves all of them.
const GROUP: usize = 6;

/// A group of up to [`GROUP`] queries of one plane and the scratch they are computed in.
struct Group {
    /// `(GROUP, hd)`: the queries, zero past the last real one.
    queries: Vec<f32>,
    /// Visible keys per query (0 past the last real one).
    visible: [usize; GROUP],
    /// `(GROUP, tk_pad)`: scores, then probabilities, 0 past each query's visible keys.
    scores: Vec<f32>,
    hd: usize,
    tk_pad: usize,
}

impl Group {
    fn new(hd: usize, tk_pad: usize) -> Self {
        Self {
            queries: vec![0.0; GROUP * hd],
            visible: [0; GROUP],
            scores: vec![0.0; GROUP * tk_pad],
            hd,
            tk_pad,
        }
    }

    /// Takes the queries `q` `(m, hd)`, `m ≤ GROUP`, query `r` seeing `visible(r)` keys.
    fn load(&mut self, q: &[f32], visible: impl Fn(usize) -> usize) {
        self.queries.fill(0.0);
        self.queries[..q.len()].copy_from_slice(q);
        let m = q.len() / self.hd;
        for (r, n) in self.visible.iter_mut().enumerate() {
            *n = if r < m { visible(r) } else { 0 };
        }
    }
}

/// How a kernel reads a plane's keys.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keys {
    /// In transposed blocks (see [`transpose_keys`]): each block of `KEY_BLOCK` keys is
    /// read once for all the group's queries, at full vector width.
    Transposed,
    /// `(Tk, hd)` row-major, as stored: one dot product per query and key, for a group
    /// too small to pay for the transposition.
    Rows,
}

/// A group's attention: `(group, keys, values, scale, out)`, `out` `(m, hd)`, the keys laid
/// out as the kernel's [`Keys`] says.
type Kernel = fn(&mut Group, &[f32], &[f32], f32, &mut [f32]);

/// The group kernel for keys laid out as `keys`, compiled for the widest vector
/// instructions this CPU has.
fn kernel(keys: Keys) -> Kernel {
    let rows = keys == Keys::Rows;
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY (both): the CPU supports AVX-512F, checked just above.
            return match rows {
                false => |g, k, v, s, o| unsafe { group_avx512::<false>(g, k, v, s, o) },
                true => |g, k, v, s, o| unsafe { group_avx512::<true>(g, k, v, s, o) },
            };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY (both): the CPU supports AVX2 and FMA, checked just above.
            return match rows {
                false => |g, k, v, s, o| unsafe { group_avx2::<false>(g, k, v, s, o) },
                true => |g, k, v, s, o| unsafe { group_avx2::<true>(g, k, v, s, o) },
            };
        }
    }
    match rows {
        false => attend_group::<false, false, TILE_NARROW>,
        true => attend_group::<false, true, TILE_NARROW>,
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn group_avx512<const ROWS: bool>(
    group: &mut Group,
    keys: &[f32],
    v: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    attend_group::<true, ROWS, TILE_WIDE>(group, keys, v, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn group_avx2<const ROWS: bool>(
    group: &mut Group,
    keys: &[f32],
    v: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    attend_group::<true, ROWS, TILE_NARROW>(group, keys, v, scale, out)
}

/// `out[r] = softmax(q_r·K[..n_r]ᵀ·scale)·V[..n_r]` for the group's queries; zero where
/// `n_r = 0`. `keys`: row-major `(Tk, hd)` if `ROWS`, else in transposed blocks; `v`:
/// `(Tk, hd)`. Plain loops over register tiles `W` floats wide, so that they vectorise at
/// the width the caller is compiled for.
#[inline(always)]
fn attend_group<const FMA: bool, const ROWS: bool, const W: usize>(
    group: &mut Group,
    keys: &[f32],
    v: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let longest = group.visible.iter().copied().max().unwrap_or(0);
    let blocks = longest.div_ceil(KEY_BLOCK);
    // Scores of every query against the keys any of them sees.
    if ROWS {
        row_scores::<FMA>(group, keys, longest, out.len() / group.hd, scale);
        // A decode step is bound by reading the cache: one pass over each value row (a
        // tile as wide as the head) streams it once; narrow tiles would sweep it four times.
        softmax_and_values::<FMA, TILE_WIDE>(group, v, blocks, longest, out);
    } else {
        transposed_scores::<FMA, W>(group, keys, blocks, scale);
        softmax_and_values::<FMA, W>(group, v, blocks, longest, out);
    }
}

/// Scores of the group's queries against `blocks` blocks of transposed keys, `W` keys of
/// a block at a time: `GROUP × W` sums in registers.
#[inline(always)]
fn transposed_scores<const FMA: bool, const W: usize>(
    group: &mut Group,
    kt: &[f32],
    blocks: usize,
    scale: f32,
) {
    let (hd, tk_pad) = (group.hd, group.tk_pad);
    for (block, keys) in kt.chunks_exact(hd * KEY_BLOCK).take(blocks).enumerate() {
        for first in (0..KEY_BLOCK).step_by(W) {
            let acc = score_tile::<FMA, W>(&group.queries, hd, &keys[first..]);
            for (r, acc) in acc.iter().enumerate() {
                let s = &mut group.scores[r * tk_pad + block * KEY_BLOCK + first..][..W];
                for l in 0..W {
                    s[l] = acc[l] * scale;
                }
            }
        }
    }
}

/// `q_r · k_l` for the group's queries `r` (`queries` `(GROUP, hd)`) and `W` keys of a
/// transposed block (`keys[d · KEY_BLOCK + l]` is dimension d of key l). A function of
/// its own for the same reason as [`value_block`].
#[inline(always)]
fn score_tile<const FMA: bool, const W: usize>(
    queries: &[f32],
    hd: usize,
    keys: &[f32],
) -> [[f32; W]; GROUP] {
    let mut acc = [[0f32; W]; GROUP];
    for d in 0..hd {
        let k = &keys[d * KEY_BLOCK..][..W];
        let q: [f32; GROUP] = std::array::from_fn(|r| queries[r * hd + d]);
        for r in 0..GROUP {
            for l in 0..W {
                acc[r][l] = madd::<FMA>(q[r], k[l], acc[r][l]);
            }
        }
    }
    acc
}

/// Scores of the first `rows` queries against the first `longest` keys of `k` `(Tk, hd)`
/// row-major: one dot product with `LANES` partial sums per query and key.
#[inline(always)]
fn row_scores<const FMA: bool>(
    group: &mut Group,
    k: &[f32],
    longest: usize,
    rows: usize,
    scale: f32,
) {
    let (hd, tk_pad) = (group.hd, group.tk_pad);
    let whole = hd / LANES * LANES;
    for (j, key) in k.chunks_exact(hd).take(longest).enumerate() {
        for r in 0..rows {
            let q = &group.queries[r * hd..][..hd];
            let mut acc = [0f32; LANES];
            for (qc, kc) in q[..whole].chunks_exact(LANES).zip(key.chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] = madd::<FMA>(qc[l], kc[l], acc[l]);
                }
            }
            let tail: f32 = (q[whole..].iter().zip(&key[whole..]))
                .map(|(a, b)| a * b)
                .sum();
            group.scores[r * tk_pad + j] = (acc.iter().sum::<f32>() + tail) * scale;
        }
    }
}

/// `Σ_j p_rj · V_j[start..start + W]` for each query `r` of the group, over the
/// keys `j < probs[r].len()` (every row of `probs` as long, at most `v`'s rows). The sums
/// live in registers: a function of their own, so that nothing else takes the address of
/// `acc` (sharing it with the narrow loop made LLVM store all 24 vectors on every key).
#[inline(always)]
fn value_block<const FMA: bool, const W: usize>(
    v: &[f32],
    hd: usize,
    start: usize,
    probs: &[&[f32]; GROUP],
) -> [[f32; W]; GROUP] {
    let mut acc = [[0f32; W]; GROUP];
    let keys = probs[0].len();
    let probs: [&[f32]; GROUP] = std::array::from_fn(|r| &probs[r][..keys]);
    for (j, row) in v.chunks_exact(hd).take(keys).enumerate() {
        let value = &row[start..][..W];
        let p: [f32; GROUP] = std::array::from_fn(|r| probs[r][j]);
        for r in 0..GROUP {
            for l in 0..W {
                acc[r][l] = madd::<FMA>(p[r], value[l], acc[r][l]);
            }
        }
    }
    acc
}

/// [`value_block`] for the last `hd - start < W` head dimensions (zero beyond).
#[inline(always)]
fn narrow_value_block<const FMA: bool, const W: usize>(
    v: &[f32],
    hd: usize,
    start: usize,
    probs: &[&[f32]; GROUP],
) -> [[f32; W]; GROUP] {
    let mut acc = [[0f32; W]; GROUP];
    for (j, row) in v.chunks_exact(hd).take(probs[0].len()).enumerate() {
        for (acc, probs) in acc.iter_mut().zip(probs) {
            for (a, &x) in acc.iter_mut().zip(&row[start..]) {
                *a = madd::<FMA>(probs[j], x, *a);
            }
        }
    }
    acc
}

/// Softmax of each query's scores over its visible keys, then `out[r] = Σ_j p_rj · V_j`.
#[inline(always)]
fn softmax_and_values<const FMA: bool, const W: usize>(
    group: &mut Group,
    v: &[f32],
    blocks: usize,
    longest: usize,
    out: &mut [f32],
) {
    let (hd, tk_pad) = (group.hd, group.tk_pad);
    // Softmax of each query over its own visible keys; 0 beyond them.
    let mut inv = [0f32; GROUP];
    for (r, &n) in group.visible.iter().enumerate() {
        let row = &mut group.scores[r * tk_pad..][..blocks * KEY_BLOCK];
        let (seen, unseen) = row.split_at_mut(n);
        unseen.fill(0.0);
        if n > 0 {
            let max = lane_max(seen);
            for s in seen.iter_mut() {
                *s = exp(*s - max);
            }
            inv[r] = 1.0 / lane_sum(seen);
        }
    }
    // The weighted sums of values, `W` head dimensions at a time in registers
    // (a head width that is not a multiple of it takes the narrower remainder pass).
    let rows = out.len() / hd;
    let probs: [&[f32]; GROUP] = std::array::from_fn(|r| &group.scores[r * tk_pad..][..longest]);
    for start in (0..hd).step_by(W) {
        let w = W.min(hd - start);
        let acc = if w == W {
            value_block::<FMA, W>(v, hd, start, &probs)
        } else {
            narrow_value_block::<FMA, W>(v, hd, start, &probs)
        };
        for r in 0..rows {
            for (o, a) in out[r * hd + start..][..w].iter_mut().zip(acc[r]) {
                *o = a * inv[r];
            }
        }
    }
}
