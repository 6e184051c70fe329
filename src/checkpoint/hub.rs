//! Models named by a Hugging Face hub id (`owner/name`), fetched with hf-hub.

use super::Checkpoint;
use crate::error::{Error, Result};
use candle_core::{DType, Device};
use std::path::PathBuf;

/// Whether `name` has the shape of a hub id: `owner/name`, one slash, no path-only
/// characters, not a file name with a checkpoint extension, and no local folder called
/// `owner`. Used by [`Checkpoint::load`] only when no such path exists.
pub fn looks_like_repo_id(name: &str) -> bool {
    let file_like = [".gguf", ".safetensors", ".json", ".bin"]
        .iter()
        .any(|ext| name.ends_with(ext));
    let owner_is_local = name
        .split('/')
        .next()
        .is_some_and(|owner| std::path::Path::new(owner).is_dir());
    if file_like || owner_is_local {
        return false;
    }
    let mut parts = name.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(owner), Some(repo), None) => [owner, repo].iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with('.')
        }),
        _ => false,
    }
}

/// Fetches `config.json`, the safetensors weights (and their index when sharded) and
/// `tokenizer.json` of hub repo `repo` (main revision) into the hf-hub cache, then loads
/// them as an HF folder.
///
/// Files already in the local hf-hub cache are used without network. With
/// `HF_HUB_OFFLINE=1` only the cache is consulted.
///
/// Errors: [`Error::Hub`] naming the repo when a file can be neither found in the cache
/// nor downloaded (every machine without internet access lands here); then the errors of
/// [`super::safetensors::load_dir`].
pub fn load(repo: &str, dtype: DType, device: &Device) -> Result<Checkpoint> {
    let config = fetch(repo, "config.json")?;
    let dir = config
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| Error::Hub {
            repo: repo.to_string(),
            reason: "cached file has no folder".to_string(),
        })?;
    if fetch(repo, "model.safetensors.index.json").is_ok() {
        let index = std::fs::read_to_string(dir.join("model.safetensors.index.json"))
            .map_err(|e| Error::io(dir.join("model.safetensors.index.json"), e))?;
        let json: serde_json::Value = serde_json::from_str(&index)?;
        let mut shards: Vec<String> = json["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for shard in shards {
            fetch(repo, &shard)?;
        }
    } else {
        fetch(repo, "model.safetensors")?;
    }
    fetch(repo, "tokenizer.json")?;
    super::safetensors::load_dir(&dir, dtype, device)
}

/// One file of `repo`: from the hf-hub cache, else downloaded (unless `HF_HUB_OFFLINE`).
///
/// Errors: [`Error::Hub`] naming the repo and the file.
pub fn fetch(repo: &str, file: &str) -> Result<PathBuf> {
    let hub_error = |reason: String| Error::Hub {
        repo: repo.to_string(),
        reason: format!("{file}: {reason}"),
    };
    let cache = hf_hub::Cache::from_env();
    if let Some(path) = cache.model(repo.to_string()).get(file) {
        return Ok(path);
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    if offline {
        return Err(hub_error(
            "not in the local hf-hub cache and HF_HUB_OFFLINE is set".to_string(),
        ));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(false)
        .build()
        .map_err(|e| hub_error(e.to_string()))?;
    api.model(repo.to_string())
        .get(file)
        .map_err(|e| hub_error(e.to_string()))
}
