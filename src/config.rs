//! Model configuration: the HF `config.json` of a LLaMA-family decoder.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Architecture hyper-parameters of a LLaMA-family decoder, in the field names of the
/// Hugging Face `config.json` (`LlamaConfig` in transformers).
///
/// Built from a `config.json` ([`LlamaConfig::from_json_file`]) or from GGUF metadata
/// (`llama.*` keys, see [`crate::checkpoint::gguf`]). Always [`validate`](Self::validate)d
/// before a model is built from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Width d of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers L.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Epsilon of every RMSNorm.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base frequency θ.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Context length: the largest number of positions the model accepts.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether `lm_head` shares the token embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Begin-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id (also the document separator when packing a corpus).
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// HF architecture names, e.g. `["LlamaForCausalLM"]`.
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    /// HF model type; must be `llama`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// RoPE scaling (LLaMA-3.1 style). Not implemented: must be absent or null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Biases on the attention projections. Not implemented: must be false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attention_bias: bool,
    /// Explicit head width; must equal `hidden_size / num_attention_heads` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
}

/// Folds the newer transformers layout of RoPE settings into `rope_theta`:
/// `"rope_parameters": {"rope_type": "default", "rope_theta": θ}` (and a `rope_scaling`
/// that only names the default type) mean plain RoPE at θ.
///
/// Errors: [`Error::Config`] for a rope type other than `default` (YaRN, LLaMA-3.1
/// scaling, ... are not implemented), per-layer-type parameters, a partial rotary factor,
/// a value that is not an object, a non-numeric θ, or a nested θ that contradicts a
/// top-level `rope_theta`.
fn normalize_rope(value: &mut serde_json::Value) -> Result<()> {
    let Some(obj) = value.as_object_mut() else {
        return Ok(());
    };
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(params) = obj.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        let Some(fields) = params.as_object() else {
            return Err(Error::config(format!(
                "{key} must be an object, got {params}"
            )));
        };
        // transformers' per-layer-type form: {"full_attention": {...}, ...}.
        if fields.values().any(|v| v.is_object()) {
            return Err(Error::config(format!(
                "{key}: per-layer-type RoPE parameters are not supported"
            )));
        }
        if let Some(f) = fields
            .get("partial_rotary_factor")
            .filter(|f| f.as_f64() != Some(1.0))
        {
            return Err(Error::config(format!(
                "{key}: partial_rotary_factor {f} is not supported (RoPE over the whole head)"
            )));
        }
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(|t| t.as_str());
        match kind {
            Some("default") => {}
            None if key == "rope_parameters" => {}
            other => {
                return Err(Error::config(format!(
                    "{key}: rope type {} is not supported (only default RoPE)",
                    other.unwrap_or("(unnamed)")
                )))
            }
        }
        if let Some(theta) = params.get("rope_theta") {
            let theta = theta.as_f64().ok_or_else(|| {
                Error::config(format!("{key}.rope_theta is not a number: {theta}"))
            })?;
            match obj.get("rope_theta").and_then(|t| t.as_f64()) {
                Some(top) if top != theta => {
                    return Err(Error::config(format!(
                        "rope_theta {top} contradicts {key}.rope_theta {theta}"
                    )))
                }
                _ => {
                    obj.insert("rope_theta".to_string(), theta.into());
                }
            }
        }
        obj.remove(key);
    }
    Ok(())
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".to_string()]
}
fn default_model_type() -> String {
    "llama".to_string()
}

impl LlamaConfig {
    /// Reads and validates an HF `config.json`.
    ///
    /// Errors: [`Error::Io`] if the file cannot be read; [`Error::Config`] if it is not
    /// JSON, lacks a required field (`hidden_size`, `intermediate_size`,
    /// `num_hidden_layers`, `num_attention_heads`, `vocab_size`) or is inconsistent;
    /// [`Error::UnsupportedArchitecture`] if `model_type` is not `llama`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config { path: None, reason } => Error::Config {
                path: Some(path.to_path_buf()),
                reason,
            },
            other => other,
        })
    }

    /// Parses and validates the text of an HF `config.json`; errors as
    /// [`from_json_file`](Self::from_json_file).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::config(e.to_string()))?;
        normalize_rope(&mut value)?;
        let cfg: LlamaConfig = serde_json::from_value(value).map_err(|e| {
            // Another architecture's config (GPT-2's `n_embd`, `n_head`, ...) lacks the
            // LLaMA fields: report the architecture, not the first missing field.
            let model_type = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("model_type")?.as_str().map(String::from));
            match model_type {
                Some(t) if t != "llama" => Error::UnsupportedArchitecture(t),
                _ => Error::config(e.to_string()),
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Number of key/value heads (`num_key_value_heads`, or the query heads if absent).
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head, `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks that the numbers describe a buildable LLaMA decoder.
    ///
    /// Errors: [`Error::UnsupportedArchitecture`] for a `model_type` other than `llama`;
    /// [`Error::Config`] for a zero size, a hidden size not divisible by the heads, query
    /// heads not divisible by the KV heads, an odd head width (RoPE rotates pairs), or a
    /// non-positive `rms_norm_eps` / `rope_theta`.
    pub fn validate(&self) -> Result<()> {
        if self.model_type != "llama" {
            return Err(Error::UnsupportedArchitecture(self.model_type.clone()));
        }
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in sizes {
            if value == 0 {
                return Err(Error::config(format!("`{name}` must be positive")));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::config(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(Error::config(format!(
                "num_attention_heads {} is not divisible by num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            )));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(Error::config(
                "rope_scaling is not supported (LLaMA-3.1-style RoPE)",
            ));
        }
        if self.attention_bias {
            return Err(Error::config("attention_bias = true is not supported"));
        }
        if let Some(h) = self.head_dim {
            if h != self.head_dim() {
                return Err(Error::config(format!(
                    "head_dim {h} differs from hidden_size / num_attention_heads = {}",
                    self.head_dim()
                )));
            }
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::config(format!(
                "head dimension {} must be even for RoPE",
                self.head_dim()
            )));
        }
        if !(self.rms_norm_eps > 0.0) || !(self.rope_theta > 0.0) {
            return Err(Error::config(
                "rms_norm_eps and rope_theta must be positive",
            ));
        }
        Ok(())
    }

    /// The shape of every tensor the dense model needs, by HF name, in checkpoint order:
    /// embeddings `(vocab, d)`, per layer the attention projections `(out, in)`, the MLP
    /// projections and the two RMSNorm weights `(d,)`, the final norm, and `lm_head`
    /// `(vocab, d)` unless the embeddings are tied.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.hidden_size;
        let kv = self.num_kv_heads() * self.head_dim();
        let f = self.intermediate_size;
        let mut shapes = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, d],
        )];
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            shapes.extend([
                (format!("{p}.input_layernorm.weight"), vec![d]),
                (format!("{p}.self_attn.q_proj.weight"), vec![d, d]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, d]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, d]),
                (format!("{p}.self_attn.o_proj.weight"), vec![d, d]),
                (format!("{p}.post_attention_layernorm.weight"), vec![d]),
                (format!("{p}.mlp.gate_proj.weight"), vec![f, d]),
                (format!("{p}.mlp.up_proj.weight"), vec![f, d]),
                (format!("{p}.mlp.down_proj.weight"), vec![d, f]),
            ]);
        }
        shapes.push(("model.norm.weight".to_string(), vec![d]));
        if !self.tie_word_embeddings {
            shapes.push(("lm_head.weight".to_string(), vec![self.vocab_size, d]));
        }
        shapes
    }
}
