//! # modification
//!
//! Turn a pretrained LLaMA-family checkpoint into a Mixture-of-Depths model the
//! MoDification way: a sigmoid router gate on each routed layer, a threshold-p operator that
//! lets a token through a layer only when its gate reaches p, and the layer load-reducing
//! objective `α · Σ_j F_j · G_j` added to the LM loss.
//!
//! What is here:
//!
//! - [`checkpoint`]: real checkpoints in (HF safetensors folders, GGUF files with their
//!   tokenizer, hub ids) and out (atomic HF export, converted MoD models);
//! - [`model`]: the dense LLaMA decoder over explicit positions and padding, and its
//!   routed KV cache;
//! - [`routing`] and [`mixture_of_depths`]: router gates, the threshold-p and top-k operators,
//!   sparse gather/compute/scatter, the training-mode gate estimator;
//! - [`loss`], [`train`]: the LM loss plus the load-reducing objective, AdamW, the data
//!   mixture, checkpoints and resume;
//! - [`generate`], [`eval`]: prefill/decode generation, perplexity, compute and KV-cache
//!   accounting;
//! - [`calibrate`]: thresholds (or capacity) set to a target compute after training;
//! - [`conversion`]: after training, calibrate, save, evaluate against the original and
//!   time the prefill, as one [`conversion::ConversionReport`];
//! - [`sweep`]: many conversions under one budget, as a CSV, a Markdown table and a plot of
//!   perplexity against compute;
//! - [`text`], [`fsutil`], [`config`], [`error`]: tokenizer helpers, atomic writes, the HF
//!   `config.json`, the typed errors.
//!
//! Evaluate a checkpoint:
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use modification::{checkpoint::Checkpoint, eval, model::Llama};
//!
//! # fn main() -> modification::Result<()> {
//! let ckpt = Checkpoint::load("assets/model/SmolLM2-135M-Instruct.Q4_1.gguf", DType::F32, &Device::Cpu)?;
//! let model = Llama::from_checkpoint(&ckpt)?;
//! let ids = modification::text::encode(&ckpt.tokenizer, "Call me Ishmael.")?;
//! let ppl = eval::perplexity(&model, &ids)?;
//! println!("perplexity {:.2} over {} tokens", ppl.perplexity, ppl.tokens);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
// Checks of float settings are written `!(x > 0.0)` on purpose: NaN fails the comparison,
// so the negation rejects it too, which `x <= 0.0` would not.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod calibrate;
pub mod checkpoint;
pub mod config;
pub mod conversion;
pub mod error;
pub mod eval;
pub mod fsutil;
pub mod generate;
pub mod loss;
pub mod model;

pub use checkpoint::Checkpoint;
pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use model::amx::{set_f32_matmul_precision, MatmulPrecision};
pub use model::{Batch, Llama};
pub mod mixture_of_depths;
pub mod routing;
pub mod sweep;
pub mod text;
pub mod train;

pub use mixture_of_depths::{HiddenOutput, ModConfig, ModModel, ModOutput, Mode};

/// The README's code examples, compiled as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
