//! `ModConfig`: how a dense model is turned into a Mixture-of-Depths model. Saved with every
//! converted model as the `mod` section of its `config.json`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which decoder layers get a router.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RoutedLayers {
    /// A rule over all layers.
    Rule(LayerRule),
    /// Explicit 0-based layer indices.
    List(Vec<usize>),
}

/// A rule naming routed layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerRule {
    /// Every other layer starting at 1 (1, 3, 5, ...), as in MoD and MoDification.
    Odd,
    /// Every layer.
    All,
    /// No layer: the dense model.
    None,
}

/// The selection operator of the routed layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterKind {
    /// MoDification's threshold-p: token i passes layer j iff its gate `g_i >= p`. Per token,
    /// causal, no fixed capacity.
    ThresholdP {
        /// Threshold p in (0, 1); 0.5 in the paper (0.55 for larger models).
        p: f64,
        /// Per-layer overrides of p, by layer index.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        per_layer: BTreeMap<usize, f64>,
    },
    /// The MoD baseline (Raposo et al. 2024): per row, the `k = ceil(C · valid tokens)` tokens
    /// with the largest router logits pass. Not causal: decoding uses the auxiliary predictor
    /// `sigmoid(logit) >= 0.5` (MoD §3.5).
    TopK {
        /// Capacity C in (0, 1].
        capacity: f64,
    },
}

impl RouterKind {
    /// Threshold-p with every threshold (the global p and each per-layer p) moved by
    /// `delta` in logit space, `p ← sigmoid(logit(p) + delta)` and kept strictly inside
    /// (0, 1): a positive `delta` keeps fewer tokens in every routed layer. One scalar
    /// moves the whole model's operating point, as calibration does
    /// ([`crate::calibrate::calibrate_compute`]). Top-k is returned unchanged (its
    /// operating point is the capacity).
    pub fn shifted(&self, delta: f64) -> Self {
        let shift = |p: f64| {
            let z = (p / (1.0 - p)).ln() + delta;
            (1.0 / (1.0 + (-z).exp())).clamp(1e-12, 1.0 - 1e-12)
        };
        match self {
            RouterKind::ThresholdP { p, per_layer } => RouterKind::ThresholdP {
                p: shift(*p),
                per_layer: per_layer.iter().map(|(&j, &p)| (j, shift(p))).collect(),
            },
            RouterKind::TopK { .. } => self.clone(),
        }
    }
}

/// How the gate value enters the layer's output, `x' = x + s(g) · (Block(x) − x)` on kept
/// tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateScaling {
    /// `s(g) = g`, as in the paper: a kept token's delta is multiplied by its gate.
    Multiply,
    /// Forward value 1, gradient of g (`1 + g − stopgrad(g)`): with every gate open the
    /// converted model equals the pretrained one.
    StraightThrough,
}

/// What the router gate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateInput {
    /// The raw residual stream x (as in MoD / MoDification).
    Residual,
    /// The layer's input-RMSNorm output: immune to the few huge "massive activation"
    /// dimensions of pretrained residual streams.
    Normalized,
}

/// What a token skipped at a routed layer contributes to that layer's attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvPolicy {
    /// MoD / MoDification: a skipped token is neither query nor key/value at that layer, so
    /// the layer's KV cache never holds it (the memory saving).
    Skip,
    /// A skipped token still writes K and V (projected from its unchanged hidden state); only
    /// its query, attention output, O-projection and MLP are skipped. Saves compute, not KV
    /// memory, at about half the perplexity cost of `Skip`.
    Keep,
}

