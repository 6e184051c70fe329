//! The conversion trainer: LM loss plus the load-reducing objective, AdamW, checkpoints.

use super::data::Corpus;
use super::optim::{clip_grad_norm, AdamW, AdamWParams};
use super::schedule::{compute_budget, lr_multiplier};
use crate::checkpoint::converted::{converted_checkpoint, save_converted};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::loss;
use crate::mixture_of_depths::{ModConfig, RouterKind};
use crate::mixture_of_depths::{ModModel, Mode};
use crate::model::lora::seeded_lora_a;
use crate::model::{Batch, Llama};
use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

use super::config::{Objective, TrainConfig, Trainable};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// What one optimisation step did.
#[derive(Debug, Clone, Default, Serialize)]
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

/// The objective on one micro-batch and its parts.
#[derive(Debug)]
struct MicroBatchLoss {
    /// What is differentiated: a scalar f32 tensor.
    total: Tensor,
    lm: f64,
    kl: f64,
    load: f64,
    aux: f64,
    compute_fraction: f64,
    kept_fraction: Vec<f64>,
}

/// Trains a [`ModModel`] made from a pretrained checkpoint.
pub struct Trainer {
    pub(super) model: ModModel,
    /// The original model (every gate open, no adapter) for the distillation objective:
    /// it shares the checkpoint's tensors, so it costs no weight memory.
    teacher: Option<Llama>,
    pub(super) opt: AdamW,
    pub(super) base: Checkpoint,
    /// Sum of the base embedding (f64): identifies the base weights in a saved state.
    pub(super) base_checksum: f64,
    pub(super) config: TrainConfig,
    pub(super) step: usize,
}

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
        // LoRA's A and a skip adapter's down projection start random (seeded), LoRA's B and
        // the up projection at zero: neither changes the model at step 0.
        for (name, var) in varmap.data().lock().map_err(|_| poisoned())?.iter() {
            if name.ends_with(".lora_a") || name.ends_with(".skip_adapter.down.weight") {
                let a = seeded_lora_a(var.as_tensor().dims2()?, config.seed, name)?;
                var.set(&a.to_device(&device)?)?;
            }
        }
        let mut vars: Vec<(String, Var, f64)> = varmap
            .data()
            .lock()
            .map_err(|_| poisoned())?
            .iter()
            .map(|(name, var)| {
                let lr = if name.contains(".router.") || name.contains(".skip_adapter.") {
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
            base_checksum: embedding_checksum(base)?,
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
    /// weights (trained, or with their LoRA adapters merged in). Detached from training:
    /// a model built from them computes as one loaded from disk (no gradient tracking,
    /// the fused inference kernels).
    ///
    /// Errors: [`Error::Candle`] when merging fails.
    pub fn converted_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self
            .trained_tensors()
            .into_iter()
            .filter(|(name, _)| !name.ends_with(".lora_a") && !name.ends_with(".lora_b"))
            .collect();
        out.extend(self.model.base().merged_lora_weights()?);
        Ok(out
            .into_iter()
            .map(|(name, t)| (name, t.detach()))
            .collect())
    }

    /// The converted checkpoint as it stands (base tensors with the converted ones over
    /// them, see [`converted_tensors`](Self::converted_tensors)), with `config` as its `mod`
    /// section (the trained model's own, or a calibrated one).
    ///
    /// Errors: see [`converted_checkpoint`].
    pub fn converted(&self, config: &ModConfig) -> Result<Checkpoint> {
        converted_checkpoint(&self.base, &self.converted_tensors()?, config)
    }

    /// Writes the converted model as it stands to `dir` (HF layout, atomically), with `config`
    /// as its `mod` section (the trained model's own, or a calibrated one).
    ///
    /// Errors: those of [`converted_tensors`](Self::converted_tensors) and
    /// [`save_converted`].
    pub fn save_converted(&self, dir: &Path, config: &ModConfig) -> Result<()> {
        save_converted(dir, &self.base, &self.converted_tensors()?, config)
    }

    /// One optimisation step on the micro-batches of step `self.step()` of `corpus`:
    /// gradients accumulated over `grad_accum` micro-batches, clipped to `grad_clip`, one
    /// AdamW update at the scheduled learning rate.
    ///
    /// Errors: [`Error::NonFiniteLoss`] naming the step when the loss or the gradient norm
    /// is NaN or infinite (nothing is updated); tensor errors.
    pub fn train_step(&mut self, corpus: &Corpus) -> Result<StepReport> {
        let start = Instant::now();
        let cfg = self.config.clone();
        let _precision = crate::model::amx::precision_scope(cfg.matmul_precision);
        let device = self.base.device();
        let max_len = self.base.config.max_position_embeddings;
        let pad = self.base.config.eos_token_id.unwrap_or(0);
        let n = cfg.grad_accum as f64;
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut report = StepReport {
            step: self.step + 1,
            ..StepReport::default()
        };
        for micro in 0..cfg.grad_accum {
            let rows = corpus.train_batch(cfg.seed, self.step, micro, cfg.batch_size);
            let batch = Batch::from_rows(&rows, pad, max_len, &device)?;
            let loss = self.micro_batch_loss(&batch)?;
            report.tokens += batch.num_tokens();
            report.lm_loss += loss.lm / n;
            report.kl_loss += loss.kl / n;
            report.load_loss += loss.load / n;
            report.aux_loss += loss.aux / n;
            report.compute_fraction += loss.compute_fraction / n;
            report.kept_fraction.resize(loss.kept_fraction.len(), 0.0);
            for (k, f) in report.kept_fraction.iter_mut().zip(&loss.kept_fraction) {
                *k += f / n;
            }
            let store = (loss.total / n)?.backward()?;
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
        report.grad_norm = clip_grad_norm(&mut grads, cfg.grad_clip)?;
        if !report.grad_norm.is_finite() {
            return Err(Error::NonFiniteLoss {
                step: self.step + 1,
                loss: report.grad_norm,
            });
        }
        let lr = lr_multiplier(self.step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio);
        self.opt.step(&grads, lr)?;
        self.step += 1;
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }

    /// The objective on one micro-batch: the LM loss and/or the distillation KL, plus the
    /// load term ([`loss::compute_budget_loss`] under a compute target,
    /// [`loss::target_load_loss`] under a kept target, else the paper's
    /// [`loss::load_reducing_loss`]) and, for top-k, MoD's auxiliary predictor loss.
    ///
    /// Errors: [`Error::NonFiniteLoss`] when the total is NaN or infinite.
    fn micro_batch_loss(&self, batch: &Batch) -> Result<MicroBatchLoss> {
        let cfg = &self.config;
        let mod_cfg = self.model.config();
        let out = self.model.forward_hidden(batch, Mode::Training)?;
        let teacher_hidden = match &self.teacher {
            Some(teacher) => Some((teacher, teacher.forward_hidden(batch)?)),
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
        let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
        let (lm_value, kl_value) = (scalar(&lm)?, kl.as_ref().map(scalar).transpose()?);
        let (mut load_value, mut aux_value) = (0.0, 0.0);
        let mut total = match (cfg.objective, kl) {
            (Objective::Kl, Some(kl)) => kl,
            (Objective::KlLm, Some(kl)) => (&lm + kl)?,
            _ => lm,
        };
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
            load_value = scalar(&load)?;
            total = (total + load)?;
            if matches!(mod_cfg.router, RouterKind::TopK { .. }) {
                let aux =
                    (loss::topk_predictor_loss(&out.stats, batch.valid())? * cfg.topk_aux_weight)?;
                aux_value = scalar(&aux)?;
                total = (total + aux)?;
            }
        }
        let value = scalar(&total)?;
        if !value.is_finite() {
            return Err(Error::NonFiniteLoss {
                step: self.step + 1,
                loss: value,
            });
        }
        Ok(MicroBatchLoss {
            total,
            lm: lm_value,
            kl: kl_value.unwrap_or(0.0),
            load: load_value,
            aux: aux_value,
            compute_fraction: out.compute_fraction(),
            kept_fraction: out.stats.iter().map(|s| s.kept_fraction()).collect(),
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
                let due = checkpoint_every > 0 && self.step.is_multiple_of(checkpoint_every);
                if due || self.step == self.config.steps {
                    self.save_state(dir, corpus)?;
                }
            }
        }
        Ok(())
    }
}

/// The f64 sum of the embedding matrix: cheap to record, and different for other weights
/// under the same config.
fn embedding_checksum(base: &Checkpoint) -> Result<f64> {
    let name = "model.embed_tokens.weight";
    let embed = (base.tensors.get(name)).ok_or_else(|| Error::MissingTensor {
        name: name.to_string(),
    })?;
    Ok(embed.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
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
