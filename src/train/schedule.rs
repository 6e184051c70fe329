//! Schedules: the learning rate (linear warm-up, then cosine decay) and the compute
//! budget (lowered gradually from the dense model's to the target).

/// The learning-rate multiplier at optimisation step `step` (0-based) of `total`: rises
/// linearly from `1/(warmup+1)` to 1 over `warmup` steps, then follows a cosine from 1 down
/// to `min_ratio` at the last step.
pub fn lr_multiplier(step: usize, total: usize, warmup: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / (warmup + 1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup + 1).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The compute budget at optimisation step `step` (0-based) of `total`: lowered linearly
/// from 1 (the dense model) to `target` over the first `ramp` fraction of the steps, then
/// held. Routers learn which tokens matter while few are skipped, instead of skipping
/// arbitrary tokens at once.
pub fn compute_budget(step: usize, total: usize, target: f64, ramp: f64) -> f64 {
    let ramp_steps = (ramp * total as f64).round();
    if ramp_steps < 1.0 {
        return target;
    }
    let progress = ((step + 1) as f64 / ramp_steps).min(1.0);
    1.0 - (1.0 - target) * progress
}

#[cfg(test)]
mod tests {
    use super::{compute_budget, lr_multiplier};

    #[test]
    fn compute_budget_ramps_down_then_holds() {
        assert!((compute_budget(0, 10, 0.8, 0.5) - 0.96).abs() < 1e-12);
        assert!((compute_budget(4, 10, 0.8, 0.5) - 0.8).abs() < 1e-12);
        assert!((compute_budget(9, 10, 0.8, 0.5) - 0.8).abs() < 1e-12);
        assert_eq!(compute_budget(0, 10, 0.8, 0.0), 0.8);
    }

    #[test]
    fn warmup_then_cosine_reaches_the_floor_at_the_last_step() {
        assert!((lr_multiplier(0, 10, 2, 0.1) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(lr_multiplier(2, 10, 2, 0.1), 1.0);
        assert!((lr_multiplier(9, 10, 2, 0.1) - 0.1).abs() < 1e-12);
        // Half-way through the decay: the cosine's midpoint.
        assert!((lr_multiplier(5, 10, 1, 0.0) - 0.5).abs() < 1e-12);
        assert!((0..50).all(|s| lr_multiplier(s, 50, 0, 1.0) == 1.0));
    }
}
