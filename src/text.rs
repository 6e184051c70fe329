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

/// Encodes a prompt the way the model was trained to see one: with the special tokens the
/// tokenizer's post-processor adds (BOS for LLaMA-1/2 and other SentencePiece vocabularies;
/// nothing for SmolLM2, whose GGUF sets `add_bos_token = false`).
///
/// Errors: [`Error::Tokenizer`] if the tokenizer fails.
pub fn encode_prompt(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let encoding = tokenizer
        .encode(text, true)
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
