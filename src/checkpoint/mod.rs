//! Loading and saving pretrained checkpoints.
//!
//! Two formats are read, both into one in-memory form, [`Checkpoint`], whose tensors carry
//! Hugging Face names and HF layout (`(out, in)` projection matrices, q/k rows in the
//! half-split RoPE order):
//!
//! - an HF folder ([`safetensors`]): `config.json`, `model.safetensors` (or shards listed in
//!   `model.safetensors.index.json`), `tokenizer.json`;
//! - a GGUF file ([`gguf`]): every tensor dequantized, q/k rows un-permuted, the tokenizer
//!   rebuilt from the metadata ([`tokenizer`]: byte-level BPE, or SentencePiece BPE for
//!   LLaMA-1/2 vocabularies, [`sentencepiece`]).
//!
//! A hub id (`owner/name`) is fetched with hf-hub ([`hub`]). [`export`] writes any
//! checkpoint back as an HF folder, atomically.

pub mod converted;
pub mod export;
pub mod gguf;
pub mod hub;
pub mod safetensors;
pub mod sentencepiece;
pub mod tokenizer;

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::Tokenizer;

/// A loaded checkpoint: config, named tensors and tokenizer.
#[derive(Clone)]
pub struct Checkpoint {
    /// The architecture, validated.
    pub config: LlamaConfig,
    /// Every tensor by HF name (`model.layers.{i}.self_attn.q_proj.weight`, ...), in the
    /// requested dtype, on the requested device. Tensors beyond the dense model (router
    /// gates of a converted model) are kept too.
    pub tensors: HashMap<String, Tensor>,
    /// The tokenizer (byte-level BPE for SmolLM2).
    pub tokenizer: Tokenizer,
    /// Sections of `config.json` beyond [`LlamaConfig`] that this crate writes and reads
    /// back, e.g. `mod` for a converted Mixture-of-Depths model.
    pub extra_config: serde_json::Map<String, serde_json::Value>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("extra_config", &self.extra_config)
            .finish()
    }
}

impl Checkpoint {
    /// Loads a model named by a GGUF file, an HF folder or, when no such path exists and
    /// the name looks like `owner/name`, a Hugging Face hub id.
    ///
    /// Weights are converted to `dtype` (F32, F16 or BF16) and placed on `device`.
    ///
    /// Errors: [`Error::Io`] (kind `NotFound`) for a path that does not exist and is no hub
    /// id; the errors of [`gguf::load`], [`safetensors::load_dir`] and [`hub::load`].
    pub fn load(model: &str, dtype: DType, device: &Device) -> Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            safetensors::load_dir(path, dtype, device)
        } else if path.is_file() {
            gguf::load(path, dtype, device)
        } else if hub::looks_like_repo_id(model) {
            hub::load(model, dtype, device)
        } else {
            Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ))
        }
    }

    /// Reads only the config of the model that [`load`](Self::load) would load: a
    /// folder's `config.json`, a GGUF's metadata, or a hub repo's `config.json` (fetched
    /// alone). Cheap: no tensor is read, so a run can be planned (e.g. its memory) before
    /// loading.
    ///
    /// Errors: as [`load`](Self::load), for the config part.
    pub fn read_config(model: &str) -> Result<LlamaConfig> {
        let path = Path::new(model);
        if path.is_dir() {
            LlamaConfig::from_json_file(path.join("config.json"))
        } else if path.is_file() {
            gguf::read_config(path)
        } else if hub::looks_like_repo_id(model) {
            LlamaConfig::from_json_file(&hub::fetch(model, "config.json")?)
        } else {
            Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ))
        }
    }

    /// Checks that every tensor the dense model needs is present with the shape the config
    /// implies.
    ///
    /// Errors: [`Error::MissingTensor`] naming the first absent tensor;
    /// [`Error::ShapeMismatch`] naming the tensor and both shapes.
    pub fn validate(&self) -> Result<()> {
        for (name, expected) in self.config.tensor_shapes() {
            self.tensor(&name, &expected)?;
        }
        Ok(())
    }

    /// The tensor `name`, checked to have shape `expected`.
    ///
    /// Errors: [`Error::MissingTensor`] when absent; [`Error::ShapeMismatch`] naming the
    /// tensor and both shapes.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<&Tensor> {
        let tensor = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        if tensor.dims() != expected {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: tensor.dims().to_vec(),
            });
        }
        Ok(tensor)
    }

    /// The dtype of the weights (that of the token embeddings).
    pub fn dtype(&self) -> DType {
        self.tensors
            .get("model.embed_tokens.weight")
            .map(|t| t.dtype())
            .unwrap_or(DType::F32)
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.tensors
            .get("model.embed_tokens.weight")
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu)
    }
}

/// Converts a loaded tensor to the requested float dtype and device.
///
/// Errors: [`Error::InvalidArgument`] if `dtype` is not F32, F16 or BF16.
pub(crate) fn to_model_dtype(t: Tensor, dtype: DType, device: &Device) -> Result<Tensor> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::InvalidArgument(format!(
            "model dtype must be f32, f16 or bf16, got {dtype:?}"
        )));
    }
    Ok(t.to_dtype(dtype)?.to_device(device)?)
}
