//! Perplexity evaluation.

use crate::error::{Error, Result};
use crate::loss::chunked_objective;
use crate::model::{Batch, Llama};
use serde::Serialize;

/// Mean next-token NLL and perplexity of a text.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Perplexity {
    /// Mean negative log-likelihood per predicted token, in nats.
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
    /// Tokens evaluated (N); N - 1 of them are predicted.
    pub tokens: usize,
}

/// Perplexity of the dense model on `ids` (one sequence, no BOS added), predicting tokens
/// 1..N from their prefixes.
///
/// Errors: [`Error::InvalidArgument`] for fewer than 2 tokens; [`Error::SequenceTooLong`]
/// beyond the model's context.
pub fn perplexity(model: &Llama, ids: &[u32]) -> Result<Perplexity> {
    if ids.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "perplexity needs at least 2 tokens, got {}",
            ids.len()
        )));
    }
    dense_rows_perplexity(model, &[ids.to_vec()])
}

/// Held-out evaluation of a Mixture-of-Depths model on rows of tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoutedEval {
    /// Perplexity and mean NLL over every predicted token of the rows.
    pub perplexity: Perplexity,
    /// `(layer, kept fraction)` per routed layer.
    pub kept_fraction: Vec<(usize, f64)>,
    /// FLOPs spent as a fraction of the dense model's on the same rows.
    pub compute_fraction: f64,
    /// KV-cache entries as a fraction of the dense model's, counted from this forward's
    /// routing decisions: (token, layer) pairs that write K/V (a token skipped at a routed
    /// layer under `Skip` writes none). `KvCache::bytes` measures the same on the cached
    /// path; the two agree for threshold-p models.
    pub kv_fraction: f64,
}

impl RoutedEval {
    /// Fraction of (token, routed layer) computations skipped.
    pub fn skip_fraction(&self) -> f64 {
        let n = self.kept_fraction.len().max(1) as f64;
        1.0 - self.kept_fraction.iter().map(|(_, f)| f).sum::<f64>() / n
    }
}

/// Perplexity of the dense model over `rows` (each one sequence, no BOS), batched.
///
/// Errors: [`Error::InvalidArgument`] for no rows or fewer than 2 tokens;
/// [`Error::SequenceTooLong`].
pub fn dense_rows_perplexity(model: &Llama, rows: &[Vec<u32>]) -> Result<Perplexity> {
    let batch = Batch::from_rows(
        rows,
        0,
        model.config().max_position_embeddings,
        model.device(),
    )?;
    let hidden = model.forward_hidden(&batch)?;
    perplexity_of(model, &hidden, &batch)
}

/// Held-out evaluation of a routed model over `rows` (sparse inference forward). With
/// `causal`, every routed layer decides per token as generation does (the same for
/// threshold-p; top-k then uses its auxiliary predictor instead of whole-row top-k).
///
/// Errors: as [`dense_rows_perplexity`].
pub fn routed_rows_eval(
    model: &crate::mixture_of_depths::ModModel,
    rows: &[Vec<u32>],
    causal: bool,
) -> Result<RoutedEval> {
    let base = model.base();
    let batch = Batch::from_rows(
        rows,
        0,
        base.config().max_position_embeddings,
        base.device(),
    )?;
    let mode = crate::mixture_of_depths::Mode::Inference;
    let out = model.run(&batch, mode, causal, None)?;
    let layers = base.config().num_hidden_layers;
    let kv_entries = match model.config().kv_policy {
        crate::mixture_of_depths::KvPolicy::Keep => (layers * batch.num_tokens()) as f64,
        crate::mixture_of_depths::KvPolicy::Skip => {
            out.stats.iter().map(|s| s.kept as f64).sum::<f64>()
                + ((layers - out.stats.len()) * batch.num_tokens()) as f64
        }
    };
    Ok(RoutedEval {
        perplexity: perplexity_of(base, &out.hidden, &batch)?,
        kept_fraction: out
            .stats
            .iter()
            .map(|s| (s.layer, s.kept_fraction()))
            .collect(),
        compute_fraction: out.compute_fraction(),
        kv_fraction: kv_entries / (layers * batch.num_tokens()) as f64,
    })
}

/// Perplexity from the final hidden states `(B, T, d)` of `batch`: the next-token NLL over
/// vocabulary chunks ([`chunked_objective`]), so that no `(B, T, vocab)` logits tensor
/// exists at once (1.6 GB for 8192 tokens of a 49 k vocabulary).
fn perplexity_of(model: &Llama, hidden: &candle_core::Tensor, batch: &Batch) -> Result<Perplexity> {
    let terms = chunked_objective(model, hidden, None, batch.ids(), batch.valid())?;
    if terms.nll_count == 0 {
        return Err(Error::InvalidArgument("no token to predict".to_string()));
    }
    let nll = terms.nll_sum.to_scalar::<f32>()? as f64 / terms.nll_count as f64;
    Ok(Perplexity {
        nll,
        perplexity: nll.exp(),
        tokens: batch.num_tokens(),
    })
}
