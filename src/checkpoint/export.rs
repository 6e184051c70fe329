//! Writing a checkpoint as a Hugging Face folder, atomically.

use super::Checkpoint;
use crate::error::{Error, Result};
use crate::fsutil::write_files_atomically;
use std::path::Path;

/// The `config.json` key under which a converted model's `ModConfig` is stored.
pub const MOD_SECTION: &str = "mod";

/// Writes `ckpt` as an HF folder at `dir`: `config.json` (the [`LlamaConfig`] fields plus
/// [`Checkpoint::extra_config`]), `model.safetensors` (every tensor, HF names, the
/// checkpoint's dtype; no `lm_head.weight` when embeddings are tied) and `tokenizer.json`.
///
/// Atomic, file by file ([`write_files_atomically`]): the three files replace their
/// namesakes in `dir`; any other file of `dir` is left alone. On error `dir` is left as it
/// was and no partial file remains.
///
/// [`LlamaConfig`]: crate::config::LlamaConfig
///
/// Errors: [`Error::Io`] for any file-system failure; [`Error::Tokenizer`] if the tokenizer
/// cannot be serialised; [`Error::Candle`] if the tensors cannot be written.
pub fn save_hf(ckpt: &Checkpoint, dir: &Path) -> Result<()> {
    write_files_atomically(dir, |staging| {
        let mut config = serde_json::to_value(&ckpt.config)?;
        if let Some(obj) = config.as_object_mut() {
            for (k, v) in &ckpt.extra_config {
                obj.insert(k.clone(), v.clone());
            }
        }
        let config_path = staging.join("config.json");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
            .map_err(|e| Error::io(&config_path, e))?;

        let mut tensors = ckpt.tensors.clone();
        if ckpt.config.tie_word_embeddings {
            tensors.remove("lm_head.weight");
        }
        candle_core::safetensors::save(&tensors, staging.join("model.safetensors"))?;

        ckpt.tokenizer
            .save(staging.join("tokenizer.json"), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(())
    })
}
