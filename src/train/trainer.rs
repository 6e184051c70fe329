//! The conversion trainer: LM loss plus the load-reducing objective, AdamW, checkpoints.

use super::data::Corpus;
use super::optim::{AdamW, AdamWParams};
use super::schedule::{compute_budget, lr_multiplier};
use crate::checkpoint::converted::{converted_checkpoint, save_converted};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::fsutil::write_dir_atomically;
use crate::loss;
use crate::mixture_of_depths::{ModConfig, RouterKind};
use crate::mixture_of_depths::{ModModel, Mode};
use crate::model::lora::seeded_lora_a;
use crate::model::{Batch, Llama, LoraConfig};
use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which parameters a conversion trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trainable {
    /// Only the routers; the base model is frozen (no optimizer state). The default: it
    /// fits a small budget on a CPU and keeps the pretrained model intact.
    Routers,
    /// Low-rank adapters on every projection plus the routers (LoRA, Hu et al. 2021): the
    /// base heals around its routing at a fraction of the optimizer state; adapters are
    /// merged into the weights when the converted model is saved.
    Lora,
    /// Every parameter (full-parameter training, as in the MoDification paper, which trained
    /// on about 10 B tokens). Also adapts the model to the corpus, so compare against a dense
    /// model fine-tuned on the same tokens.
    All,
}

/// What the converted model is trained to match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Next-token cross-entropy on the corpus (the paper's objective). Once base weights
    /// train, it also fits the corpus (domain adaptation).
    Lm,
    /// Self-distillation: per-token `KL(original ‖ converted)`, the original being the
    /// pretrained model with every gate open (one forward without gradient per step). Keeps
    /// the converted model a cheaper copy of the original.
    Kl,
    /// The sum of both.
    KlLm,
}

impl Objective {
    /// Whether the objective needs the original model's logits.
    pub fn needs_teacher(&self) -> bool {
        !matches!(self, Objective::Lm)
    }
}

/// Training hyper-parameters. Defaults are the reference prototype's recipe: 80 steps of
/// 4 × 256 tokens, router lr 1e-3, base lr 3e-5, constant schedule, no weight decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Optimisation steps.
    pub steps: usize,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches accumulated per step.
    pub grad_accum: usize,
    /// AdamW learning rate of the routers.
    pub router_lr: f64,
    /// AdamW learning rate of the base weights (with [`Trainable::All`]).
    pub base_lr: f64,
    /// AdamW learning rate of the LoRA adapters (with [`Trainable::Lora`]).
    pub lora_lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of the peak (cosine decay; 1 = constant).
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm.
    pub grad_clip: Option<f64>,
    /// Seed of the data order (a run is a pure function of seed and step).
    pub seed: u64,
    /// Which parameters train.
    pub trainable: Trainable,
    /// Adapter rank and scale (with [`Trainable::Lora`]).
    pub lora: LoraConfig,
    /// What the converted model is trained to match.
    pub objective: Objective,
    /// Target compute fraction of the dense model (whole model, inference FLOPs): the load
    /// term pushes every gate while the pass spends more (one budget for all routed
    /// layers). Takes precedence over `target_kept`.
    pub target_compute: Option<f64>,
    /// Fraction of the steps over which the compute budget is lowered from 1 to
    /// `target_compute` (0 = the target from the first step).
    pub budget_ramp: f64,
    /// Target kept fraction: the load term pushes only while the kept fraction is above it
    /// (mean over routed layers, or per layer with `target_per_layer`).
    pub target_kept: Option<f64>,
    /// Apply `target_kept` per layer instead of to the mean.
    pub target_per_layer: bool,
    /// Weight of the MoD auxiliary predictor loss (top-k routers only).
    pub topk_aux_weight: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 80,
            batch_size: 4,
            grad_accum: 1,
            router_lr: 1e-3,
            base_lr: 3e-5,
            lora_lr: 2e-4,
            warmup_steps: 0,
            min_lr_ratio: 1.0,
            weight_decay: 0.0,
            grad_clip: Some(1.0),
            seed: 2,
            trainable: Trainable::Routers,
            lora: LoraConfig::default(),
            objective: Objective::Lm,
            target_compute: None,
            budget_ramp: 0.5,
            target_kept: None,
            target_per_layer: false,
            topk_aux_weight: 0.1,
        }
    }
}

