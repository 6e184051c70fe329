//! The SentencePiece-style vocabulary of a LLaMA-1/2 GGUF (`tokenizer.ggml.model = "llama"`),
//! rebuilt as a Hugging Face `tokenizers::Tokenizer` that gives the ids SentencePiece gives.
//!
//! A LLaMA GGUF stores pieces and their scores, not merges. SentencePiece's BPE joins, at
//! each step, the adjacent pair whose joined piece has the highest score; the same result
//! comes from an HF BPE whose merges are every split `(left, right)` of every vocabulary
//! piece into two vocabulary pieces, ranked by the joined piece's score (as transformers'
//! `SentencePieceExtractor` ranks them). Characters outside the vocabulary fall back to
//! the byte pieces `<0x00>` … `<0xFF>`; a space is the piece `▁` and one is put before the
//! text.
//!
//! The ids are SentencePiece's (as llama.cpp and llama-tokenizer-js give them; the tests
//! check llama-tokenizer-js's cases). transformers 5.24's own GGUF tokenizer differs from
//! them on texts that start with a space (`" grabbed"`: it drops the `▁` piece 29871);
//! `scripts/llama2-reference.py` shows where.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

/// SentencePiece's word-boundary mark, which stands for a space inside pieces.
const SPACE: &str = "\u{2581}";

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

/// Builds the tokenizer of a GGUF whose `tokenizer.ggml.model` is `llama`.
///
/// Reads `tokenizer.ggml.tokens` (pieces by id), `scores` (f32 per piece; without it the
/// lower id wins, as in a vocabulary sorted by score), `token_type` (optional; control and
/// unknown pieces become special tokens, user-defined ones added tokens, and only normal
/// pieces are merge results), `bos_token_id` / `eos_token_id` / `unknown_token_id`
/// (defaults 1 / 2 / 0, LLaMA's), `add_bos_token` (default true), `add_eos_token` (default
/// false) and `add_space_prefix` (default true).
///
/// `encode(text, true)` then gives BOS followed by SentencePiece's pieces; `decode` undoes
/// it (`▁` back to spaces, byte pieces back to UTF-8, the prefix space dropped).
///
/// Errors: [`Error::Tokenizer`] for missing or mistyped metadata (tokens not strings, a
/// score list of another length, a special-token id outside the vocabulary).
pub fn from_gguf(content: &Content) -> Result<Tokenizer> {
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let scores: Vec<f32> = match content.metadata.get("tokenizer.ggml.scores") {
        None => (0..n).map(|id| -(id as f32)).collect(),
        Some(_) => numbers(content, "tokenizer.ggml.scores", n)?
            .into_iter()
            .map(|s| s as f32)
            .collect(),
    };
    let types: Vec<i64> = match content.metadata.get("tokenizer.ggml.token_type") {
        None => vec![token_type::NORMAL; n],
        Some(_) => numbers(content, "tokenizer.ggml.token_type", n)?
            .into_iter()
            .map(|t| t as i64)
            .collect(),
    };
    let special_id = |key: &str, default: u32| -> Result<u32> {
        let id = match content.metadata.get(key) {
            None => default,
            Some(v) => integer(v).ok_or_else(|| bad(key, "is not an integer"))?,
        };
        if (id as usize) < n {
            Ok(id)
        } else {
            Err(bad(
                key,
                &format!("is {id}, outside the {n}-token vocabulary"),
            ))
        }
    };
    let bos = special_id("tokenizer.ggml.bos_token_id", 1)?;
    let eos = special_id("tokenizer.ggml.eos_token_id", 2)?;
    let unk = special_id("tokenizer.ggml.unknown_token_id", 0)?;
    let flag = |key: &str, default: bool| match content.metadata.get(key) {
        Some(Value::Bool(b)) => Ok(*b),
        None => Ok(default),
        Some(_) => Err(bad(key, "is not a boolean")),
    };
    let add_bos = flag("tokenizer.ggml.add_bos_token", true)?;
    let add_eos = flag("tokenizer.ggml.add_eos_token", false)?;
    let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", true)?;

    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let merges = merges_by_score(&tokens, &scores, &types);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(tokens[unk as usize].clone())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| Error::Tokenizer(format!("SentencePiece vocabulary: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    let replace_spaces = Replace::new(" ", SPACE).map_err(tokenizer_error)?;
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(NormalizerWrapper::Prepend(Prepend::new(SPACE.to_string())));
    }
    normalizers.push(NormalizerWrapper::Replace(replace_spaces));
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(tokenizer_error)?;
    let mut decoders = vec![
        DecoderWrapper::Replace(Replace::new(SPACE, " ").map_err(tokenizer_error)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));

    // Control and unknown pieces (and the named BOS / EOS / UNK) are matched whole and
    // skipped by `decode(_, true)`; user-defined pieces are matched whole and kept.
    let mut special: Vec<usize> = (0..n)
        .filter(|&id| matches!(types[id], token_type::UNKNOWN | token_type::CONTROL))
        .collect();
    special.extend([bos, eos, unk].map(|id| id as usize));
    special.sort_unstable();
    special.dedup();
    tokenizer
        .add_special_tokens(
            special
                .iter()
                .map(|&id| AddedToken::from(tokens[id].clone(), true)),
        )
        .map_err(tokenizer_error)?;
    let user_defined: Vec<AddedToken> = (0..n)
        .filter(|&id| types[id] == token_type::USER_DEFINED)
        .map(|id| AddedToken::from(tokens[id].clone(), false))
        .collect();
    tokenizer
        .add_tokens(user_defined)
        .map_err(tokenizer_error)?;

    if add_bos || add_eos {
        let (bos_piece, eos_piece) = (&tokens[bos as usize], &tokens[eos as usize]);
        // One sequence: [BOS] $A [EOS]; a pair repeats the wrapping around $B.
        let wrap = |body: &str, type_id: u32| {
            let mut parts = Vec::new();
            if add_bos {
                parts.push(format!("{bos_piece}:{type_id}"));
            }
            parts.push(format!("{body}:{type_id}"));
            if add_eos {
                parts.push(format!("{eos_piece}:{type_id}"));
            }
            parts
        };
        let single = wrap("$A", 0);
        let pair = [single.clone(), wrap("$B", 1)].concat();
        let template = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| Error::Tokenizer(format!("BOS/EOS template: {e}")))?
            .special_tokens(vec![(bos_piece.clone(), bos), (eos_piece.clone(), eos)])
            .build()
            .map_err(tokenizer_error)?;
        tokenizer.with_post_processor(Some(template));
    }
    Ok(tokenizer)
}

