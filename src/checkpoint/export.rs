//! Writing a checkpoint as a Hugging Face folder, atomically.

use super::Checkpoint;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The `config.json` key under which a converted model's `ModConfig` is stored.
pub const MOD_SECTION: &str = "mod";

/// Writes `ckpt` as an HF folder at `dir`: `config.json` (the [`LlamaConfig`] fields plus
/// [`Checkpoint::extra_config`]), `model.safetensors` (every tensor, HF names, the
/// checkpoint's dtype; no `lm_head.weight` when embeddings are tied) and `tokenizer.json`.
///
/// Atomic: everything is written into a staging folder next to `dir`, which then replaces
/// `dir` by rename. On error, an existing `dir` is left as it was and no partial folder
/// remains.
///
/// [`LlamaConfig`]: crate::config::LlamaConfig
///
/// Errors: [`Error::Io`] for any file-system failure; [`Error::Tokenizer`] if the tokenizer
/// cannot be serialised; [`Error::Candle`] if the tensors cannot be written.
pub fn save_hf(ckpt: &Checkpoint, dir: &Path) -> Result<()> {
    write_dir_atomically(dir, |staging| {
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

/// Runs `write` on a fresh staging folder beside `dir`, then moves it to `dir` (replacing
/// an existing `dir`). On any error the staging folder is removed and `dir` is untouched.
///
/// Errors: those of `write`, and [`Error::Io`] for the folder operations.
pub fn write_dir_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = dir
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} names no folder", dir.display())))?
        .to_string_lossy()
        .into_owned();
    let staging = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;

    if let Err(e) = write(&staging) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    if let Err(e) = std::fs::rename(&staging, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        let _ = std::fs::remove_dir_all(&staging);
        return Err(Error::io(dir, e));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}