/// The Mixture-of-Depths conversion settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModConfig {
    /// Routed layers (default: odd).
    pub routed_layers: RoutedLayers,
    /// Never route the first and the last layer, whatever the rule says.
    pub exclude_first_last: bool,
    /// Selection operator (default: threshold-p with p = 0.5).
    pub router: RouterKind,
    /// How the gate scales the block's delta (default: straight-through).
    pub gate_scaling: GateScaling,
    /// What the gate reads (default: the residual stream).
    pub gate_input: GateInput,
    /// Initial gate bias b; gate weights start at zero, so every token starts at
    /// `g = sigmoid(b)`. Must keep every token under threshold-p: `sigmoid(b) >= p`.
    pub gate_init_bias: f64,
    /// Coefficient α of the load-reducing objective `α · Σ_j F_j · G_j` (default 0.01).
    pub alpha: f64,
    /// Skipped-token KV policy (default: skip).
    pub kv_policy: KvPolicy,
    /// Number of leading tokens of every sequence kept at every routed layer (attention
    /// sinks; default 1).
    pub sink_tokens: usize,
    /// Rank r of each routed layer's skip adapter, which gives a skipped token
    /// `x + U · silu(D · RMSNorm(x))` instead of `x`
    /// ([`SkipAdapter`](crate::mixture_of_depths::SkipAdapter)); 0 (the default, and the
    /// paper) passes skipped tokens through unchanged. At most the hidden size.
    pub skip_adapter_rank: usize,
}

impl Default for ModConfig {
    fn default() -> Self {
        Self {
            routed_layers: RoutedLayers::Rule(LayerRule::Odd),
            exclude_first_last: false,
            router: RouterKind::ThresholdP {
                p: 0.5,
                per_layer: BTreeMap::new(),
            },
            gate_scaling: GateScaling::StraightThrough,
            gate_input: GateInput::Residual,
            gate_init_bias: 2.0,
            alpha: 0.01,
            kv_policy: KvPolicy::Skip,
            sink_tokens: 1,
            skip_adapter_rank: 0,
        }
    }
}

impl ModConfig {
    /// The sorted routed layer indices of a model with `num_layers` layers.
    ///
    /// Errors: [`Error::Config`] for a listed index `>= num_layers` or a duplicate.
    pub fn routed_layer_indices(&self, num_layers: usize) -> Result<Vec<usize>> {
        let mut layers: Vec<usize> = match &self.routed_layers {
            RoutedLayers::Rule(LayerRule::Odd) => (1..num_layers).step_by(2).collect(),
            RoutedLayers::Rule(LayerRule::All) => (0..num_layers).collect(),
            RoutedLayers::Rule(LayerRule::None) => Vec::new(),
            RoutedLayers::List(list) => {
                let mut list = list.clone();
                list.sort_unstable();
                if list.windows(2).any(|w| w[0] == w[1]) {
                    return Err(Error::config("routed layer listed twice"));
                }
                if let Some(&bad) = list.iter().find(|&&j| j >= num_layers) {
                    return Err(Error::config(format!(
                        "routed layer {bad} is past the model's {num_layers} layers"
                    )));
                }
                list
            }
        };
        if self.exclude_first_last {
            layers.retain(|&j| j != 0 && j + 1 != num_layers);
        }
        Ok(layers)
    }

    /// The threshold p of layer `j` (threshold-p only).
    pub fn threshold_for(&self, j: usize) -> Option<f64> {
        match &self.router {
            RouterKind::ThresholdP { p, per_layer } => Some(*per_layer.get(&j).unwrap_or(p)),
            RouterKind::TopK { .. } => None,
        }
    }

    /// Checks the settings of a conversion that starts from fresh routers: [`validate`]
    /// plus [`check_fresh_values`](Self::check_fresh_values).
    ///
    /// [`validate`]: Self::validate
    ///
    /// Errors: those of [`validate`](Self::validate) and
    /// [`check_fresh_values`](Self::check_fresh_values).
    pub fn validate_fresh(&self, num_layers: usize) -> Result<()> {
        self.validate(num_layers)?;
        self.check_fresh_values()
    }

