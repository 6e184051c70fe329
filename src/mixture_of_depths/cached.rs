//! The forward pass with a KV cache: prefill and decode.

use super::{ModModel, ModOutput, Mode};
use crate::error::Result;
use crate::model::flops::lm_head_flops;
use crate::model::kv_cache::KvCache;
use crate::model::Batch;
use candle_core::Tensor;

impl ModModel {
    /// An empty KV cache for `batch` rows of this model.
    ///
    /// Errors: [`crate::Error::InvalidArgument`] for zero rows.
    pub fn new_cache(&self, batch: usize) -> Result<KvCache> {
        KvCache::new(self.base().config().num_hidden_layers, batch)
    }

    /// Runs new tokens through the model against `cache`, appends their keys and values
    /// to it and advances its rows: a prefill when the cache is empty, a decode step when
    /// `batch` holds one token per row, or a chunk of a long prompt. Row b of `batch` must
    /// start where the cache's row b stopped ([`KvCache::next_positions`]; build the batch
    /// with [`Batch::continuing`]); a multi-token row attends to the cache and causally to
    /// its own earlier tokens.
    ///
    /// Every routed layer decides causally, per token ([`ModModel::forward_causal`]), so a
    /// prefill followed by decode steps gives the logits of one full forward pass. A token
    /// skipped at a routed layer under [`KvPolicy::Skip`](crate::mixture_of_depths::KvPolicy)
    /// gets no cache entry there; under `Keep` it still writes K/V. Padding never enters
    /// the cache.
    ///
    /// Returns logits `(B, T, vocab)` of the new tokens and the routing statistics; FLOPs
    /// count each row's attention over everything its cache holds.
    ///
    /// Errors, all before any compute and with the cache unchanged:
    /// [`crate::Error::SequenceTooLong`] when a row would end past the context;
    /// [`crate::Error::PositionMismatch`] when a row does not continue its cache (a
    /// restart, a gap or an overlap: [`KvCache::reset`] or [`KvCache::truncate`] first);
    /// [`crate::Error::InvalidArgument`] for a cache of another batch size or layer count,
    /// or a token id outside the vocabulary.
    pub fn forward_cached(&self, batch: &Batch, cache: &mut KvCache) -> Result<ModOutput> {
        self.with_logits(self.run(batch, Mode::Inference, true, Some(cache))?)
    }

    /// As [`forward_cached`](Self::forward_cached), computing logits only at each row's
    /// last real token: what a prefill before generation needs (the `lm_head` over a
    /// 49 k vocabulary is about a tenth of SmolLM2's prefill). Returns logits
    /// `(B, 1, vocab)`; `flops` and `dense_flops` count `lm_head` on those B tokens only.
    ///
    /// Errors: as [`forward_cached`](Self::forward_cached).
    pub fn forward_cached_last(&self, batch: &Batch, cache: &mut KvCache) -> Result<ModOutput> {
        let out = self.run(batch, Mode::Inference, true, Some(cache))?;
        let (b, t, d) = out.hidden.dims3()?;
        let last: Vec<u32> = (batch.lengths().iter().enumerate())
            .map(|(row, &len)| (row * t + len - 1) as u32)
            .collect();
        let last = Tensor::from_vec(last, b, out.hidden.device())?;
        let hidden = out.hidden.reshape((b * t, d))?.index_select(&last, 0)?;
        let unused = lm_head_flops(self.base().config(), batch.num_tokens() - b);
        Ok(ModOutput {
            logits: self.base().logits(&hidden.unsqueeze(1)?)?,
            stats: out.stats,
            flops: out.flops - unused,
            dense_flops: out.dense_flops - unused,
        })
    }
}
