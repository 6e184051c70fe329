//! GGUF files (llama.cpp): metadata to [`LlamaConfig`], tensors dequantized to HF names and
//! layout, tokenizer rebuilt from the metadata.

use super::{to_model_dtype, tokenizer, Checkpoint};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Loads a GGUF file of a LLaMA-architecture model.
///
/// Every tensor is dequantized (any type candle reads: F32, F16, BF16, Q4_0 ... Q8_K) to
/// f32, renamed to its HF name, converted to `dtype` and placed on `device`. GGUF stores
/// the rows of `attn_q` / `attn_k` permuted for interleaved RoPE; they are un-permuted per
/// head here, so one model code and one RoPE serve both formats and an export is in HF
/// layout. Without `output.weight` the embeddings are tied.
///
/// Errors: [`Error::Io`] if the file cannot be opened; [`Error::Checkpoint`] for a
/// truncated or malformed file; [`Error::UnsupportedTensorType`] for a tensor type candle
/// cannot dequantize; [`Error::UnsupportedArchitecture`] unless
/// `general.architecture` is `llama`; [`Error::Config`] for missing `llama.*` keys;
/// [`Error::Tokenizer`] for a tokenizer the metadata cannot describe;
/// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] from [`Checkpoint::validate`].
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut file).map_err(|e| read_error(path, e))?;
    let config = config_from_metadata(&content, path)?;
    let tokenizer = tokenizer::from_gguf(&content)?;

    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for gguf_name in names {
        let Some(hf_name) = hf_name(gguf_name) else {
            tracing::debug!("ignoring GGUF tensor {gguf_name}");
            continue;
        };
        let q = content
            .tensor(&mut file, gguf_name, &Device::Cpu)
            .map_err(|e| read_error(path, e))?;
        let mut w = q.dequantize(&Device::Cpu)?;
        let rope_heads = rope_heads(&hf_name, &config);
        // A q/k matrix whose rows do not split into the heads' RoPE pairs cannot be
        // un-permuted; it is kept as stored and `validate` reports its shape.
        if let Some(heads) = rope_heads {
            if w.rank() == 2 && w.dim(0)? % (2 * heads) == 0 {
                w = unpermute_rope_rows(&w, heads)?;
            }
        }
        tensors.insert(hf_name, to_model_dtype(w, dtype, device)?);
    }

    let ckpt = Checkpoint {
        config,
        tensors,
        tokenizer,
        extra_config: Default::default(),
    };
    ckpt.validate()?;
    Ok(ckpt)
}

/// The quantized matrices of a GGUF file as GGML blocks, by HF name and in HF layout
/// (`(out, in)`; q/k rows un-permuted block-row by block-row), for quantized inference
/// with exactly the file's weights ([`crate::Llama::use_blocks`]). Matrices stored as
/// F32 / F16 / BF16 and 1-D tensors (norms) are left out: they run dense.
///
/// Errors: as [`load`] for the file and the config.
pub fn load_blocks(path: &Path) -> Result<HashMap<String, std::sync::Arc<QTensor>>> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut file).map_err(|e| read_error(path, e))?;
    let config = config_from_metadata(&content, path)?;
    let mut blocks = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for gguf_name in names {
        let info = &content.tensor_infos[gguf_name];
        let dense = matches!(
            info.ggml_dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        let Some(hf_name) = hf_name(gguf_name) else {
            continue;
        };
        if dense || info.shape.rank() != 2 {
            continue;
        }
        let q = content
            .tensor(&mut file, gguf_name, &Device::Cpu)
            .map_err(|e| read_error(path, e))?;
        let q = match rope_heads(&hf_name, &config) {
            Some(heads) => unpermute_block_rows(&q, heads)?,
            None => q,
        };
        blocks.insert(hf_name, std::sync::Arc::new(q));
    }
    Ok(blocks)
}

/// The heads whose rows llama.cpp permuted in the tensor named `hf_name` (q and k
/// projections), or `None`.
fn rope_heads(hf_name: &str, config: &LlamaConfig) -> Option<usize> {
    if hf_name.ends_with("q_proj.weight") {
        Some(config.num_attention_heads)
    } else if hf_name.ends_with("k_proj.weight") {
        Some(config.num_kv_heads())
    } else {
        None
    }
}

/// [`unpermute_rope_rows`] on GGML blocks: each row of a `(out, in)` block matrix is a
/// whole number of blocks, so rows move as byte ranges.
fn unpermute_block_rows(q: &QTensor, n_heads: usize) -> Result<QTensor> {
    let (out, _) = q.shape().dims2()?;
    let data = q.data()?;
    let row_bytes = data.len() / out;
    let head_dim = out / n_heads;
    let half = head_dim / 2;
    let mut rows = Vec::with_capacity(data.len());
    // HF row (h, t, j) is GGUF row (h, j, t).
    for h in 0..n_heads {
        for t in 0..2 {
            for j in 0..half {
                let g = h * head_dim + j * 2 + t;
                rows.extend_from_slice(&data[g * row_bytes..(g + 1) * row_bytes]);
            }
        }
    }
    Ok(qtensor_from_ggml(
        q.dtype(),
        &rows,
        q.shape().dims().to_vec(),
        &Device::Cpu,
    )?)
}

