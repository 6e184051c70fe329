//! Learning-rate schedule: linear warm-up, then cosine decay.

/// The learning-rate multiplier at optimisation step `step` (0-based) of `total`: rises
/// linearly from `1/(warmup+1)` to 1 over `warmup` steps, then follows a cosine from 1 down
/// to `min_ratio` at the last step.
pub fn lr_multiplier(step: usize, total: usize, warmup: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / (warmup + 1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}
