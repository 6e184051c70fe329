//! What one routed layer did in one forward pass.

use candle_core::Tensor;

/// Routing statistics of one routed layer j for one forward pass.
#[derive(Debug, Clone)]
pub struct RoutingStats {
    /// The layer index j.
    pub layer: usize,
    /// Kept (non-padding) tokens over the batch.
    pub kept: usize,
    /// Valid (non-padding) tokens over the batch.
    pub valid: usize,
    /// Mean gate G_j over valid tokens: a scalar f32 tensor that carries the router's
    /// gradient (the factor of the load-reducing objective that is trained).
    pub mean_gate: Tensor,
    /// Router logits `(B, T)` f32 (for the top-k auxiliary predictor loss).
    pub logits: Tensor,
    /// Per-token kept mask `(B, T)` f32 (1 = kept), padding 0.
    pub kept_mask: Tensor,
    /// FLOPs spent by this layer in this pass (multiply-adds count 2), router included.
    pub flops: f64,
    /// FLOPs the dense layer would have spent on the same tokens.
    pub dense_flops: f64,
}

impl RoutingStats {
    /// Kept fraction F_j = kept / valid (no gradient), in [0, 1].
    pub fn kept_fraction(&self) -> f64 {
        if self.valid == 0 {
            0.0
        } else {
            self.kept as f64 / self.valid as f64
        }
    }
}
