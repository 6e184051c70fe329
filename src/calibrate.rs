//! Calibrating a converted model's operating point: after training, move every routed
//! layer's threshold (or top-k's capacity) so that the measured compute on calibration rows
//! lands on a target fraction of the dense model's FLOPs.
//!
//! Training pushes towards the budget (see [`crate::loss::compute_budget_loss`]) but ends
//! wherever the last steps left it; calibration closes the gap with one scalar, measured on
//! rows from the training split (never on held-out text).

use crate::error::{Error, Result};
use crate::mixture_of_depths::RouterKind;
use crate::mixture_of_depths::{ModModel, Mode};
use crate::model::Batch;
use serde::{Deserialize, Serialize};

/// The outcome of [`calibrate_compute`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The target compute fraction.
    pub target: f64,
    /// Compute fraction measured on the calibration rows with the calibrated operator.
    pub compute_fraction: f64,
    /// Smallest and largest compute fraction the operator can reach on these rows.
    pub reachable: (f64, f64),
    /// Threshold-p: the shift δ added to every layer's threshold in logit space,
    /// `p_j ← sigmoid(logit(p_j) + δ)`. Top-k: the calibrated capacity.
    pub setting: f64,
}

/// Search steps at most; each is one inference forward over the calibration rows.
const STEPS: usize = 12;
/// Stop once the measured compute is this close to the target.
const TOLERANCE: f64 = 2e-3;
/// Extreme logit shift: thresholds within about 1e-11 of 0 or 1.
const MAX_SHIFT: f64 = 25.0;

/// Calibrates `model` so that its compute fraction (whole model, inference FLOPs, as
/// [`crate::ModOutput::compute_fraction`]) on `rows` is `target`. Threshold-p models get one
/// shift δ of every routed layer's threshold in logit space (recorded as per-layer p in the
/// config); top-k models get a capacity. Returns the calibrated model (weights shared with
/// `model`) and what was measured.
///
/// `rows`: token rows (each at least 2 tokens; padded into one batch), from the training
/// split.
///
/// Errors: [`Error::InvalidArgument`] for a target outside (0, 1] or no rows;
/// [`Error::UnreachableTarget`] with the reachable range when no setting reaches the target;
/// the errors of [`ModModel::forward`].
pub fn calibrate_compute(
    model: &ModModel,
    rows: &[Vec<u32>],
    target: f64,
) -> Result<(ModModel, Calibration)> {
    if !(target > 0.0 && target <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "target compute fraction {target} is outside (0, 1]"
        )));
    }
    if rows.is_empty() {
        return Err(Error::InvalidArgument("no calibration rows".to_string()));
    }
    let base = model.base();
    let batch = Batch::from_rows(
        rows,
        0,
        base.config().max_position_embeddings,
        base.device(),
    )?;
    // Each operator as a function of one scalar whose compute fraction rises with it.
    let (lo, hi, make): (f64, f64, Box<dyn Fn(f64) -> RouterKind>) = match &model.config().router {
        RouterKind::ThresholdP { .. } => {
            // Every routed layer's threshold is written out, so that the calibrated
            // config records the operating point of each layer.
            let cfg = model.config();
            let start = RouterKind::ThresholdP {
                p: cfg.threshold_for(usize::MAX).unwrap_or(0.5),
                per_layer: (model.routers().keys())
                    .map(|&j| (j, cfg.threshold_for(j).unwrap_or(0.5)))
                    .collect(),
            };
            // The rising scalar is −δ: a lower threshold keeps more tokens.
            let make = move |neg_shift: f64| start.shifted(-neg_shift);
            (-MAX_SHIFT, MAX_SHIFT, Box::new(make))
        }
        RouterKind::TopK { .. } => {
            let smallest = 1.0 / batch.seq_len().max(1) as f64;
            (
                smallest,
                1.0,
                Box::new(|capacity: f64| RouterKind::TopK { capacity }),
            )
        }
    };
    let measure = |s: f64| -> Result<(ModModel, f64)> {
        let m = model.with_router(make(s))?;
        // Compute needs the routing decisions only: stop before the (B, T, vocab) logits.
        let c = m
            .forward_hidden(&batch, Mode::Inference)?
            .compute_fraction();
        Ok((m, c))
    };
    let (mut low, mut c_low) = measure(lo)?;
    let (mut high, mut c_high) = measure(hi)?;
    let reachable = (c_low, c_high);
    if target < c_low - TOLERANCE || target > c_high + TOLERANCE {
        return Err(Error::UnreachableTarget {
            target,
            min: c_low,
            max: c_high,
        });
    }
    // Regula falsi with the Illinois correction: the compute fraction is monotone and
    // nearly linear in the setting, so this converges in a few forwards where bisection
    // over the full range needs twenty.
    let (mut s_low, mut s_high) = (lo, hi);
    let mut last_side = 0i8;
    let (mut f_low, mut f_high) = (c_low - target, c_high - target);
    for _ in 0..STEPS {
        // The measured gaps, not the Illinois-halved ones, decide when to stop.
        let close = (c_low - target).abs().min((c_high - target).abs()) <= TOLERANCE;
        if close || s_high - s_low < 1e-9 {
            break;
        }
        let mut mid = (s_low * f_high - s_high * f_low) / (f_high - f_low);
        if !(mid > s_low && mid < s_high) {
            mid = 0.5 * (s_low + s_high);
        }
        let (m, c) = measure(mid)?;
        let f = c - target;
        if f > 0.0 {
            (high, c_high, s_high, f_high) = (m, c, mid, f);
            if last_side == 1 {
                f_low /= 2.0;
            }
            last_side = 1;
        } else {
            (low, c_low, s_low, f_low) = (m, c, mid, f);
            if last_side == -1 {
                f_high /= 2.0;
            }
            last_side = -1;
        }
    }
    let (chosen, compute, setting) = if (c_low - target).abs() <= (c_high - target).abs() {
        (low, c_low, s_low)
    } else {
        (high, c_high, s_high)
    };
    let setting = match model.config().router {
        RouterKind::ThresholdP { .. } => -setting,
        RouterKind::TopK { .. } => setting,
    };
    Ok((
        chosen,
        Calibration {
            target,
            compute_fraction: compute,
            reachable,
            setting,
        },
    ))
}
