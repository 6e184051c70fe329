//! The conversion pipeline after training, as `convert` and `sweep` run it: calibrate the
//! operating point on training rows, save (or build in memory) the converted model, evaluate
//! it on every source's held-out rows against the original, and measure its prefill time and
//! KV cache on one long input. The result is one [`ConversionReport`].

use crate::calibrate::{calibrate_compute, Calibration};
use crate::checkpoint::converted::converted_checkpoint;
use crate::checkpoint::export::save_hf;
use crate::error::{Error, Result};
use crate::eval::{self, RoutedEval};
use crate::mixture_of_depths::{ModModel, Mode, RouterKind};
use crate::model::{Batch, Llama};
use crate::train::{Corpus, Trainer};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

/// What [`finish_conversion`] measures besides the held-out rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOptions {
    /// Calibration rows per source, from the training split (with a compute target).
    pub calibration_rows: usize,
    /// Tokens of the prefill input (held-out text of every source, concatenated).
    pub prefill_tokens: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            calibration_rows: 2,
            prefill_tokens: 512,
        }
    }
}

/// One source's held-out result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceResult {
    /// Perplexity of the original (dense) model.
    pub original: f64,
    /// Perplexity of the converted model.
    pub converted: f64,
    /// `converted / original`.
    pub ratio: f64,
    /// Fraction of (token, routed layer) computations skipped.
    pub skip: f64,
    /// FLOPs of the whole model as a fraction of the dense model's.
    pub compute: f64,
    /// KV-cache entries as a fraction of the dense model's.
    pub kv: f64,
}

impl SourceResult {
    fn new(original: f64, converted: &RoutedEval) -> Self {
        Self {
            original,
            converted: converted.perplexity.perplexity,
            ratio: converted.perplexity.perplexity / original,
            skip: converted.skip_fraction(),
            compute: converted.compute_fraction,
            kv: converted.kv_fraction,
        }
    }
}

/// The converted model on one long input, against the original.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillResult {
    /// Tokens of the input.
    pub tokens: usize,
    /// Compute fraction of the converted model's prefill.
    pub compute_fraction: f64,
    /// KV-cache ratio converted / original after the prefill.
    pub kv_fraction: f64,
    /// Median wall time converted / original (same process, interleaved repetitions).
    pub time_ratio: f64,
}

/// What a conversion costs and saves, measured on held-out text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversionReport {
    /// Per source, by name.
    pub sources: BTreeMap<String, SourceResult>,
    /// Top-k only: per source, decoding causally with the auxiliary predictor (as
    /// generation must); empty for threshold-p, which is causal already.
    pub causal: BTreeMap<String, SourceResult>,
    /// Kept fraction per routed layer, mean over sources.
    pub kept_per_layer: BTreeMap<usize, f64>,
    /// Fraction of (token, routed layer) computations skipped, mean over routed layers.
    pub skip_fraction: f64,
    /// Largest perplexity ratio converted / original over the sources.
    pub worst_perplexity_ratio: f64,
    /// Mean perplexity ratio over the sources.
    pub mean_perplexity_ratio: f64,
    /// Compute fraction of the whole model, mean over sources.
    pub compute_fraction: f64,
    /// KV-cache ratio, mean over sources.
    pub kv_fraction: f64,
    /// The calibrated operating point (with a compute target).
    pub calibration: Option<Calibration>,
    /// Prefill of one long input.
    pub prefill: PrefillResult,
    /// Optimisation steps trained.
    pub steps: usize,
    /// Training tokens consumed (steps × rows × accumulation × row length).
    pub tokens_trained: usize,
    /// Wall time of training, seconds (as the caller measured it).
    pub train_seconds: f64,
}

impl ConversionReport {
    /// Routed layers whose held-out kept fraction is at most `floor` (a layer that keeps
    /// nothing but its sinks has collapsed).
    pub fn collapsed_layers(&self, floor: f64) -> Vec<usize> {
        (self.kept_per_layer.iter())
            .filter(|(_, f)| **f <= floor)
            .map(|(j, _)| *j)
            .collect()
    }
}

