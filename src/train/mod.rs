//! Conversion training: the data mixture, AdamW, the LR schedule and the [`Trainer`].

pub mod data;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use data::{Corpus, CorpusOptions, SourceSpec};
pub use trainer::{Objective, StepReport, TrainConfig, Trainable, Trainer};
