//! Loading a converted model: the dense weights from a [`Checkpoint`], the routers and the
//! [`ModConfig`] from its `mod` section (written by
//! [`save_converted`](crate::checkpoint::converted::save_converted)).

use super::{ModConfig, ModModel};
use crate::checkpoint::export::MOD_SECTION;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::Llama;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::collections::HashMap;

impl ModModel {
    /// Loads a converted model written by [`save_converted`](crate::checkpoint::converted::save_converted) (or any HF folder with a `mod`
    /// section and router tensors, and skip-adapter tensors when its `mod` section names a
    /// rank), in `dtype` on `device`.
    ///
    /// Errors: those of [`Checkpoint::load`] and [`ModModel::from_checkpoint`].
    pub fn load(model: &str, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::load(model, dtype, device)?)
    }

    /// Builds the model from a loaded converted checkpoint.
    ///
    /// Errors: [`Error::Config`] when the checkpoint has no valid `mod` section (it is not a
    /// converted model); [`Error::MissingTensor`] / [`Error::ShapeMismatch`] for a router
    /// or skip-adapter tensor that is absent or misshapen; the errors of [`Llama::from_checkpoint`].
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
        let r = config.skip_adapter_rank;
        for j in config.routed_layer_indices(n)? {
            let mut tensors = vec![
                (format!("model.layers.{j}.router.weight"), vec![1, d]),
                (format!("model.layers.{j}.router.bias"), vec![1]),
            ];
            if r > 0 {
                tensors.push((
                    format!("model.layers.{j}.skip_adapter.down.weight"),
                    vec![r, d],
                ));
                tensors.push((
                    format!("model.layers.{j}.skip_adapter.up.weight"),
                    vec![d, r],
                ));
            }
            for (name, shape) in tensors {
                let t = ckpt.tensor(&name, &shape)?;
                routers.insert(name, t.to_dtype(DType::F32)?);
            }
        }
        let base = Llama::from_checkpoint(ckpt)?;
        let vb = VarBuilder::from_tensors(routers, DType::F32, &ckpt.device());
        ModModel::new(base, config, vb)
    }
}