/// Held-out results over the sources, reduced as [`ConversionReport`] reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldOutSummary {
    /// Per source.
    pub sources: BTreeMap<String, SourceResult>,
    /// Kept fraction per routed layer, mean over sources.
    pub kept_per_layer: BTreeMap<usize, f64>,
    /// Fraction of (token, routed layer) computations skipped, mean over routed layers.
    pub skip_fraction: f64,
    /// Largest perplexity ratio converted / original over the sources.
    pub worst_perplexity_ratio: f64,
    /// Mean perplexity ratio over the sources.
    pub mean_perplexity_ratio: f64,
    /// Compute fraction of the whole model, mean over sources.
    pub compute_fraction: f64,
    /// KV-cache ratio, mean over sources.
    pub kv_fraction: f64,
}

/// Reduces the converted model's evaluation of each source (from [`evaluate_sources`])
/// against the original's perplexity of the same source (from [`original_perplexity`]).
///
/// Errors: [`Error::InvalidArgument`] naming a source `original` lacks.
pub fn summarize_held_out(
    original: &BTreeMap<String, f64>,
    evals: &BTreeMap<String, RoutedEval>,
) -> Result<HeldOutSummary> {
    let mut sources = BTreeMap::new();
    for (name, e) in evals {
        let o = original.get(name).ok_or_else(|| {
            Error::InvalidArgument(format!("no original perplexity for source {name}"))
        })?;
        sources.insert(name.clone(), SourceResult::new(*o, e));
    }
    let n = sources.len().max(1) as f64;
    let mut kept_per_layer: BTreeMap<usize, f64> = BTreeMap::new();
    for e in evals.values() {
        for (j, f) in &e.kept_fraction {
            *kept_per_layer.entry(*j).or_default() += f / n;
        }
    }
    let mean = |f: fn(&SourceResult) -> f64| sources.values().map(f).sum::<f64>() / n;
    Ok(HeldOutSummary {
        skip_fraction: 1.0
            - kept_per_layer.values().sum::<f64>() / kept_per_layer.len().max(1) as f64,
        kept_per_layer,
        worst_perplexity_ratio: sources.values().map(|s| s.ratio).fold(0.0, f64::max),
        mean_perplexity_ratio: mean(|s| s.ratio),
        compute_fraction: mean(|s| s.compute),
        kv_fraction: mean(|s| s.kv),
        sources,
    })
}

/// Perplexity of the original model on every source's held-out rows, by source name.
///
/// Errors: those of [`eval::dense_rows_perplexity`].
pub fn original_perplexity(dense: &Llama, corpus: &Corpus) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for s in &corpus.sources {
        let ppl = eval::dense_rows_perplexity(dense, &s.heldout)?.perplexity;
        out.insert(s.name.clone(), ppl);
    }
    Ok(out)
}

/// Every source's held-out rows through `model` (see [`eval::routed_rows_eval`] for
/// `causal`), by source name.
///
/// Errors: those of [`eval::routed_rows_eval`].
pub fn evaluate_sources(
    model: &ModModel,
    corpus: &Corpus,
    causal: bool,
) -> Result<BTreeMap<String, RoutedEval>> {
    let mut out = BTreeMap::new();
    for s in &corpus.sources {
        out.insert(
            s.name.clone(),
            eval::routed_rows_eval(model, &s.heldout, causal)?,
        );
    }
    Ok(out)
}

