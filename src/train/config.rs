//! Training settings: what trains, against which objective, for how long, at which rates.

use crate::error::{Error, Result};
use crate::model::amx::MatmulPrecision;
use crate::model::LoraConfig;
use serde::{Deserialize, Serialize};

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
    /// Precision of the linear layers' f32 products during training steps (forward,
    /// teacher and both gradients) on the CPU: [`MatmulPrecision::Bf16`] runs them in
    /// bf16 on AMX tiles or AVX512-BF16 dot products where the CPU has either (see
    /// [`crate::model::amx::bf16_kernel`]).
    pub matmul_precision: MatmulPrecision,
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
            matmul_precision: MatmulPrecision::Highest,
        }
    }
}

impl TrainConfig {
    /// Checks ranges.
    ///
    /// Errors: [`Error::InvalidArgument`] for zero steps / batch / accumulation, a
    /// non-positive learning rate, a target (kept or compute fraction) outside (0, 1], a
    /// non-positive clip norm, or a LoRA rank of 0 (the rank's upper bound, the hidden size,
    /// is checked by [`crate::train::Trainer::new`]).
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
