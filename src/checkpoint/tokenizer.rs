//! The tokenizer of a GGUF file, rebuilt as a Hugging Face `tokenizers::Tokenizer`.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{PreTokenizerWrapper, Tokenizer};

/// Builds the tokenizer that a GGUF file describes, by its `tokenizer.ggml.model`:
/// `gpt2` (byte-level BPE: SmolLM2, LLaMA-3, Qwen2, ...) or `llama` (SentencePiece BPE:
/// LLaMA-1/2, Mistral, ...; see [`super::sentencepiece`]).
///
/// Byte-level BPE: vocabulary, merges and special tokens from `tokenizer.ggml.*` (through
/// candle's GGUF reader), and the pre-tokenizer that `tokenizer.ggml.pre` names.
///
/// Pre-tokenizers: `smollm` (SmolLM / SmolLM2: single digits, then GPT-2 byte-level
/// splitting without a prefix space, as in their `tokenizer.json`), `gpt2` / `default`
/// (GPT-2 byte-level), and those candle knows (`qwen2`, `llama3`, `smaug-bpe`, `lfm2`).
///
/// Errors: [`Error::Tokenizer`] for a missing `tokenizer.ggml.model` or one other than
/// `gpt2` and `llama` (naming it), an unknown pre-tokenizer, or malformed vocabulary
/// metadata.
pub fn from_gguf(content: &Content) -> Result<Tokenizer> {
    match content.metadata.get("tokenizer.ggml.model") {
        Some(Value::String(model)) if model == "gpt2" => byte_level_bpe(content),
        Some(Value::String(model)) if model == "llama" => super::sentencepiece::from_gguf(content),
        Some(Value::String(model)) => Err(Error::Tokenizer(format!(
            "unsupported GGUF tokenizer model `{model}` (tokenizer.ggml.model): \
             `gpt2` (byte-level BPE) and `llama` (SentencePiece BPE) are supported"
        ))),
        Some(other) => Err(Error::Tokenizer(format!(
            "GGUF metadata `tokenizer.ggml.model` is not a string: {other:?}"
        ))),
        None => Err(Error::Tokenizer(
            "GGUF metadata lacks `tokenizer.ggml.model`".to_string(),
        )),
    }
}

fn byte_level_bpe(content: &Content) -> Result<Tokenizer> {
    let pre = match content.metadata.get("tokenizer.ggml.pre") {
        Some(Value::String(s)) => s.clone(),
        _ => "default".to_string(),
    };
    let mut tokenizer =
        Tokenizer::from_gguf(content).map_err(|e| Error::Tokenizer(e.to_string()))?;
    match pre.as_str() {
        "smollm" => {
            let pre_tokenizer = Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ]);
            tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        }
        "gpt2" | "default" => {
            tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        "qwen2" | "llama3" | "smaug-bpe" | "lfm2" => {}
        other => {
            return Err(Error::Tokenizer(format!(
                "unsupported GGUF pre-tokenizer `{other}` (tokenizer.ggml.pre)"
            )))
        }
    }
    Ok(tokenizer)
}
