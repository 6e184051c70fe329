//! One decoder layer over a subset of tokens: the only place a layer is computed in a
//! [`super::ModModel`], whether it is routed or dense, with or without a KV cache, and the
//! only place its FLOPs are counted.
//!
//! A call names two token sets of the batch: the *queries* (tokens the layer computes and
//! whose update is added to the residual stream) and the *writers* (tokens that write keys
//! and values at this layer). A dense layer has every token in both; a routed layer's
//! queries are its kept tokens, and its writers are the kept tokens under
//! [`KvPolicy::Skip`](crate::mixture_of_depths::KvPolicy::Skip) or every token under `Keep`. The
//! keys a query attends to are the cache's entries of its row (when a cache is given),
//! then this call's writers, causally by original position.
//!
//! Training computes every token of a routed layer (queries and writers are all tokens)
//! so that every gate gets a gradient, weighted by the hard decision; its FLOPs are
//! counted by the caller as those of the sparse layer the same decisions give at
//! inference ([`layer_cost`]).

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::model::flops::layer_flops;
use crate::model::fused::runs_fused;
use crate::model::kv_cache::{KvCache, LayerKeys};
use crate::model::prefix_softmax;
use crate::model::{attention_mask, Batch, Block, RotaryEmbedding, Visible};
use crate::routing::{Dispatch, Selection};
use candle_core::{DType, Device, IndexOp, Tensor};

/// Which of the keys a query may see.
pub(super) enum Keys<'a> {
    /// The cache's entries of the query's row and this call's writers, causally by
    /// original position.
    Causal,
    /// For training under [`KvPolicy::Skip`](crate::mixture_of_depths::KvPolicy::Skip), where every token is a query and a writer
    /// (a skipped token's update is computed for its gate's gradient only): causally, the
    /// kept tokens and the query itself, as if the query were kept. `kept`: `(B, T)` f32
    /// 0/1. Only without a cache.
    KeptOrSelf(&'a Tensor),
}

/// The token sets of one call of a layer.
pub(super) struct LayerTokens<'a> {
    /// Tokens computed by the layer.
    pub queries: &'a Selection,
    /// Tokens that write keys and values (a superset of the queries).
    pub writers: &'a Selection,
    /// Per-token output weight `(B, T)` f32 (the gate for `Multiply` scaling; in
    /// training, the hard decision that carries the gate's gradient); `None` adds each
    /// query's update with weight 1.
    pub weights: Option<&'a Tensor>,
    /// Which keys a query sees.
    pub keys: Keys<'a>,
}