/// Every split of every normal piece into two vocabulary pieces, highest joined score
/// first; ties (LLaMA's runs of `▁` share one score) by the left then the right piece's
/// id, which is the order of LLaMA's own `tokenizer.json`.
pub fn merges_by_score(tokens: &[String], scores: &[f32], types: &[i64]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.as_str(), id))
        .collect();
    let mut ranked: Vec<(f32, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != token_type::NORMAL {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                ranked.push((scores[id], l, r));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked
        .into_iter()
        .map(|(_, l, r)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

fn tokenizer_error(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

fn bad(key: &str, what: &str) -> Error {
    Error::Tokenizer(format!("GGUF metadata `{key}` {what}"))
}

fn array<'a>(content: &'a Content, key: &str) -> Result<&'a [Value]> {
    match content.metadata.get(key) {
        Some(Value::Array(values)) => Ok(values),
        Some(_) => Err(bad(key, "is not an array")),
        None => Err(bad(key, "is missing")),
    }
}

fn strings(content: &Content, key: &str) -> Result<Vec<String>> {
    array(content, key)?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(bad(key, "holds a value that is not a string")),
        })
        .collect()
}

/// A numeric array of exactly `len` entries, as f64.
fn numbers(content: &Content, key: &str, len: usize) -> Result<Vec<f64>> {
    let values = array(content, key)?;
    if values.len() != len {
        return Err(bad(
            key,
            &format!("has {} entries for {len} tokens", values.len()),
        ));
    }
    values
        .iter()
        .map(|v| match v {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            other => integer(other)
                .map(|x| x as f64)
                .ok_or_else(|| bad(key, "holds a value that is not a number")),
        })
        .collect()
}

fn integer(v: &Value) -> Option<u32> {
    super::gguf::as_u64(v).and_then(|x| u32::try_from(x).ok())
}
