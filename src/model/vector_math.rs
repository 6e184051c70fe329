//! Branch-free `exp`, maximum, sum and multiply-add, written so that a loop of them
//! vectorises at the width its caller is compiled for (the fused kernels call them from
//! functions compiled with AVX-512 or AVX2 enabled).

/// Partial results kept per lane by [`lane_max`] and [`lane_sum`], so that the loops
/// vectorise (a single running value would be a serial chain).
pub(crate) const LANES: usize = 16;

/// The largest of `x` (non-empty).
#[inline(always)]
pub(crate) fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// The sum of `x`.
#[inline(always)]
pub(crate) fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ exp(x − shift)` for `shift ≥ max(x)` (every exponent ≤ 0, as [`exp`] needs).
#[inline(always)]
pub(crate) fn sum_exp(x: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - shift)).sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += exp(c[l] - shift);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `a·b + c`, fused where the caller is compiled with FMA instructions (without them
/// `mul_add` would be a library call).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `eˣ` for `x ≤ 0` (a score minus its row's maximum), within 3e-7 relative of `expf`:
/// `2ⁿ · eʳ` with `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, and `eʳ` by its degree-6 Taylor
/// polynomial. Branch-free, so a loop of it vectorises. Below -87 it returns `e⁻⁸⁷`
/// (about 1.6e-38), which is 0 against the row's largest term `e⁰ = 1`.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n · LN2_HI` is exact for the n that occur here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `n` as an integer is in the low bits of `shifted` (its unit in the last place is 1):
    // integer lanes, where `n as i32` (a saturating conversion) would be scalar code.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_library_exp() {
        for i in 0..=20_000 {
            let x = -90.0 * i as f32 / 20_000.0;
            let (got, want) = (exp(x), x.exp());
            let err = (got - want).abs() / want.max(f32::MIN_POSITIVE);
            assert!(
                err < 3e-7 || (x < -87.0 && got < 2e-38),
                "exp({x}) = {got}, want {want}"
            );
        }
    }
}