impl TrainConfig {
    /// Checks ranges.
    ///
    /// Errors: [`Error::InvalidArgument`] for zero steps / batch / accumulation, a
    /// non-positive learning rate, a target (kept or compute fraction) outside (0, 1], a
    /// non-positive clip norm, or a LoRA rank of 0 (the rank's upper bound, the hidden size,
    /// is checked by [`Trainer::new`]).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            return bad("steps, batch_size and grad_accum must be positive".into());
        }
        if !(self.router_lr > 0.0) || !(self.base_lr > 0.0) || !(self.lora_lr > 0.0) {
            return bad("learning rates must be positive".into());
        }
        if let Some(t) = self.target_kept {
            if !(t > 0.0 && t <= 1.0) {
                return bad(format!("target kept fraction {t} is outside (0, 1]"));
            }
        }
        if let Some(t) = self.target_compute {
            if !(t > 0.0 && t <= 1.0) {
                return bad(format!("target compute fraction {t} is outside (0, 1]"));
            }
        }
        if !(0.0..=1.0).contains(&self.budget_ramp) {
            return bad(format!(
                "budget_ramp {} is outside [0, 1]",
                self.budget_ramp
            ));
        }
        if self.trainable == Trainable::Lora {
            self.lora.validate(usize::MAX)?;
        }
        if let Some(c) = self.grad_clip {
            if !(c > 0.0) {
                return bad(format!("grad_clip {c} must be positive"));
            }
        }
        if !(self.min_lr_ratio >= 0.0 && self.min_lr_ratio <= 1.0) {
            return bad(format!(
                "min_lr_ratio {} is outside [0, 1]",
                self.min_lr_ratio
            ));
        }
        Ok(())
    }
}

/// What one optimisation step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// The step just completed (1-based).
    pub step: usize,
    /// Mean LM cross-entropy over the step's micro-batches.
    pub lm_loss: f64,
    /// Mean distillation KL (0 for the LM objective).
    pub kl_loss: f64,
    /// Compute fraction of the converted model on the step's tokens (inference FLOPs).
    pub compute_fraction: f64,
    /// Mean load-reducing loss.
    pub load_loss: f64,
    /// Mean top-k auxiliary predictor loss (0 for threshold-p).
    pub aux_loss: f64,
    /// Kept fraction per routed layer on the step's training tokens.
    pub kept_fraction: Vec<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed.
    pub tokens: usize,
    /// Wall time of the step, seconds.
    pub seconds: f64,
}

impl StepReport {
    /// Mean kept fraction over routed layers.
    pub fn mean_kept(&self) -> f64 {
        self.kept_fraction.iter().sum::<f64>() / self.kept_fraction.len().max(1) as f64
    }
}

/// Trains a [`ModModel`] made from a pretrained checkpoint.
pub struct Trainer {
    model: ModModel,
    /// The original model (every gate open, no adapter) for the distillation objective:
    /// it shares the checkpoint's tensors, so it costs no weight memory.
    teacher: Option<Llama>,
    opt: AdamW,
    base: Checkpoint,
    config: TrainConfig,
    step: usize,
}

const STATE_FILE: &str = "state.safetensors";
const META_FILE: &str = "trainer.json";