/// Runs `layer` (index `j`) on the queries of `x` `(B, T, d)` and returns the new
/// residual stream `(B, T, d)` and the FLOPs spent (see [`layer_cost`]). With a `cache`,
/// the writers' keys and values are appended to it first and the queries attend to
/// everything the cache holds for their row.
#[allow(clippy::too_many_arguments)]
pub(super) fn sparse_layer(
    layer: &Block,
    j: usize,
    x: &Tensor,
    batch: &Batch,
    rope: &RotaryEmbedding,
    cfg: &LlamaConfig,
    tokens: LayerTokens,
    cache: Option<&mut KvCache>,
) -> Result<(Tensor, f64)> {
    let (dtype, device) = (x.dtype(), x.device().clone());
    let normed = layer.normed_input(x)?;
    let writers = Dispatch::new(tokens.writers, &device, dtype)?;
    let mut keys = match &writers {
        None => None,
        Some(dw) => {
            let positions = dw.gather_tokens(batch.positions())?;
            let (k, v) = layer
                .attention()
                .key_values(&dw.gather(&normed)?, &rope.at(&positions, dtype)?)?;
            Some(LayerKeys {
                k,
                v,
                positions,
                valid: dw.valid().clone(),
                lengths: tokens.writers.kept_per_row(),
                row_positions: absolute_positions(tokens.writers, batch),
            })
        }
    };
    if let Some(cache) = cache {
        if let Some(new) = &keys {
            // Positions come from the host copy: no read-back from the device.
            for (row, &n) in new.lengths.iter().enumerate().filter(|(_, &n)| n > 0) {
                let k = new.k.i(row..row + 1)?.narrow(2, 0, n)?;
                let v = new.v.i(row..row + 1)?.narrow(2, 0, n)?;
                cache.append(j, row, &k, &v, &new.row_positions[row])?;
            }
        }
        keys = cache.layer_keys(j, &device, dtype, cfg.num_kv_heads(), cfg.head_dim())?;
    }
    let same_tokens =
        std::ptr::eq(tokens.queries, tokens.writers) || tokens.queries == tokens.writers;
    let queries = match (same_tokens, writers) {
        (true, dw) => dw,
        (false, _) => Dispatch::new(tokens.queries, &device, dtype)?,
    };
    // Writers' keys and values are computed (and cached) even when no query follows.
    let key_lengths = match &keys {
        Some(keys) => keys.lengths.clone(),
        None => vec![0; batch.batch_size()],
    };
    let spent = layer_cost(cfg, tokens.queries, tokens.writers, &key_lengths);
    let (Some(dq), Some(keys)) = (queries, keys) else {
        return Ok((x.clone(), spent));
    };
    let pos_q = dq.gather_tokens(batch.positions())?;
    let kept_k = match tokens.keys {
        Keys::Causal => None,
        Keys::KeptOrSelf(kept) => Some(dq.gather_tokens(kept)?),
    };
    let (xq, normed_q) = (dq.gather(x)?, dq.gather(&normed)?);
    let q_positions = absolute_positions(tokens.queries, batch);
    // The fused kernel (CPU, f32) needs no mask and no score tensor: one call for
    // every query. A GPU's prefix softmax needs no mask either; elsewhere the mask is
    // built on the device, chunk by chunk.
    let fused = matches!(tokens.keys, Keys::Causal) && runs_fused(&xq);
    let by_counts = fused || prefix_softmax::runs_on_gpu(&xq);
    let chunk = match fused {
        true => dq.width(),
        false => query_chunk(
            &device,
            batch.batch_size(),
            cfg.num_attention_heads,
            keys.k.dim(2)?,
        ),
    };
    let mut deltas = Vec::new();
    for start in (0..dq.width()).step_by(chunk) {
        let n = chunk.min(dq.width() - start);
        // Keys past the chunk's last query position are masked for all of it: skip them.
        let limit = key_limit(&q_positions, &keys.row_positions, start, n).max(1);
        let pos_c = pos_q.narrow(1, start, n)?;
        let (pos_k, valid_k) = (
            keys.positions.narrow(1, 0, limit)?,
            keys.valid.narrow(1, 0, limit)?,
        );
        let (counts, mask);
        let visible = match &kept_k {
            None if by_counts => {
                counts = visible_counts(&q_positions, &keys.row_positions, start, n);
                Visible::Prefix(&counts)
            }
            None if sees_every_key(&q_positions, &keys, start, limit) => Visible::All,
            None => {
                mask = attention_mask(&pos_c, &pos_k, &valid_k, dtype)?;
                Visible::Mask(&mask)
            }
            Some(kept) => {
                let kept = kept.narrow(1, 0, limit)?;
                mask = kept_or_self_mask(&pos_c, &pos_k, &valid_k, &kept, dtype)?;
                Visible::Mask(&mask)
            }
        };
        deltas.push(layer.delta_with_kv(
            &xq.narrow(1, start, n)?,
            &normed_q.narrow(1, start, n)?,
            &rope.at(&pos_c, dtype)?,
            &keys.k.narrow(2, 0, limit)?,
            &keys.v.narrow(2, 0, limit)?,
            visible,
        )?);
    }
    let delta = match deltas.len() {
        1 => deltas.remove(0),
        _ => Tensor::cat(&deltas, 1)?,
    };
    let delta = match tokens.weights {
        Some(w) => delta.broadcast_mul(&dq.gather_tokens(w)?.to_dtype(dtype)?.unsqueeze(2)?)?,
        None => delta,
    };
    Ok((dq.add_back(x, &delta)?, spent))
}

/// Query slots per attention chunk on the CPU. A long prompt attends chunk by chunk, each
/// chunk to the keys up to its last position: no `(T, T)` score tensor is built (memory
/// linear in T) and most of the masked upper half of the scores is never computed.
const QUERY_CHUNK: usize = 256;

/// Score elements `(B, heads, chunk, keys)` an attention chunk aims at on a CUDA GPU: 2²⁷
/// (256 MiB in bf16).
const GPU_SCORE_ELEMENTS: usize = 1 << 27;

/// Query slots per attention chunk for `b` rows of `heads` query heads over `keys` key
/// slots. Elsewhere than on CUDA, [`QUERY_CHUNK`]. A GPU runs a chunk's dozen ops in
/// microseconds and pays a launch for each, so it takes as many queries a chunk as
/// [`GPU_SCORE_ELEMENTS`] allows (a 2048-token prompt in one chunk instead of 8), and
/// never fewer than [`QUERY_CHUNK`] (so a chunk holds more than the target when
/// `b · heads · keys` exceeds 2¹⁹).
fn query_chunk(device: &Device, b: usize, heads: usize, keys: usize) -> usize {
    match device {
        Device::Cuda(_) => (GPU_SCORE_ELEMENTS / (b * heads * keys).max(1)).max(QUERY_CHUNK),
        _ => QUERY_CHUNK,
    }
}

