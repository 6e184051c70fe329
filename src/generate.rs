//! Text generation (greedy decoding without a KV cache for now: every step recomputes the
//! full prefix, which is exact but O(T²) per token).

use crate::error::{Error, Result};
use crate::model::{Batch, Llama};
use candle_core::{IndexOp, D};

/// Greedy continuation of `prompt` (ids, no BOS added) by `max_new_tokens` tokens, stopping
/// early at `eos` when given. Returns only the new ids.
///
/// Errors: [`Error::InvalidArgument`] for an empty prompt; [`Error::SequenceTooLong`] when
/// prompt plus continuation exceed the context.
pub fn greedy(
    model: &Llama,
    prompt: &[u32],
    max_new_tokens: usize,
    eos: Option<u32>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("empty prompt".to_string()));
    }
    let max = model.config().max_position_embeddings;
    let mut ids = prompt.to_vec();
    let mut out = Vec::with_capacity(max_new_tokens);
    for _ in 0..max_new_tokens {
        let batch = Batch::single(&ids, max, model.device())?;
        let logits = model.forward(&batch)?;
        let next = logits
            .i((0, ids.len() - 1))?
            .argmax(D::Minus1)?
            .to_scalar::<u32>()?;
        ids.push(next);
        out.push(next);
        if Some(next) == eos {
            break;
        }
    }
    Ok(out)
}
