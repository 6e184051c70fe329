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
                    let mut group = [Group::new(hd, tk_pad)];
                    for (i, out_plane) in part.chunks_mut(plane_len).enumerate() {
                        let plane = offset / plane_len + i;
                        let (bi, h) = (plane / n_kv, plane % n_kv);
                        let visible = &self.visible[bi * self.tq..][..self.tq];
                        let queries = q.plane(bi, h, plane_len);
                        group[0].load(queries, self.scale, |r| visible[r % self.tq]);
                        let (keys, values) = (k.plane(bi, h, tk * hd), v.plane(bi, h, tk * hd));
                        kernel(&mut group, keys, values, out_plane);
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
            let task_groups = || -> Vec<Group> {
                (0..QUERY_TASK / GROUP)
                    .map(|_| Group::new(hd, tk_pad))
                    .collect()
            };
            (out_plane.par_chunks_mut(QUERY_TASK * hd).enumerate()).for_each_init(
                task_groups,
                |groups, (task, out_task)| {
                    let first = task * QUERY_TASK;
                    let used = out_task.len().div_ceil(GROUP * hd);
                    for (i, group) in groups[..used].iter_mut().enumerate() {
                        let slots = first + i * GROUP..(first + (i + 1) * GROUP).min(gq);
                        group.load(&qp[slots.start * hd..slots.end * hd], self.scale, |r| {
                            visible[(slots.start + r) % self.tq]
                        });
                    }
                    kernel(&mut groups[..used], kt, vp, out_task);
                },
            );
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

/// Keys that every group of a task takes in turn, in the score pass and again in the
/// value pass: their transposed keys and values (64 KiB each at head width 64) stay in
/// the L2 cache while all the task's groups read them, instead of each group streaming
/// the whole prefix (1 MiB of keys and values at 2048 tokens). Worth 2-5% at 2048 tokens
/// on a Zen 3 (41-42 against 43 ms a layer); 64 and 128 were no better. A multiple of
/// [`KEY_BLOCK`].
const KEY_SPAN: usize = 256;

/// A group of up to [`GROUP`] queries of one plane and the scratch they are computed in.
struct Group {
    /// `(GROUP, hd)`: the queries times the score scale, zero past the last real one.
    queries: Vec<f32>,
    /// Real queries (the rest of the group is padding).
    rows: usize,
    /// Visible keys per query (0 past the last real one).
    visible: [usize; GROUP],
    /// `(GROUP, tk_pad)`: scores, then `exp(score − max)`, 0 past each query's visible keys.
    scores: Vec<f32>,
    /// `(GROUP, hd)`: `Σ_j exp(s_rj − max_r) · V_j` over the keys taken so far.
    sums: Vec<f32>,
    /// `1 / Σ_j exp(s_rj − max_r)` per query, 0 for a query that sees no key.
    inv: [f32; GROUP],
    hd: usize,
    tk_pad: usize,
}

impl Group {
    fn new(hd: usize, tk_pad: usize) -> Self {
        Self {
            queries: vec![0.0; GROUP * hd],
            rows: 0,
            visible: [0; GROUP],
            scores: vec![0.0; GROUP * tk_pad],
            sums: vec![0.0; GROUP * hd],
            inv: [0.0; GROUP],
            hd,
            tk_pad,
        }
    }

    /// Takes the queries `q` `(m, hd)`, `m ≤ GROUP`, scaled by `scale`, query `r` seeing
    /// `visible(r)` keys.
    fn load(&mut self, q: &[f32], scale: f32, visible: impl Fn(usize) -> usize) {
        self.queries.fill(0.0);
        for (slot, &x) in self.queries.iter_mut().zip(q) {
            *slot = x * scale;
        }
        self.rows = q.len() / self.hd;
        for (r, n) in self.visible.iter_mut().enumerate() {
            *n = if r < self.rows { visible(r) } else { 0 };
        }
        self.sums.fill(0.0);
    }

    /// Keys that any of the group's queries sees.
    #[inline(always)]
    fn longest(&self) -> usize {
        self.visible.iter().copied().max().unwrap_or(0)
    }

    /// The keys of the span `span..span + KEY_SPAN` that the group sees (maybe none).
    #[inline(always)]
    fn keys_in(&self, span: usize) -> std::ops::Range<usize> {
        span..self.longest().clamp(span, span + KEY_SPAN)
    }

    /// Each query's scores over its visible keys become `exp(score − max)`, 0 past them
    /// up to the group's last key block; `inv` the reciprocals of their sums.
    #[inline(always)]
    fn softmax(&mut self) {
        let end = self.longest().div_ceil(KEY_BLOCK) * KEY_BLOCK;
        for (r, &n) in self.visible.iter().enumerate() {
            let row = &mut self.scores[r * self.tk_pad..][..end];
            let (seen, unseen) = row.split_at_mut(n);
            unseen.fill(0.0);
            self.inv[r] = 0.0;
            if n > 0 {
                let max = lane_max(seen);
                for s in seen.iter_mut() {
                    *s = exp(*s - max);
                }
                self.inv[r] = 1.0 / lane_sum(seen);
            }
        }
    }

    /// `out` `(rows, hd)`: the weighted sums of values, normalised.
    #[inline(always)]
    fn write(&self, out: &mut [f32]) {
        for (r, out) in out.chunks_mut(self.hd).enumerate() {
            for (o, s) in out.iter_mut().zip(&self.sums[r * self.hd..]) {
                *o = s * self.inv[r];
            }
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

/// The attention of groups of one plane: `(groups, keys, values, out)`, `out` the
/// groups' outputs one after the other (`(m, hd)` each), the keys laid out as the
/// kernel's [`Keys`] says.
type Kernel = fn(&mut [Group], &[f32], &[f32], &mut [f32]);

/// The kernel for keys laid out as `keys`, compiled for the widest vector instructions
/// this CPU has.
fn kernel(keys: Keys) -> Kernel {
    let rows = keys == Keys::Rows;
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY (both): the CPU supports AVX-512F, checked just above.
            return match rows {
                false => |g, k, v, o| unsafe { groups_avx512::<false>(g, k, v, o) },
                true => |g, k, v, o| unsafe { groups_avx512::<true>(g, k, v, o) },
            };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY (both): the CPU supports AVX2 and FMA, checked just above.
            return match rows {
                false => |g, k, v, o| unsafe { groups_avx2::<false>(g, k, v, o) },
                true => |g, k, v, o| unsafe { groups_avx2::<true>(g, k, v, o) },
            };
        }
    }
    match rows {
        false => attend_groups::<false, false, TILE_NARROW>,
        true => attend_groups::<false, true, TILE_NARROW>,
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn groups_avx512<const ROWS: bool>(groups: &mut [Group], keys: &[f32], v: &[f32], out: &mut [f32]) {
    attend_groups::<true, ROWS, TILE_WIDE>(groups, keys, v, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn groups_avx2<const ROWS: bool>(groups: &mut [Group], keys: &[f32], v: &[f32], out: &mut [f32]) {
    attend_groups::<true, ROWS, TILE_NARROW>(groups, keys, v, out)
}

/// `out[r] = softmax(q_r·K[..n_r]ᵀ·scale)·V[..n_r]` for each group's queries; zero where
/// `n_r = 0`. `keys`: row-major `(Tk, hd)` if `ROWS`, else in transposed blocks; `v`:
/// `(Tk, hd)`. The keys are taken [`KEY_SPAN`] at a time by every group in turn (two
/// passes, so that each query's maximum is known before its values are summed). Plain
/// loops over register tiles `W` floats wide, so that they vectorise at the width the
/// caller is compiled for.
#[inline(always)]
fn attend_groups<const FMA: bool, const ROWS: bool, const W: usize>(
    groups: &mut [Group],
    keys: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    let longest = groups.iter().map(Group::longest).max().unwrap_or(0);
    for span in (0..longest).step_by(KEY_SPAN) {
        for group in groups.iter_mut() {
            let seen = group.keys_in(span);
            match ROWS {
                true => row_scores::<FMA>(group, keys, seen),
                false => transposed_scores::<FMA, W>(group, keys, seen),
            }
        }
    }
    for group in groups.iter_mut() {
        group.softmax();
    }
    for span in (0..longest).step_by(KEY_SPAN) {
        for group in groups.iter_mut() {
            let seen = group.keys_in(span);
            match ROWS {
                // A decode step is bound by reading the cache: one pass over each value
                // row (a tile as wide as the head) streams it once; narrow tiles would
                // sweep it four times.
                true => add_values::<FMA, TILE_WIDE>(group, v, seen),
                false => add_values::<FMA, W>(group, v, seen),
            }
        }
    }
    let hd = groups.first().map_or(1, |g| g.hd);
    for (group, out) in groups.iter().zip(out.chunks_mut(GROUP * hd)) {
        group.write(out);
    }
}

/// Scores of the group's queries against the blocks of transposed keys that hold `seen`,
/// `W` keys of a block at a time: `GROUP × W` sums in registers.
#[inline(always)]
fn transposed_scores<const FMA: bool, const W: usize>(
    group: &mut Group,
    kt: &[f32],
    seen: std::ops::Range<usize>,
) {
    let (hd, tk_pad) = (group.hd, group.tk_pad);
    for block in seen.start / KEY_BLOCK..seen.end.div_ceil(KEY_BLOCK) {
        let keys = &kt[block * hd * KEY_BLOCK..][..hd * KEY_BLOCK];
        for first in (0..KEY_BLOCK).step_by(W) {
            let acc = score_tile::<FMA, W>(&group.queries, hd, &keys[first..]);
            for (r, acc) in acc.iter().enumerate() {
                group.scores[r * tk_pad + block * KEY_BLOCK + first..][..W].copy_from_slice(acc);
            }
        }
    }
}

/// `q_r · k_l` for the group's queries `r` (`queries` `(GROUP, hd)`) and `W` keys of a
/// transposed block (`keys[d · KEY_BLOCK + l]` is dimension d of key l). A function of
/// its own for the same reason as [`value_block`]; the queries are sliced to `hd` first
/// so that no bounds check sits in the loop (one did, and the tile went to the stack).
#[inline(always)]
fn score_tile<const FMA: bool, const W: usize>(
    queries: &[f32],
    hd: usize,
    keys: &[f32],
) -> [[f32; W]; GROUP] {
    let mut acc = [[0f32; W]; GROUP];
    let queries: [&[f32]; GROUP] = std::array::from_fn(|r| &queries[r * hd..][..hd]);
    for d in 0..hd {
        let k = &keys[d * KEY_BLOCK..][..W];
        for r in 0..GROUP {
            let q = queries[r][d];
            for l in 0..W {
                acc[r][l] = madd::<FMA>(q, k[l], acc[r][l]);
            }
        }
    }
    acc
}

/// Scores of the group's queries against the keys `seen` of `k` `(Tk, hd)` row-major: one
/// dot product with `LANES` partial sums per query and key.
#[inline(always)]
fn row_scores<const FMA: bool>(group: &mut Group, k: &[f32], seen: std::ops::Range<usize>) {
    let (hd, tk_pad) = (group.hd, group.tk_pad);
    let whole = hd / LANES * LANES;
    for j in seen {
        let key = &k[j * hd..][..hd];
        for r in 0..group.rows {
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
            group.scores[r * tk_pad + j] = acc.iter().sum::<f32>() + tail;
        }
    }
}

/// Adds `Σ_j p_rj · V_j` over the keys `seen` to the group's sums, `W` head dimensions at a
/// time in registers (a head width that is not a multiple of `W` takes the narrower
/// remainder pass).
#[inline(always)]
fn add_values<const FMA: bool, const W: usize>(
    group: &mut Group,
    v: &[f32],
    seen: std::ops::Range<usize>,
) {
    let (hd, tk_pad) = (group.hd, group.tk_pad);
    let scores = &group.scores;
    let probs: [&[f32]; GROUP] =
        std::array::from_fn(|r| &scores[r * tk_pad + seen.start..][..seen.len()]);
    let v = &v[seen.start * hd..seen.end * hd];
    // Loops of constant length over the tile, so that it stays in registers.
    for start in (0..hd).step_by(W) {
        if start + W <= hd {
            let acc = value_block::<FMA, W>(v, hd, start, &probs);
            for (r, acc) in acc.iter().enumerate() {
                for (s, a) in group.sums[r * hd + start..][..W].iter_mut().zip(acc) {
                    *s += a;
                }
            }
        } else {
            let acc = narrow_value_block::<FMA, W>(v, hd, start, &probs);
            for (r, acc) in acc.iter().enumerate() {
                for (s, a) in group.sums[r * hd + start..(r + 1) * hd].iter_mut().zip(acc) {
                    *s += a;
                }
            }
        }
    }
}

/// `Σ_j p_rj · V_j[start..start + W]` for each query `r` of the group, over the
/// keys `j < probs[r].len()` (every row of `probs` as long, at most `v`'s rows). The sums
/// live in registers only while every loop that touches `acc` has a constant length:
/// sharing it with the narrow loop, or reading it back row by row up to a variable count,
/// made LLVM store the whole tile to the stack on every key (on a Zen 3 the kernel ran
/// at 65-75 GFLOP/s that way, 96-118 without: PyTorch's SDPA 64-109).
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