/// The absolute position of every selected token, per row.
fn absolute_positions(sel: &Selection, batch: &Batch) -> Vec<Vec<u32>> {
    (sel.kept().iter().zip(batch.starts()))
        .map(|(row, &start)| row.iter().map(|&i| start as u32 + i).collect())
        .collect()
}

/// How many leading key slots the query slots `start..start + n` can see: per row, the
/// keys (ascending positions) up to the last of those queries' positions; the largest
/// over rows.
fn key_limit(queries: &[Vec<u32>], keys: &[Vec<u32>], start: usize, n: usize) -> usize {
    (queries.iter().zip(keys))
        .filter_map(|(q, k)| {
            let last = *q
                .get(start..)?
                .get(..n.min(q.len().saturating_sub(start)))?
                .last()?;
            Some(k.partition_point(|&p| p <= last))
        })
        .max()
        .unwrap_or(0)
}

/// Whether every query slot `start..` of every row may see all of the first `limit` key
/// slots, so that no mask is needed: each row's `limit` keys are valid (no padding) and no
/// later than the row's first query of the chunk. True for a decode step (one query after
/// its cached keys); false for a causal prompt of more than one token.
fn sees_every_key(queries: &[Vec<u32>], keys: &LayerKeys, start: usize, limit: usize) -> bool {
    (queries.iter().zip(&keys.row_positions)).all(|(q, k)| {
        let Some(&first) = q.get(start) else {
            // No query in this chunk: the row's slots are padding, whose update is dropped.
            return true;
        };
        k.len() >= limit && k.get(limit - 1).is_none_or(|&last| last <= first)
    })
}

/// For query slots `start..start + n` of every row, how many of the row's leading key
/// slots each sees: its keys (ascending positions) up to its own position. `(B · n)`
/// row-major, 0 for a padding slot. The causal mask of [`Keys::Causal`], as
/// [`Visible::Prefix`] counts.
fn visible_counts(queries: &[Vec<u32>], keys: &[Vec<u32>], start: usize, n: usize) -> Vec<usize> {
    (queries.iter().zip(keys))
        .flat_map(|(q, k)| {
            (start..start + n).map(move |slot| match q.get(slot) {
                Some(&p) => k.partition_point(|&kp| kp <= p),
                None => 0,
            })
        })
        .collect()
}

/// FLOPs of a layer that computes `queries`, computes keys and values for `writers`, and
/// attends each query of row b to `keys_per_row[b]` keys; every row counted without the
/// padding slots a batched computation adds (the model's compute, not the batch's). A
/// query is counted against every key of its row in the call, the masked later ones
/// included (what a batched attention computes), so a prompt split into chunks counts
/// slightly fewer pairs than one prefill.
pub(super) fn layer_cost(
    cfg: &LlamaConfig,
    queries: &Selection,
    writers: &Selection,
    keys_per_row: &[usize],
) -> f64 {
    let q: Vec<usize> = queries.kept_per_row();
    let pairs = q.iter().zip(keys_per_row).map(|(q, k)| q * k).sum();
    layer_flops(cfg, q.iter().sum(), writers.num_kept(), pairs)
}

/// The mask of [`Keys::KeptOrSelf`], `(B, 1, Tq, Tk)`: [`attention_mask`] restricted to
/// keys that are kept or the query itself (same original position). `pos_q` `(B, Tq)`,
/// `pos_k` `(B, Tk)` u32; `valid_k` `(B, Tk)` u8; `kept_k` `(B, Tk)` f32 0/1.
fn kept_or_self_mask(
    pos_q: &Tensor,
    pos_k: &Tensor,
    valid_k: &Tensor,
    kept_k: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let (pos_k, pos_q) = (pos_k.unsqueeze(1)?, pos_q.unsqueeze(2)?);
    let causal = pos_k.broadcast_le(&pos_q)?.to_dtype(DType::F32)?;
    let itself = pos_k.broadcast_eq(&pos_q)?.to_dtype(DType::F32)?;
    let key_ok = itself.broadcast_maximum(&kept_k.unsqueeze(1)?)?;
    let valid_k = valid_k.to_dtype(DType::F32)?.unsqueeze(1)?;
    let allowed = causal.mul(&key_ok)?.broadcast_mul(&valid_k)?;
    let masked = crate::model::attention::masked_value(dtype);
    Ok(((allowed - 1.0)? * -masked)?
        .unsqueeze(1)?
        .to_dtype(dtype)?)
}
