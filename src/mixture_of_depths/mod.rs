//! The Mixture-of-Depths model: a [`Llama`](crate::Llama) whose routed layers compute only
//! the tokens their router keeps (MoDification's threshold-p, or MoD's top-k).
//!
//! - [`config`]: [`ModConfig`], how a dense model is converted (routed layers, operator,
//!   threshold p or capacity, KV policy, sinks, α); saved with every converted model.
//! - `model`: [`ModModel`] and its forward passes (full, causal, training).
//! - `layer`: the one function that computes a layer on a subset of tokens, with or
//!   without a KV cache, and counts its FLOPs.
//! - `cached`: prefill and decode against a [`KvCache`](crate::model::kv_cache::KvCache).
//! - `load`: a converted model from a checkpoint.
//! - [`skip_adapter`]: what a skipped token gets instead of nothing (optional).

mod cached;
pub mod config;
mod layer;
mod load;
mod model;
pub mod skip_adapter;

pub use config::{
    GateInput, GateScaling, KvPolicy, LayerRule, ModConfig, RoutedLayers, RouterKind,
};
pub use model::{HiddenOutput, ModModel, ModOutput, Mode};
pub use skip_adapter::SkipAdapter;
