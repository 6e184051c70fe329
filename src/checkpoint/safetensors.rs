//! Hugging Face checkpoint folders: `config.json`, safetensors weights (one file or
//! sharded), `tokenizer.json`.

use super::{to_model_dtype, Checkpoint};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Loads an HF folder: `config.json` (with an optional `mod` section kept in
/// [`Checkpoint::extra_config`]), `model.safetensors` or the shards that
/// `model.safetensors.index.json` lists, and `tokenizer.json`.
///
/// Tensors (f32, f16 or bf16 on disk) are converted to `dtype` on `device`. With
/// `tie_word_embeddings`, a stored `lm_head.weight` is ignored.
///
/// Errors: [`Error::Io`] for a missing file; [`Error::Config`] /
/// [`Error::UnsupportedArchitecture`] for a bad `config.json`; [`Error::Checkpoint`] for a
/// truncated or malformed safetensors file or index; [`Error::MissingTensor`] /
/// [`Error::ShapeMismatch`] from [`Checkpoint::validate`]; [`Error::Tokenizer`] for an
/// unreadable `tokenizer.json`.
pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    let config_path = dir.join("config.json");
    let config = LlamaConfig::from_json_file(&config_path)?;
    let extra_config = read_extra_config(&config_path)?;

    let mut tensors = HashMap::new();
    for file in weight_files(dir)? {
        let path = dir.join(&file);
        if !path.is_file() {
            return Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "weight file not found"),
            ));
        }
        // SAFETY: the file is mapped read-only for the duration of this loop and each
        // tensor is copied out of it (candle's CPU tensors own their memory); the map is
        // dropped before returning. A file changed by another process while it is mapped
        // is outside what any reader can guard against. Mapping instead of reading keeps
        // the file's bytes out of the heap: peak memory is the converted tensors alone.
        let mapped =
            unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }.map_err(|e| {
                Error::Checkpoint {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
        for (name, _) in mapped.tensors() {
            let t = mapped
                .load(&name, &Device::Cpu)
                .map_err(|e| Error::Checkpoint {
                    path: path.clone(),
                    reason: format!("{name}: {e}"),
                })?;
            // Router gates stay f32: a gate near p must decide as it did when saved.
            let want = if name.contains(".router.") {
                candle_core::DType::F32
            } else {
                dtype
            };
            tensors.insert(name, to_model_dtype(t, want, device)?);
        }
    }
    if config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }

    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Error::io(
            &tok_path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
        ));
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;

    let ckpt = Checkpoint {
        config,
        tensors,
        tokenizer,
        extra_config,
    };
    ckpt.validate()?;
    Ok(ckpt)
}

/// The safetensors files of a folder: the shards of `model.safetensors.index.json` when
/// it exists, else `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<String>> {
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Ok(vec!["model.safetensors".to_string()]);
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let malformed = |reason: String| Error::Checkpoint {
        path: index.clone(),
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| malformed("no `weight_map` object".to_string()))?;
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| malformed(format!("`{name}` maps to a non-string")))?;
        files.insert(file.to_string());
    }
    Ok(files.into_iter().collect())
}

/// The sections of `config.json` that [`LlamaConfig`] does not hold and this crate writes
/// (`mod`).
fn read_extra_config(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: Some(path.to_path_buf()),
        reason: e.to_string(),
    })?;
    let mut extra = serde_json::Map::new();
    if let Some(section) = json.get(super::export::MOD_SECTION) {
        extra.insert(super::export::MOD_SECTION.to_string(), section.clone());
    }
    Ok(extra)
}
