//! Conversion training: settings, the data mixture, AdamW, the LR schedule, the
//! [`Trainer`], its resumable state and its memory estimate.

pub mod config;
pub mod data;
pub mod memory;
pub mod optim;
pub mod schedule;
mod state;
pub mod trainer;

pub use config::{Objective, TrainConfig, Trainable};
pub use data::{Corpus, CorpusOptions, SourceSpec};
pub use trainer::{StepReport, Trainer};
