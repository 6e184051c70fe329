//! Converted (Mixture-of-Depths) checkpoints: an HF folder whose `config.json` has a `mod`
//! section and whose safetensors hold `model.layers.{j}.router.{weight,bias}`.

use super::export::{save_hf, MOD_SECTION};
use super::Checkpoint;
use crate::error::{Error, Result};
use crate::mod_config::ModConfig;
use crate::mod_model::ModModel;
use crate::model::Llama;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::Path;

impl ModModel {
    /// Loads a converted model written by [`save_converted`] (or any HF folder with a `mod`
    /// section and router tensors), in `dtype` on `device`.
    ///
    /// Errors: those of [`Checkpoint::load`] and [`ModModel::from_checkpoint`].
    pub fn load(model: &str, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::load(model, dtype, device)?)
    }

    /// Builds the model from a loaded converted checkpoint.
    ///
    /// Errors: [`Error::Config`] when the checkpoint has no valid `mod` section (it is not a
    /// converted model); [`Error::MissingTensor`] / [`Error::ShapeMismatch`] for a router
    /// tensor that is absent or misshapen; the errors of [`Llama::from_checkpoint`].
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        let section = ckpt.extra_config.get(MOD_SECTION).ok_or_else(|| {
            Error::config("no `mod` section in config.json: not a converted model")
        })?;
        let config: ModConfig = serde_json::from_value(section.clone())
            .map_err(|e| Error::config(format!("`mod` section: {e}")))?;
        let n = ckpt.config.num_hidden_layers;
        config.validate(n)?;
        let d = ckpt.config.hidden_size;
        let mut routers = HashMap::new();
        for j in config.routed_layer_indices(n)? {
            for (leaf, shape) in [("weight", vec![1, d]), ("bias", vec![1])] {
                let name = format!("model.layers.{j}.router.{leaf}");
                let t = ckpt.tensor(&name, &shape)?;
                routers.insert(name, t.to_dtype(DType::F32)?);
            }
        }
        let base = Llama::from_checkpoint(ckpt)?;
        let vb = VarBuilder::from_tensors(routers, DType::F32, &ckpt.device());
        ModModel::new(base, config, vb)
    }
}

/// The converted checkpoint: `base`'s tensors with `trained` ones (routers, and base
/// weights when the whole model was trained) put over them, and `config` as the `mod`
/// section. Router tensors are stored in f32 whatever the model dtype.
///
/// Errors: [`Error::Json`] if the config cannot be serialised.
pub fn converted_checkpoint(
    base: &Checkpoint,
    trained: &HashMap<String, Tensor>,
    config: &ModConfig,
) -> Result<Checkpoint> {
    let mut ckpt = base.clone();
    let dtype = base.dtype();
    for (name, t) in trained {
        let t = if name.contains(".router.") {
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