impl Trainer {
    /// A freshly converted model (routers: weight 0, bias `gate_init_bias`) ready to train.
    ///
    /// Errors: [`Error::InvalidArgument`] from [`TrainConfig::validate`]; [`Error::Config`]
    /// from [`ModConfig::validate`]; the errors of [`Checkpoint::validate`].
    pub fn new(base: &Checkpoint, mod_config: ModConfig, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        base.validate()?;
        mod_config.validate_fresh(base.config.num_hidden_layers)?;
        if config.trainable == Trainable::Lora {
            config.lora.validate(base.config.hidden_size)?;
        }
        let device = base.device();
        let varmap = VarMap::new();
        let base_vb = match config.trainable {
            Trainable::Routers | Trainable::Lora => {
                VarBuilder::from_tensors(base.tensors.clone(), base.dtype(), &device)
            }
            Trainable::All => {
                let mut data = varmap.data().lock().map_err(|_| poisoned())?;
                for (name, _) in base.config.tensor_shapes() {
                    data.insert(name.clone(), Var::from_tensor(&base.tensors[&name])?);
                }
                drop(data);
                VarBuilder::from_varmap(&varmap, base.dtype(), &device)
            }
        };
        let mut llama = Llama::load(base_vb, &base.config)?;
        if config.trainable == Trainable::Lora {
            llama.attach_lora(
                VarBuilder::from_varmap(&varmap, DType::F32, &device),
                &config.lora,
            )?;
            // A starts random (seeded), B at zero: the adapters change nothing at step 0.
            for (name, var) in varmap.data().lock().map_err(|_| poisoned())?.iter() {
                if name.ends_with(".lora_a") {
                    let a = seeded_lora_a(var.as_tensor().dims2()?, config.seed, name)?;
                    var.set(&a.to_device(&device)?)?;
                }
            }
        }
        let teacher = if config.objective.needs_teacher() {
            Some(Llama::from_checkpoint(base)?)
        } else {
            None
        };
        let model = ModModel::new(
            llama,
            mod_config,
            VarBuilder::from_varmap(&varmap, DType::F32, &device),
        )?;
        let mut vars: Vec<(String, Var, f64)> = varmap
            .data()
            .lock()
            .map_err(|_| poisoned())?
            .iter()
            .map(|(name, var)| {
                let lr = if name.contains(".router.") {
                    config.router_lr
                } else if name.ends_with(".lora_a") || name.ends_with(".lora_b") {
                    config.lora_lr
                } else {
                    config.base_lr
                };
                (name.clone(), var.clone(), lr)
            })
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = AdamWParams {
            weight_decay: config.weight_decay,
            ..AdamWParams::default()
        };
        let opt = AdamW::new(vars, params)?;
        Ok(Self {
            model,
            teacher,
            opt,
            base: base.clone(),
            config,
            step: 0,
        })
    }

    /// The model being trained (its current weights).
    pub fn model(&self) -> &ModModel {
        &self.model
    }

    /// Steps completed.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The training configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The trained tensors by name, as the optimizer holds them: routers, LoRA adapters
    /// (`...q_proj.lora_a`, `lora_b`) with [`Trainable::Lora`], base weights with
    /// [`Trainable::All`].
    pub fn trained_tensors(&self) -> HashMap<String, Tensor> {
        self.opt
            .vars()
            .map(|(name, var)| (name.to_string(), var.as_tensor().clone()))
            .collect()
    }

