//! Perplexity evaluation.

use crate::error::{Error, Result};
use crate::loss::next_token_nll;
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
    let batch = Batch::single(ids, model.config().max_position_embeddings, model.device())?;
    let logits = model.forward(&batch)?;
    let (sum, count) = next_token_nll(&logits, &batch.ids, &batch.valid)?;
    let nll = sum.to_scalar::<f32>()? as f64 / count as f64;
    Ok(Perplexity {
        nll,
        perplexity: nll.exp(),
        tokens: ids.len(),
    })
}
