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

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::mixture_of_depths::KvPolicy;
use crate::model::flops::layer_flops;
use crate::model::kv_cache::{KvCache, LayerKeys};
use crate::model::{attention_mask, Batch, Block, Llama, RopeAt, RotaryEmbedding};
use crate::routing::{Dispatch, Selection};
use candle_core::{DType, IndexOp, Tensor};

use super::model::Routing;

/// The token sets of one call of a layer.
pub(super) struct LayerTokens<'a> {
    /// Tokens computed by the layer.
    pub queries: &'a Selection,
    /// Tokens that write keys and values (a superset of the queries).
    pub writers: &'a Selection,
    /// Per-token output weight `(B, T)` f32 (the gate, for `Multiply` scaling); `None`
    /// adds each query's update with weight 1.
    pub weights: Option<&'a Tensor>,
}

/// Runs `layer` (index `j`) on the queries of `x` `(B, T, d)` and returns the new
/// residual stream `(B, T, d)` and the FLOPs spent (see [`layer_cost`]). With a `cache`,
/// the writers' keys and values are appended to it first and the queries attend to
/// everything the cache holds for their row.
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
            })
        }
    };
    if let Some(cache) = cache {
        if let Some(new) = &keys {
            let positions: Vec<Vec<u32>> = new.positions.to_vec2()?;
            for (row, &n) in new.lengths.iter().enumerate().filter(|(_, &n)| n > 0) {
                let k = new.k.i(row..row + 1)?.narrow(2, 0, n)?;
                let v = new.v.i(row..row + 1)?.narrow(2, 0, n)?;
                cache.append(j, row, &k, &v, &positions[row][..n])?;
            }
        }
        keys = cache.layer_keys(j, &device, dtype, cfg.num_kv_heads(), cfg.head_dim())?;
    }
    let same_tokens = tokens.queries == tokens.writers;
    let queries = match (same_tokens, writers) {
        (true, dw) => dw,
        (false, _) => Dispatch::new(tokens.queries, &device, dtype)?,
    };
    let (Some(dq), Some(keys)) = (queries, keys) else {
        return Ok((x.clone(), 0.0));
    };
    let pos_q = dq.gather_tokens(batch.positions())?;
    let mask = attention_mask(&pos_q, &keys.positions, &keys.valid, dtype)?;
    let delta = layer.delta_with_kv(
        &dq.gather(x)?,
        &dq.gather(&normed)?,
        &rope.at(&pos_q, dtype)?,
        &keys.k,
        &keys.v,
        &mask,
    )?;
    let delta = match tokens.weights {
        Some(w) => delta.broadcast_mul(&dq.gather_tokens(w)?.to_dtype(dtype)?.unsqueeze(2)?)?,
        None => delta,
    };
    let spent = layer_cost(cfg, tokens.queries, tokens.writers, &keys.lengths);
    Ok((dq.add_back(x, &delta)?, spent))
}

/// FLOPs of a layer that computes `queries`, computes keys and values for `writers`, and
/// attends each query of row b to `keys_per_row[b]` keys; every row counted without the
/// padding slots a batched computation adds (the model's compute, not the batch's).
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

/// What training computes once per forward pass: RoPE at every position and the dense
/// causal mask.
pub(super) struct TrainingInput<'a> {
    batch: &'a Batch,
    rope: RopeAt,
    dense_mask: Tensor,
}

impl<'a> TrainingInput<'a> {
    pub(super) fn new(base: &Llama, batch: &'a Batch) -> Result<Self> {
        let dtype = base.dtype();
        let positions = batch.positions();
        Ok(Self {
            batch,
            rope: base.rope().at(positions, dtype)?,
            dense_mask: attention_mask(positions, positions, batch.valid(), dtype)?,
        })
    }

    /// Layer `layer` in training: the delta of every token (a skipped token as a query over
    /// the keys its policy allows, plus itself), weighted per token by the routing's `w`,
    /// whose forward value is the hard decision. A dense layer (`routing` `None`) adds
    /// every delta with weight 1.
    pub(super) fn layer(
        &self,
        layer: &Block,
        x: &Tensor,
        routing: Option<&Routing>,
        policy: KvPolicy,
    ) -> Result<Tensor> {
        let Some(routing) = routing else {
            return Ok((x + layer.delta(x, &self.rope, &self.dense_mask)?)?);
        };
        let dtype = x.dtype();
        let mask = match policy {
            KvPolicy::Keep => self.dense_mask.clone(),
            KvPolicy::Skip => skip_training_mask(&routing.f, self.batch, dtype)?,
        };
        let delta = layer.delta(x, &self.rope, &mask)?;
        let w = routing.w.to_dtype(dtype)?.unsqueeze(2)?;
        Ok(x.add(&delta.broadcast_mul(&w)?)?)
    }
}

/// The training-mode mask of a `Skip` routed layer, `(B, 1, T, T)`: causal over valid kept
/// keys plus each token itself (so that a skipped token's delta, used only for its gate's
/// gradient, is defined). `kept`: `(B, T)` f32 0/1.
fn skip_training_mask(kept: &Tensor, batch: &Batch, dtype: DType) -> Result<Tensor> {
    let pos = batch.positions();
    let causal = pos
        .unsqueeze(1)?
        .broadcast_le(&pos.unsqueeze(2)?)?
        .to_dtype(DType::F32)?;
    let itself = Tensor::eye(batch.seq_len(), DType::F32, pos.device())?.unsqueeze(0)?;
    let key_ok = itself.broadcast_maximum(&kept.unsqueeze(1)?)?;
    let valid_k = batch.valid().to_dtype(DType::F32)?.unsqueeze(1)?;
    let allowed = causal.broadcast_mul(&key_ok)?.broadcast_mul(&valid_k)?;
    let masked = crate::model::attention::masked_value(dtype);
    Ok(((allowed - 1.0)? * -masked)?
        .unsqueeze(1)?
        .to_dtype(dtype)?)
}
