//! The training state of a conversion on disk, for resuming: trained tensors, AdamW
//! moments, the step, the settings and what the run trains on.

use super::data::Corpus;
use super::trainer::Trainer;
use crate::error::{Error, Result};
use crate::fsutil::write_dir_atomically;
use std::path::{Path, PathBuf};

const STATE_FILE: &str = "state.safetensors";
const META_FILE: &str = "trainer.json";

impl Trainer {
    /// Writes the training state to `dir` atomically: every trained tensor, the AdamW
    /// moments (`state.safetensors`), and in `trainer.json` the step, the configs and what
    /// the run trains on (the base model's config, dtype and an embedding checksum; the
    /// corpus's [`Corpus::fingerprint`]). The data position is the step: batches are a pure
    /// function of corpus, seed and step.
    ///
    /// Errors: [`Error::Io`] / [`Error::Candle`] when writing fails (an existing `dir` is
    /// then left as it was).
    pub fn save_state(&self, dir: &Path, corpus: &Corpus) -> Result<()> {
        let mut tensors = self.opt.state()?;
        for (name, t) in self.trained_tensors() {
            tensors.insert(format!("param.{name}"), t);
        }
        let meta = serde_json::json!({
            "step": self.step,
            "optimizer_steps": self.opt.steps_taken(),
            "train": self.config,
            "mod": self.model.config(),
            "inputs": self.inputs(corpus),
        });
        write_dir_atomically(dir, |staging| {
            candle_core::safetensors::save(&tensors, staging.join(STATE_FILE))?;
            let meta_path = staging.join(META_FILE);
            std::fs::write(&meta_path, serde_json::to_string_pretty(&meta)?)
                .map_err(|e| Error::io(&meta_path, e))
        })
    }

    /// What this run trains on, as recorded in its state.
    fn inputs(&self, corpus: &Corpus) -> serde_json::Value {
        serde_json::json!({
            "model": self.base.config,
            "dtype": format!("{:?}", self.base.dtype()),
            "embedding_checksum": self.base_checksum,
            "corpus": corpus.fingerprint(),
        })
    }

    /// Restores a state written by [`save_state`](Self::save_state) into this trainer, so
    /// that training continues exactly where it stopped. The trainer must have the same
    /// settings, base model, dtype and corpus (`--seq-len` included), except that
    /// `config.steps` may be raised: the run then continues past its old end (the learning
    /// rate and compute budget schedules stretch to the new length from the current step).
    ///
    /// Errors: [`Error::Io`] for missing files; [`Error::Checkpoint`] for a malformed one;
    /// [`Error::Config`] naming what differs when the saved settings or inputs are not this
    /// trainer's, or when `config.steps` is below the saved step;
    /// [`Error::MissingTensor`] for a parameter or moment absent from the state.
    pub fn load_state(&mut self, dir: &Path, corpus: &Corpus) -> Result<()> {
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                path: meta_path.clone(),
                reason: e.to_string(),
            })?;
        let differs = |what: &str| Error::Config {
            path: Some(meta_path.clone()),
            reason: format!("the saved training state was made with another {what}"),
        };
        let mut saved_train = meta["train"].clone();
        let mut train = serde_json::to_value(&self.config)?;
        for v in [&mut saved_train, &mut train] {
            if let Some(obj) = v.as_object_mut() {
                obj.remove("steps");
            }
        }
        if saved_train != train {
            return Err(differs("training configuration"));
        }
        if meta["mod"] != serde_json::to_value(self.model.config())? {
            return Err(differs("conversion configuration (ModConfig)"));
        }
        let inputs = self.inputs(corpus);
        for (key, what) in [
            ("model", "base model"),
            ("embedding_checksum", "base model (its weights differ)"),
            ("dtype", "dtype"),
            ("corpus", "corpus or --seq-len"),
        ] {
            if meta["inputs"][key] != inputs[key] {
                return Err(differs(what));
            }
        }
        let counter = |key: &str| -> Result<usize> {
            meta[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::Checkpoint {
                    path: meta_path.clone(),
                    reason: format!("no `{key}`"),
                })
        };
        let step = counter("step")?;
        if step > self.config.steps {
            return Err(Error::Config {
                path: Some(meta_path),
                reason: format!(
                    "the saved state is at step {step}, past the {} steps asked for",
                    self.config.steps
                ),
            });
        }
        let opt_steps = counter("optimizer_steps")?;
        let state_path = dir.join(STATE_FILE);
        if !state_path.is_file() {
            return Err(Error::io(
                &state_path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no training state"),
            ));
        }
        let state =
            candle_core::safetensors::load(&state_path, &self.base.device()).map_err(|e| {
                Error::Checkpoint {
                    path: state_path.clone(),
                    reason: e.to_string(),
                }
            })?;
        // Everything is read and checked before anything is set: a bad state leaves the
        // trainer as it was.
        let mut params = Vec::new();
        for (name, var) in self.opt.vars() {
            let key = format!("param.{name}");
            let t = state
                .get(&key)
                .ok_or(Error::MissingTensor { name: key.clone() })?;
            if t.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    name: key,
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            params.push((var.clone(), t.to_dtype(var.dtype())?));
        }
        self.opt.load_state(&state, opt_steps)?;
        for (var, t) in params {
            var.set(&t)?;
        }
        self.step = step;
        Ok(())
    }

    /// The folder of the training state inside a conversion's output folder.
    pub fn state_dir(out: &Path) -> PathBuf {
        out.join("trainer-state")
    }
}
