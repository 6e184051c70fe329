//! The forward pass with a KV cache: prefill and decode.

use super::{ModModel, ModOutput, Mode, Routing};
use crate::error::Result;
use crate::mod_config::{GateScaling, KvPolicy};
use crate::model::flops::{layer_flops, lm_head_flops, router_flops};
use crate::model::kv_cache::KvCache;
use crate::model::{attention_mask, Batch};
use crate::routing::{Dispatch, RoutingStats, Selection};
use candle_core::IndexOp;

impl ModModel {
    /// An empty KV cache for `batch` rows of this model.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.base.config().num_hidden_layers, batch)
    }

    /// Runs new tokens through the model against `cache` and appends their keys and values
    /// to it: a prefill when the cache is empty, a decode step when `batch` holds one token
    /// per row. `batch.positions` must continue each row's sequence (a prefill starts at 0,
    /// the next token of a row of length n is at position n).
    ///
    /// Every routed layer decides causally, per token ([`ModModel::forward_causal`]), so a
    /// prefill followed by decode steps gives the logits of one full forward pass. A token
    /// skipped at a routed layer under [`KvPolicy::Skip`] gets no cache entry there; under
    /// [`KvPolicy::Keep`] it still writes K/V. Padding never enters the cache.
    ///
    /// Returns logits `(B, T, vocab)` of the new tokens and the routing statistics.
    ///
    /// Errors: [`crate::Error::SequenceTooLong`] beyond the context;
    /// [`crate::Error::InvalidArgument`] for a cache of another batch size or layer count,
    /// or a token id outside the vocabulary.
    pub fn forward_cached(&self, batch: &Batch, cache: &mut KvCache) -> Result<ModOutput> {
        let base = &self.base;
        base.check_batch(batch)?;
        if cache.batch_size() != batch.batch_size() || cache.num_layers() != base.layers.len() {
            return Err(crate::Error::InvalidArgument(format!(
                "a batch of {} rows through {} layers against a cache of {} rows and {} layers",
                batch.batch_size(),
                base.layers.len(),
                cache.batch_size(),
                cache.num_layers()
            )));
        }
        let cfg = base.config();
        let dtype = base.dtype();
        let device = base.device().clone();
        let (b, t) = (batch.batch_size(), batch.seq_len());
        let n_kv = cfg.num_kv_heads();
        let hd = cfg.head_dim();
        let all_valid = Selection {
            kept: batch
                .lengths
                .iter()
                .map(|&l| (0..l as u32).collect())
                .collect(),
            seq_len: t,
        };
        // Keys a dense layer would attend to: every position up to the last new one.
        let context = (batch.starts.iter())
            .zip(&batch.lengths)
            .map(|(s, l)| s + l)
            .max()
            .unwrap_or(0);
        let mut x = base.embed(&batch.ids)?;
        let mut flops = lm_head_flops(cfg, b * t);
        let mut dense_flops = flops;
        let mut stats = Vec::new();
        for (j, layer) in base.layers.iter().enumerate() {
            let routing = match self.routers.get(&j) {
                Some(r) => Some(self.route(j, layer, r, &x, batch, Mode::Inference, true)?),
                None => None,
            };
            let queries = routing.as_ref().map_or(&all_valid, |r| &r.sel);
            let writers = match (&routing, self.config.kv_policy) {
                (Some(r), KvPolicy::Skip) => &r.sel,
                _ => &all_valid,
            };
            let normed = layer.normed_input(&x)?;
            // Keys and values of the new tokens that write them at this layer.
            if let Some(d) = Dispatch::new(writers, &device, dtype)? {
                let pos = d.gather_tokens(&batch.positions)?;
                let (k, v) = layer
                    .attn
                    .key_values(&d.gather(&normed)?, &base.rope.at(&pos, dtype)?)?;
                let pos: Vec<Vec<u32>> = pos.to_vec2()?;
                for (row, kept) in writers.kept.iter().enumerate() {
                    let n = kept.len();
                    if n > 0 {
                        let kr = k.i(row..row + 1)?.narrow(2, 0, n)?;
                        let vr = v.i(row..row + 1)?.narrow(2, 0, n)?;
                        cache.append(j, row, &kr, &vr, &pos[row][..n])?;
                    }
                }
            }
            let keys = cache.layer_keys(j, &device, dtype, n_kv, hd)?;
            let mut spent = 0.0;
            if let (Some(d), Some(keys)) = (Dispatch::new(queries, &device, dtype)?, keys.as_ref())
            {
                let pos_q = d.gather_tokens(&batch.positions)?;
                let rope_q = base.rope.at(&pos_q, dtype)?;
                let mask = attention_mask(&pos_q, &keys.positions, &keys.valid, dtype)?;
                let delta = layer.delta_with_kv(
                    &d.gather(&x)?,
                    &d.gather(&normed)?,
                    &rope_q,
                    &keys.k,
                    &keys.v,
                    &mask,
                )?;
                let delta = match (&routing, self.config.gate_scaling) {
                    (Some(r), GateScaling::Multiply) => delta
                        .broadcast_mul(&d.gather_tokens(&r.w)?.to_dtype(dtype)?.unsqueeze(2)?)?,
                    _ => delta,
                };
                x = d.add_back(&x, &delta)?;
                let s = keys.positions.dim(1)?;
                spent = layer_flops(
                    cfg,
                    b * d.width(),
                    b * writers.max_kept(),
                    b * d.width() * s,
                );
            }
            let dense_layer = layer_flops(cfg, b * t, b * t, b * t * context);
            dense_flops += dense_layer;
            match routing {
                None => flops += spent,
                Some(Routing {
                    logits,
                    sel,
                    f,
                    mean_gate,
                    ..
                }) => {
                    let cost = spent + router_flops(cfg, b * t);
                    flops += cost;
                    stats.push(RoutingStats {
                        layer: j,
                        kept: sel.num_kept(),
                        valid: batch.num_tokens(),
                        mean_gate,
                        logits,
                        kept_mask: f,
                        flops: cost,
                        dense_flops: dense_layer,
                    });
                }
            }
        }
        Ok(ModOutput {
            logits: base.logits(&x)?,
            stats,
            flops,
            dense_flops,
        })
    }
}