/// After training: with a compute target, calibrates the thresholds (or capacity) on
/// training rows ([`calibrate_compute`]); saves the converted model to `save_to` and
/// reloads it as a user would (or, with `None`, builds it in memory from the same
/// tensors); evaluates it on every source against `original` (from
/// [`original_perplexity`] of `dense`); times the prefill of `options.prefill_tokens`
/// held-out tokens against `dense`.
///
/// Errors: [`Error::InvalidArgument`] when `original` lacks a source of `corpus`, or for
/// a prefill input shorter than 2 tokens; those of calibration, saving, loading and
/// evaluation.
pub fn finish_conversion(
    trainer: &Trainer,
    corpus: &Corpus,
    dense: &Llama,
    original: &BTreeMap<String, f64>,
    options: &EvalOptions,
    save_to: Option<&Path>,
    train_seconds: f64,
) -> Result<ConversionReport> {
    for s in &corpus.sources {
        if !original.contains_key(&s.name) {
            return Err(Error::InvalidArgument(format!(
                "no original perplexity for source {}",
                s.name
            )));
        }
    }
    // The model as it is saved: the base with the trained tensors over it (adapters
    // merged), detached from training, built once. Calibrating through the trained
    // variables instead made every forward record its graph and hold its activations (the
    // default conversion peaked at 10.0 GB with that, 5.1 without).
    let mut config = trainer.model().config().clone();
    let merged = trainer.converted(&config)?;
    let mut calibration = None;
    if let Some(target) = trainer.config().target_compute {
        let rows = corpus.calibration_rows(options.calibration_rows);
        let (calibrated, c) =
            calibrate_compute(&ModModel::from_checkpoint(&merged)?, &rows, target)?;
        config = calibrated.config().clone();
        calibration = Some(c);
    }
    // The calibrated config as the `mod` section; the tensors are shared, not copied.
    let final_ckpt = converted_checkpoint(&merged, &HashMap::new(), &config)?;
    let converted = match save_to {
        Some(dir) => {
            save_hf(&final_ckpt, dir)?;
            let dir = dir
                .to_str()
                .ok_or_else(|| Error::InvalidArgument(format!("{} is not UTF-8", dir.display())))?;
            ModModel::load(dir, dense.dtype(), dense.device())?
        }
        None => ModModel::from_checkpoint(&final_ckpt)?,
    };

    let held_out = evaluate_sources(&converted, corpus, false)?;
    // Top-k is not causal: generation decides with the auxiliary predictor instead.
    let causal = match config.router {
        RouterKind::TopK { .. } => evaluate_sources(&converted, corpus, true)?,
        RouterKind::ThresholdP { .. } => BTreeMap::new(),
    };

    let long = prefill_input(corpus, options.prefill_tokens);
    if long.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "the prefill input has {} tokens; it needs at least 2",
            long.len()
        )));
    }
    let time_ratio = prefill_time_ratio(dense, &converted, &long)?;
    let long_eval = eval::routed_rows_eval(&converted, std::slice::from_ref(&long), true)?;

    let summary = summarize_held_out(original, &held_out)?;
    let tc = trainer.config();
    Ok(ConversionReport {
        causal: summarize_held_out(original, &causal)?.sources,
        skip_fraction: summary.skip_fraction,
        kept_per_layer: summary.kept_per_layer,
        worst_perplexity_ratio: summary.worst_perplexity_ratio,
        mean_perplexity_ratio: summary.mean_perplexity_ratio,
        compute_fraction: summary.compute_fraction,
        kv_fraction: summary.kv_fraction,
        sources: summary.sources,
        calibration,
        prefill: PrefillResult {
            tokens: long.len(),
            compute_fraction: long_eval.compute_fraction,
            kv_fraction: long_eval.kv_fraction,
            time_ratio,
        },
        steps: trainer.step(),
        tokens_trained: trainer.step() * tc.batch_size * tc.grad_accum * corpus.seq_len(),
        train_seconds,
    })
}

/// The first `tokens` held-out tokens of the corpus, source after source.
pub fn prefill_input(corpus: &Corpus, tokens: usize) -> Vec<u32> {
    (corpus.sources.iter())
        .flat_map(|s| s.heldout.concat())
        .take(tokens)
        .collect()
}

/// Median prefill time of `converted` over `dense`'s on `ids` (one row), both on the same
/// engine (the original as a [`ModModel`] with every layer dense, not the reference
/// [`Llama::forward`], whose attention materialises the masked `(T, T)` scores): same
/// process, five interleaved repetitions after a warm-up of each, alternating which runs
/// first so that neither always gets the warmer caches.
///
/// Errors: [`Error::SequenceTooLong`] beyond the model's context; forward errors.
pub fn prefill_time_ratio(dense: &Llama, converted: &ModModel, ids: &[u32]) -> Result<f64> {
    let batch = Batch::single(ids, dense.config().max_position_embeddings, dense.device())?;
    let dense = ModModel::dense(dense.clone())?;
    let (mut t_dense, mut t_mod) = (Vec::new(), Vec::new());
    dense.forward_causal(&batch, Mode::Inference)?; // warm-up: first-touch allocations
    converted.forward_causal(&batch, Mode::Inference)?;
    for rep in 0..5 {
        for dense_first in [rep % 2 == 0, rep % 2 != 0] {
            let t = Instant::now();
            if dense_first {
                dense.forward_causal(&batch, Mode::Inference)?;
                t_dense.push(t.elapsed().as_secs_f64());
            } else {
                converted.forward_causal(&batch, Mode::Inference)?;
                t_mod.push(t.elapsed().as_secs_f64());
            }
        }
    }
    Ok(median(&mut t_mod) / median(&mut t_dense))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