    /// The checks of [`validate_fresh`](Self::validate_fresh) that need no model: those of
    /// [`check_values`](Self::check_values), and an initial bias that keeps every token
    /// (`sigmoid(b) >= p` for every p), so that a fresh conversion starts from the
    /// pretrained model. What a command line checks before loading anything.
    ///
    /// Errors: [`Error::Config`] as [`check_values`](Self::check_values), or for an
    /// initial bias that would skip tokens of a fresh model.
    pub fn check_fresh_values(&self) -> Result<()> {
        self.check_values()?;
        if let RouterKind::ThresholdP { p, per_layer } = &self.router {
            for &pj in std::iter::once(p).chain(per_layer.values()) {
                if sigmoid(self.gate_init_bias) < pj {
                    return Err(Error::config(format!(
                        "gate_init_bias {} gives sigmoid {:.3} < p = {pj}: a fresh model would skip tokens",
                        self.gate_init_bias,
                        sigmoid(self.gate_init_bias)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks every value against a model of `num_layers` layers (a loaded converted model
    /// may carry any thresholds in (0, 1); see [`validate_fresh`](Self::validate_fresh) for a
    /// new conversion).
    ///
    /// Errors: [`Error::Config`] as [`check_values`](Self::check_values), for a per-layer
    /// p for a layer that is not routed, or a routed layer index past the model.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        self.check_values()?;
        let layers = self.routed_layer_indices(num_layers)?;
        if let RouterKind::ThresholdP { per_layer, .. } = &self.router {
            if let Some(j) = per_layer.keys().find(|j| !layers.contains(j)) {
                return Err(Error::config(format!(
                    "a threshold is given for layer {j}, which is not routed"
                )));
            }
        }
        Ok(())
    }

    /// The checks that need no model.
    ///
    /// Errors: [`Error::Config`] for p outside (0, 1) (global or per layer), capacity
    /// outside (0, 1], α negative or not finite, or a non-finite initial bias.
    pub fn check_values(&self) -> Result<()> {
        match &self.router {
            RouterKind::ThresholdP { p, per_layer } => {
                for &pj in std::iter::once(p).chain(per_layer.values()) {
                    if !(pj > 0.0 && pj < 1.0) {
                        return Err(Error::config(format!(
                            "threshold p = {pj} is outside (0, 1)"
                        )));
                    }
                }
            }
            RouterKind::TopK { capacity } => {
                if !(*capacity > 0.0 && *capacity <= 1.0) {
                    return Err(Error::config(format!(
                        "capacity {capacity} is outside (0, 1]"
                    )));
                }
            }
        }
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            return Err(Error::config(format!(
                "alpha = {} must be finite and >= 0",
                self.alpha
            )));
        }
        if !self.gate_init_bias.is_finite() {
            return Err(Error::config("gate_init_bias must be finite"));
        }
        Ok(())
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::RouterKind;
    use std::collections::BTreeMap;

    #[test]
    fn shifted_moves_every_threshold_in_logit_space() {
        let router = RouterKind::ThresholdP {
            p: 0.5,
            per_layer: BTreeMap::from([(3, 0.8)]),
        };
        // sigmoid(0 + 1) and sigmoid(ln 4 + 1) = 4e / (1 + 4e).
        let e4 = 4.0 * std::f64::consts::E;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(
            matches!(router.shifted(1.0), RouterKind::ThresholdP { p, per_layer }
            if close(p, 0.731_058_578_630_004_9) && close(per_layer[&3], e4 / (1.0 + e4)))
        );
        assert!(
            matches!(router.shifted(0.0), RouterKind::ThresholdP { p, per_layer }
            if close(p, 0.5) && close(per_layer[&3], 0.8))
        );
        // Extreme shifts stay strictly inside (0, 1); top-k has no threshold to move.
        assert!(
            matches!(router.shifted(-1e3), RouterKind::ThresholdP { p, .. }
            if p > 0.0 && p < 1e-11)
        );
        let topk = RouterKind::TopK { capacity: 0.3 };
        assert_eq!(topk.shifted(2.0), topk);
    }
}