/// Reads only the metadata of a GGUF file and builds its [`LlamaConfig`] (no tensor is
/// read).
///
/// Errors: as [`load`] for the file and the config.
pub fn read_config(path: &Path) -> Result<LlamaConfig> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut file).map_err(|e| read_error(path, e))?;
    config_from_metadata(&content, path)
}

/// Maps a candle GGUF read error to a typed one: an unknown tensor type, or a malformed or
/// truncated file.
fn read_error(path: &Path, e: candle_core::Error) -> Error {
    let reason = e.to_string();
    if reason.contains("unknown dtype") {
        Error::UnsupportedTensorType {
            path: path.to_path_buf(),
            reason,
        }
    } else {
        Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        }
    }
}

/// The HF name of a llama.cpp tensor name, or `None` for tensors the model does not use
/// (e.g. `rope_freqs.weight`).
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let direct = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = direct {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf_leaf = match leaf {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_leaf}"))
}

/// Undoes llama.cpp's q/k row permutation: GGUF row `(h, j, t)` (head, pair, half) holds
/// HF row `(h, t, j)`.
///
/// `w`: `(n_heads * head_dim, in)`. Returns the same shape in HF (half-split RoPE) order.
pub fn unpermute_rope_rows(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let head_dim = out / n_heads;
    Ok(w.reshape((n_heads, head_dim / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

fn meta<'a>(content: &'a Content, key: &str, path: &Path) -> Result<&'a Value> {
    content.metadata.get(key).ok_or_else(|| Error::Config {
        path: Some(path.to_path_buf()),
        reason: format!("GGUF metadata lacks `{key}`"),
    })
}

fn meta_usize(content: &Content, key: &str, path: &Path) -> Result<usize> {
    let v = meta(content, key, path)?;
    as_u64(v).map(|v| v as usize).ok_or_else(|| Error::Config {
        path: Some(path.to_path_buf()),
        reason: format!("GGUF metadata `{key}` is not an integer: {v:?}"),
    })
}

/// A GGUF integer of any width and sign, when it is a non-negative integer.
pub(crate) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        // The f32's shortest decimal, as the config.json it was written from says it
        // (1e-5, not 9.99999974e-6), so both formats give one config.
        Value::F32(x) => x.to_string().parse().ok(),
        Value::F64(x) => Some(*x),
        other => as_u64(other).map(|x| x as f64),
    }
}

/// Builds the [`LlamaConfig`] from the `general.architecture` and `llama.*` keys.
///
/// Errors: [`Error::UnsupportedArchitecture`] unless the architecture is `llama`;
/// [`Error::Config`] for a missing or mistyped key.
pub fn config_from_metadata(content: &Content, path: &Path) -> Result<LlamaConfig> {
    let arch = match meta(content, "general.architecture", path)? {
        Value::String(s) => s.clone(),
        other => format!("{other:?}"),
    };
    if arch != "llama" {
        return Err(Error::UnsupportedArchitecture(arch));
    }
    let heads = meta_usize(content, "llama.attention.head_count", path)?;
    let kv_heads = match content.metadata.get("llama.attention.head_count_kv") {
        Some(_) => meta_usize(content, "llama.attention.head_count_kv", path)?,
        None => heads,
    };
    let vocab_size = match content.metadata.get("llama.vocab_size") {
        Some(_) => meta_usize(content, "llama.vocab_size", path)?,
        None => match meta(content, "tokenizer.ggml.tokens", path)? {
            Value::Array(tokens) => tokens.len(),
            _ => 0,
        },
    };
    let float = |key: &str, default: f64| -> Result<f64> {
        match content.metadata.get(key) {
            None => Ok(default),
            Some(v) => as_f64(v).ok_or_else(|| Error::Config {
                path: Some(path.to_path_buf()),
                reason: format!("GGUF metadata `{key}` is not a number: {v:?}"),
            }),
        }
    };
    let token_id = |key: &str| content.metadata.get(key).and_then(as_u64).map(|v| v as u32);
    let config = LlamaConfig {
        hidden_size: meta_usize(content, "llama.embedding_length", path)?,
        intermediate_size: meta_usize(content, "llama.feed_forward_length", path)?,
        num_hidden_layers: meta_usize(content, "llama.block_count", path)?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: float("llama.rope.freq_base", 10_000.0)?,
        max_position_embeddings: meta_usize(content, "llama.context_length", path)?,
        vocab_size,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: token_id("tokenizer.ggml.eos_token_id"),
        architectures: vec!["LlamaForCausalLM".to_string()],
        model_type: "llama".to_string(),
        rope_scaling: None,
        attention_bias: false,
        head_dim: None,
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::Config {
            path: Some(path.to_path_buf()),
            reason: "rope_freqs.weight (LLaMA-3.1-style RoPE scaling) is not supported".to_string(),
        });
    }
    config.validate().map_err(|e| match e {
        Error::Config { path: None, reason } => Error::Config {
            path: Some(path.to_path_buf()),
            reason,
        },
        other => other,
    })?;
    Ok(config)
}
