//! Grouped-query causal self-attention over an arbitrary token set (Ainslie et al. 2023).

use super::fused::runs_fused;
use super::linear::Projection;
use super::ops::softmax_last_dim;
use super::prefix_attention::prefix_attention;
use super::prefix_softmax::{self, prefix_softmax};
use super::recomputed_attention::recomputed_prefix_attention;
use super::rope::RopeAt;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

/// Additive mask value for a forbidden (query, key) pair in `dtype`. Finite in every dtype
/// (f16 would turn -1e9 into -inf), so that a query with no visible key (a padding slot)
/// yields a uniform, not a NaN, distribution.
pub fn masked_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -1e4,
        _ => -1e9,
    }
}

/// Which keys each query of [`Attention::attend`] sees.
#[derive(Debug, Clone, Copy)]
pub enum Visible<'a> {
    /// Every key: a decode step, whose keys are all earlier and valid.
    All,
    /// An additive mask `(B, 1, Tq, Tk)` (see [`attention_mask`]).
    Mask(&'a Tensor),
    /// A prefix of each row's key slots (keys held in ascending original position, so a
    /// causal query sees a prefix): query slot `t` of row `b` sees keys
    /// `0..counts[b·Tq + t]`; 0 for a padding slot, whose output is zero on the fused and
    /// GPU paths and uniform over the keys on the composed one (it is dropped either way).
    Prefix(&'a [usize]),
}

/// The additive mask `(B, 1, Tq, Tk)` of [`Visible::Prefix`] `counts`, in `like`'s dtype
/// and device.
fn prefix_mask(counts: &[usize], b: usize, tq: usize, tk: usize, like: &Tensor) -> Result<Tensor> {
    if counts.len() != b * tq || counts.iter().any(|&n| n > tk) {
        return Err(Error::InvalidArgument(format!(
            "{} visible-key counts for {b} rows of {tq} queries over {tk} keys",
            counts.len()
        )));
    }
    let mask = prefix_mask_values(counts, tk, masked_value(like.dtype()) as f32);
    Ok(Tensor::from_vec(mask, (b, 1, tq, tk), like.device())?.to_dtype(like.dtype())?)
}

/// The additive mask of prefix `counts` over `tk` key slots, row-major `(counts, tk)`: 0
/// for the first `counts[i]` slots of row i, `masked` after them.
pub(super) fn prefix_mask_values(counts: &[usize], tk: usize, masked: f32) -> Vec<f32> {
    (counts.iter())
        .flat_map(|&n| (0..tk).map(move |j| if j < n { 0.0 } else { masked }))
        .collect()
}

/// Multi-head attention with `n_kv_heads` key/value heads shared by groups of query heads.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    o_proj: Projection,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads `q_proj` `(d, d)`, `k_proj` / `v_proj` `(n_kv·hd, d)`, `o_proj` `(d, d)` from
    /// `vb` (`model.layers.{i}.self_attn`).
    pub fn load(vb: VarBuilder, hidden: usize, n_heads: usize, n_kv_heads: usize) -> Result<Self> {
        let head_dim = hidden / n_heads;
        let kv = n_kv_heads * head_dim;
        Ok(Self {
            q_proj: Projection::load(vb.pp("q_proj"), hidden, hidden)?,
            k_proj: Projection::load(vb.pp("k_proj"), kv, hidden)?,
            v_proj: Projection::load(vb.pp("v_proj"), kv, hidden)?,
            o_proj: Projection::load(vb.pp("o_proj"), hidden, hidden)?,
            n_heads,
            n_kv_heads,
            head_dim,
        })
    }

    /// Keys and values of a token set: `x` `(B, T, d)` (already normalised), rotated at
    /// `rope`'s positions. Returns `(k, v)`, each `(B, n_kv_heads, T, head_dim)`, as a KV
    /// cache stores them.
    pub fn key_values(&self, x: &Tensor, rope: &RopeAt) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, self.n_kv_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, self.n_kv_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        Ok((rope.apply(&k)?, v))
    }

    /// Attention output for queries `x` `(B, Tq, d)` (normalised, rotated at `rope`'s
    /// positions) over keys/values `k`, `v` `(B, n_kv_heads, Tk, head_dim)`, each query
    /// seeing the keys `visible` names. Returns `(B, Tq, d)` after `o_proj`.
    ///
    /// Grouped-query attention without copying K and V per query head: the `G` query heads
    /// that share a KV head are stacked along the query axis, `(B, n_kv, G·Tq, hd)`, so that
    /// one batched product per KV head serves the whole group. [`Visible::Prefix`] on f32
    /// CPU tensors runs the fused kernel of
    /// [`prefix_attention`] (with a backward), and on f32 or bf16 GPU tensors the score
    /// products around the [`prefix_softmax()`] kernel (in training, as one node whose
    /// backward recomputes the scores: [`recomputed_prefix_attention`]);
    /// everything else runs candle's composed ops (scores, additive mask, softmax,
    /// product with V).
    ///
    /// Errors: [`crate::Error::InvalidArgument`] for prefix counts that do not match the
    /// batch and keys; [`crate::Error::Candle`] for misshapen tensors.
    pub fn attend(
        &self,
        x: &Tensor,
        rope: &RopeAt,
        k: &Tensor,
        v: &Tensor,
        visible: Visible,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (n_kv, hd) = (self.n_kv_heads, self.head_dim);
        let groups = self.n_heads / n_kv;
        let tk = k.dim(2)?;
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, self.n_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        // Query head h uses KV head h / G (HF's repeat_kv order).
        let q = rope.apply(&q)?.reshape((b, n_kv, groups * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let fused = runs_fused(&q);
        let out = match visible {
            Visible::Prefix(counts) if fused => prefix_attention(&q, k, v, counts, scale as f32)?,
            // A GPU: the scores, then one kernel for scale, prefix and softmax (no mask);
            // in training, as one node whose backward recomputes them.
            Visible::Prefix(counts) if prefix_softmax::runs_on_gpu(&q) => {
                if q.track_op() || k.track_op() || v.track_op() {
                    recomputed_prefix_attention(&q, k, v, counts, scale as f32)?
                } else {
                    let scores = q.matmul(&k.t()?)?;
                    prefix_softmax(&scores, counts, t, scale as f32)?.matmul(v)?
                }
            }
            visible => {
                let mut scores = (q.matmul(&k.t()?)? * scale)?;
                let mask = match visible {
                    Visible::All => None,
                    Visible::Prefix(counts) if counts.iter().all(|&n| n == tk) => None,
                    Visible::Mask(mask) => Some(mask.clone()),
                    Visible::Prefix(counts) => Some(prefix_mask(counts, b, t, tk, x)?),
                };
                if let Some(mask) = mask {
                    scores = scores
                        .reshape((b, n_kv, groups, t, tk))?
                        .broadcast_add(&mask.unsqueeze(1)?)?
                        .reshape((b, n_kv, groups * t, tk))?;
                }
                softmax_last_dim(&scores)?.matmul(v)?
            }
        };
        let out = out
            .reshape((b, self.n_heads, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, d))?;
        self.o_proj.forward(&out)
    }

    /// The projections by their HF names (`q_proj`, `k_proj`, `v_proj`, `o_proj`).
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Projection); 4] {
        [
            ("q_proj", &mut self.q_proj),
            ("k_proj", &mut self.k_proj),
            ("v_proj", &mut self.v_proj),
            ("o_proj", &mut self.o_proj),
        ]
    }

    /// The projections by their HF names, read-only.
    pub fn projections(&self) -> [(&'static str, &Projection); 4] {
        [
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
            ("o_proj", &self.o_proj),
        ]
    }

    /// Self-attention of a token set on itself: `x` `(B, T, d)` normalised. `(B, T, d)`.
    pub fn forward(&self, x: &Tensor, rope: &RopeAt, mask: &Tensor) -> Result<Tensor> {
        let (k, v) = self.key_values(x, rope)?;
        self.attend(x, rope, &k, &v, Visible::Mask(mask))
    }
}

/// The additive causal mask over ORIGINAL positions: query i may see key j iff key j is
/// valid (not padding, kept at this layer) and `pos_k[j] <= pos_q[i]`.
///
/// `pos_q`: `(B, Tq)` u32; `pos_k`: `(B, Tk)` u32; `valid_k`: `(B, Tk)` u8 (1 = valid).
/// Returns `(B, 1, Tq, Tk)` in `dtype`: 0 where allowed, [`masked_value`] elsewhere (-1e9;
/// -1e4 in f16, whose range ends at 65504, so that the mask never becomes -inf).
pub fn attention_mask(
    pos_q: &Tensor,
    pos_k: &Tensor,
    valid_k: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let causal = pos_k.unsqueeze(1)?.broadcast_le(&pos_q.unsqueeze(2)?)?;
    let allowed = causal.broadcast_mul(&valid_k.unsqueeze(1)?)?;
    let mask = ((allowed.to_dtype(DType::F32)? - 1.0)? * -masked_value(dtype))?;
    Ok(mask.unsqueeze(1)?.to_dtype(dtype)?)
}