    /// The tensors a converted model replaces in the base checkpoint: routers, and base
    /// weights (trained, or with their LoRA adapters merged in).
    ///
    /// Errors: [`Error::Candle`] when merging fails.
    pub fn converted_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self
            .trained_tensors()
            .into_iter()
            .filter(|(name, _)| !name.ends_with(".lora_a") && !name.ends_with(".lora_b"))
            .collect();
        out.extend(self.model.base().merged_lora_weights()?);
        Ok(out)
    }

    /// The converted checkpoint as it stands (base tensors with the converted ones over
    /// them, see [`converted_tensors`](Self::converted_tensors)).
    ///
    /// Errors: see [`converted_checkpoint`].
    pub fn converted(&self) -> Result<Checkpoint> {
        converted_checkpoint(&self.base, &self.converted_tensors()?, self.model.config())
    }

    /// Writes the converted model as it stands to `dir` (HF layout, atomically), with `config`
    /// as its `mod` section (the trained model's own, or a calibrated one).
    ///
    /// Errors: those of [`converted_tensors`](Self::converted_tensors) and
    /// [`save_converted`].
    pub fn save_converted(&self, dir: &Path, config: &ModConfig) -> Result<()> {
        save_converted(dir, &self.base, &self.converted_tensors()?, config)
    }

    /// One optimisation step on the micro-batches of step `self.step()` of `corpus`.
    ///
    /// Errors: [`Error::NonFiniteLoss`] naming the step when the loss or the gradient norm
    /// is NaN or infinite (nothing is updated); tensor errors.
    pub fn train_step(&mut self, corpus: &Corpus) -> Result<StepReport> {
        let start = Instant::now();
        let cfg = &self.config;
        let mod_cfg = self.model.config().clone();
        let device = self.base.device();
        let max_len = self.base.config.max_position_embeddings;
        let pad = self.base.config.eos_token_id.unwrap_or(0);
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let (mut lm_sum, mut kl_sum, mut load_sum, mut aux_sum, mut tokens) =
            (0.0, 0.0, 0.0, 0.0, 0);
        let mut compute = 0.0;
        let mut kept = Vec::new();
        for micro in 0..cfg.grad_accum {
            let rows = corpus.train_batch(cfg.seed, self.step, micro, cfg.batch_size);
            let batch = Batch::from_rows(&rows, pad, max_len, &device)?;
            tokens += batch.num_tokens();
            let out = self.model.forward_hidden(&batch, Mode::Training)?;
            let teacher_hidden = match &self.teacher {
                Some(teacher) => Some((teacher, teacher.forward_hidden(&batch)?)),
                None => None,
            };
            let terms = loss::chunked_objective(
                self.model.base(),
                &out.hidden,
                teacher_hidden.as_ref().map(|(m, h)| (*m, h)),
                batch.ids(),
                batch.valid(),
            )?;
            let lm = terms.lm_loss()?;
            let kl = terms.kl_loss()?;
            if let Some(kl) = &kl {
                kl_sum += kl.to_scalar::<f32>()? as f64;
            }
            let mut total = match (cfg.objective, kl) {
                (Objective::Kl, Some(kl)) => kl,
                (Objective::KlLm, Some(kl)) => (&lm + kl)?,
                _ => lm.clone(),
            };
            compute += out.compute_fraction() / cfg.grad_accum as f64;
            if !out.stats.is_empty() {
                let load = match (cfg.target_compute, cfg.target_kept) {
                    (Some(t), _) => loss::compute_budget_loss(
                        &out.stats,
                        mod_cfg.alpha,
                        out.compute_fraction(),
                        compute_budget(self.step, cfg.steps, t, cfg.budget_ramp),
                    )?,
                    (None, Some(t)) => {
                        loss::target_load_loss(&out.stats, mod_cfg.alpha, t, cfg.target_per_layer)?
                    }
                    (None, None) => loss::load_reducing_loss(&out.stats, mod_cfg.alpha)?,
                };
                load_sum += load.to_scalar::<f32>()? as f64;
                total = (total + load)?;
                if matches!(mod_cfg.router, RouterKind::TopK { .. }) {
                    let aux = (loss::topk_predictor_loss(&out.stats, batch.valid())?
                        * cfg.topk_aux_weight)?;
                    aux_sum += aux.to_scalar::<f32>()? as f64;
                    total = (total + aux)?;
                }
            }
            let lm_value = lm.to_scalar::<f32>()? as f64;
            let total_value = total.to_scalar::<f32>()? as f64;
            if !total_value.is_finite() {
                return Err(Error::NonFiniteLoss {
                    step: self.step + 1,
                    loss: total_value,
                });
            }
            lm_sum += lm_value;
            if kept.is_empty() {
                kept = vec![0.0; out.stats.len()];
            }
            for (k, s) in kept.iter_mut().zip(&out.stats) {
                *k += s.kept_fraction() / cfg.grad_accum as f64;
            }
            let store = (total / cfg.grad_accum as f64)?.backward()?;
            for (name, var) in self.opt.vars() {
                if let Some(g) = store.get(var.as_tensor()) {
                    let g = match grads.remove(name) {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    };
                    grads.insert(name.to_string(), g);
                }
            }
        }
        let mut sq = 0.0;
        for g in grads.values() {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::NonFiniteLoss {
                step: self.step + 1,
                loss: grad_norm,
            });
        }
        if let Some(clip) = cfg.grad_clip {
            if grad_norm > clip {
                for g in grads.values_mut() {
                    *g = (&*g * (clip / grad_norm))?;
                }
            }
        }
        let lr = lr_multiplier(self.step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio);
        self.opt.step(&grads, lr)?;
        self.step += 1;
        let n = cfg.grad_accum as f64;
        Ok(StepReport {
            step: self.step,
            lm_loss: lm_sum / n,
            kl_loss: kl_sum / n,
            compute_fraction: compute,
            load_loss: load_sum / n,
            aux_loss: aux_sum / n,
            kept_fraction: kept,
            grad_norm,
            tokens,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Trains until `config.steps`, calling `on_step` after every step and writing a
    /// checkpoint to `checkpoint_dir` every `checkpoint_every` steps (0 = never) and at the
    /// end. A [`Error::NonFiniteLoss`] stops training; the last checkpoint stays intact.
    ///
    /// Errors: those of [`train_step`](Self::train_step) and [`save_state`](Self::save_state).
    pub fn run(
        &mut self,
        corpus: &Corpus,
        checkpoint_dir: Option<&Path>,
        checkpoint_every: usize,
        mut on_step: impl FnMut(&StepReport),
    ) -> Result<()> {
        while self.step < self.config.steps {
            let report = self.train_step(corpus)?;
            on_step(&report);
            if let Some(dir) = checkpoint_dir {
                let due = checkpoint_every > 0 && self.step % checkpoint_every == 0;
                if due || self.step == self.config.steps {
                    self.save_state(dir, corpus)?;
                }
            }
        }
        Ok(())
    }

    /// Writes the training state to `dir` atomically: every trained tensor, the AdamW
    /// moments (`state.safetensors`), and in `trainer.json` the step, the configs and what
    /// the run trains on (the base model's config, dtype and an embedding checksum; the
    /// corpus's [`Corpus::fingerprint`]). The data position is the step: batches are a pure
    /// function of corpus, seed and step.
    ///
    /// Errors: [`Error::Io`] / [`Error::Candle`] when writing fails (an existing `dir` is
    /// then left as it was).
    pub fn save_state(&self, dir: &Path, corpus: &Corpus) -> Result<()> {
        let mut tensors = self.opt.state();
        for (name, t) in self.trained_tensors() {
            tensors.insert(format!("param.{name}"), t);
        }
        let meta = serde_json::json!({
            "step": self.step,
            "optimizer_steps": self.opt.steps_taken(),
            "train": self.config,
            "mod": self.model.config(),
            "inputs": self.inputs(corpus)?,
        });
        write_dir_atomically(dir, |staging| {
            candle_core::safetensors::save(&tensors, staging.join(STATE_FILE))?;
            let meta_path = staging.join(META_FILE);
            std::fs::write(&meta_path, serde_json::to_string_pretty(&meta)?)
                .map_err(|e| Error::io(&meta_path, e))
        })
    }

    /// What this run trains on, as recorded in its state.
    fn inputs(&self, corpus: &Corpus) -> Result<serde_json::Value> {
        let name = "model.embed_tokens.weight";
        let embed = (self.base.tensors.get(name)).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        let checksum = embed.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        Ok(serde_json::json!({
            "model": self.base.config,
            "dtype": format!("{:?}", self.base.dtype()),
            "embedding_checksum": checksum,
            "corpus": corpus.fingerprint(),
        }))
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
        let inputs = self.inputs(corpus)?;
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
        let step = meta["step"].as_u64().unwrap_or(0) as usize;
        if step > self.config.steps {
            return Err(Error::Config {
                path: Some(meta_path),
                reason: format!(
                    "the saved state is at step {step}, past the {} steps asked for",
                    self.config.steps
                ),
            });
        }
        let opt_steps = meta["optimizer_steps"].as_u64().unwrap_or(0) as usize;
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
        for (name, var) in self.opt.vars() {
            let key = format!("param.{name}");
            let t = state
                .get(&key)
                .ok_or(Error::MissingTensor { name: key.clone() })?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        self.opt.load_state(&state, opt_steps)?;
        self.step = step;
        Ok(())
    }

    /// The folder of the training state inside a conversion's output folder.
    pub fn state_dir(out: &Path) -> PathBuf {
        out.join("trainer-state")
    }
}

fn poisoned() -> Error {
    Error::InvalidArgument("variable map lock poisoned".to_string())
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("config", &self.config)
            .field("trained_tensors", &self.opt.vars().count())
            .finish()
    }
}
