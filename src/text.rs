//! Text in and out of token ids, as training, evaluation and generation use them.

use crate::error::{Error, Result};
use tokenizers::Tokenizer;

/// Encodes `text` without special tokens (no BOS), as the perplexity references do.
///
/// Errors: [`Error::Tokenizer`] if the tokenizer fails.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(encoding.get_ids().to_vec())
}

/// Decodes ids to text, keeping special tokens out.
///
/// Errors: [`Error::Tokenizer`] if an id is outside the vocabulary.
pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer
        .decode(ids, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))
}
