//! Converted (Mixture-of-Depths) checkpoints: an HF folder whose `config.json` has a `mod`
//! section and whose safetensors hold `model.layers.{j}.router.{weight,bias}` (and
//! `model.layers.{j}.skip_adapter.{down,up}.weight` with skip adapters). Loading one
//! as a model is [`crate::ModModel::load`].

use super::export::{save_hf, MOD_SECTION};
use super::Checkpoint;
use crate::error::Result;
use crate::mixture_of_depths::ModConfig;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The converted checkpoint: `base`'s tensors with `trained` ones (routers, and base
/// weights when the whole model was trained) put over them, and `config` as the `mod`
/// section. Router and skip-adapter tensors are stored in f32 whatever the model dtype.
///
/// Errors: [`crate::Error::Json`] if the config cannot be serialised.
pub fn converted_checkpoint(
    base: &Checkpoint,
    trained: &HashMap<String, Tensor>,
    config: &ModConfig,
) -> Result<Checkpoint> {
    let mut ckpt = base.clone();
    let dtype = base.dtype();
    for (name, t) in trained {
        let t = if name.contains(".router.") || name.contains(".skip_adapter.") {
            t.to_dtype(DType::F32)?
        } else {
            t.to_dtype(dtype)?
        };
        ckpt.tensors.insert(name.clone(), t);
    }
    ckpt.extra_config
        .insert(MOD_SECTION.to_string(), serde_json::to_value(config)?);
    Ok(ckpt)
}

/// Writes a converted checkpoint as an HF folder, atomically (see [`save_hf`]).
///
/// Errors: those of [`converted_checkpoint`] and [`save_hf`].
pub fn save_converted(
    dir: &Path,
    base: &Checkpoint,
    trained: &HashMap<String, Tensor>,
    config: &ModConfig,
) -> Result<()> {
    save_hf(&converted_checkpoint(base, trained, config)?, dir)
}
