//! `x · wᵀ` for a few rows of `x`: the decode step's matmul.
//!
//! A decode step multiplies one token's activations by every weight matrix, so it reads
//! each weight once and is bound by memory bandwidth. A general matmul packs the weight
//! into blocks first, which reads and writes it again; here each output is a dot product
//! of `x`'s row with a contiguous row of the `(out, in)` weight, read once, and the rows
//! are split across threads that stay awake between the products of a step
//! ([`awake_pool`](super::awake_pool)).

/// Rows of `x` up to which [`gemv`] beats the packed matmul.
pub(crate) const MAX_ROWS: usize = 8;

/// `y = x · wᵀ`: `x` `(m, k)` and `w` `(n, k)` row-major f32 slices; returns `y` `(m, n)`
/// row-major.
pub(crate) fn gemv(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    debug_assert!(x.len() >= m * k && w.len() >= n * k);
    let dot = dot_kernel();
    by_weight_rows(m, n, |j, outputs| {
        let row = &w[j * k..][..k];
        for (r, y) in outputs.iter_mut().enumerate() {
            *y = dot(&x[r * k..][..k], row);
        }
    })
}

/// `y` `(m, n)` row-major from `outputs(j, y_j)`, which fills `y_j`, the `m` outputs of
/// weight row `j` (one per row of `x`). The weight rows are split across the threads of
/// [`awake_pool`](super::awake_pool) in groups of 16, at least 32 rows a thread.
pub(crate) fn by_weight_rows<F>(m: usize, n: usize, outputs: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let mut out_t = vec![0f32; n * m];
    let next = super::awake_pool::Next::Soon;
    super::awake_pool::fill_parts(&mut out_t, 16 * m, 32 * m, next, |offset, part| {
        for (i, y_j) in part.chunks_mut(m.max(1)).enumerate() {
            outputs(offset / m.max(1) + i, y_j);
        }
    });
    outputs_by_row(out_t, m, n)
}

/// The outputs of a row-split product, computed `(n, m)` (each weight row's outputs for
/// every row of `x` together), as `(m, n)` row-major.
fn outputs_by_row(out_t: Vec<f32>, m: usize, n: usize) -> Vec<f32> {
    if m == 1 {
        return out_t;
    }
    let mut y = vec![0f32; m * n];
    for (j, col) in out_t.chunks(m).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * n + j] = v;
        }
    }
    y
}

/// The dot product with the widest vector instructions this CPU has (chosen once per
/// matmul, not per dot product).
fn dot_kernel() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return |a, b| unsafe { dot_avx512(a, b) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return |a, b| unsafe { dot_avx2(a, b) };
        }
    }
    dot_lanes
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// Dot product with 16 independent partial sums, so that it vectorises at the width the
/// caller is compiled for.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_main, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (ca, cb) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic operands in [-1, 1]: `x` `(m, k)` and `w` `(n, k)`, row-major.
    pub(crate) fn operands(m: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        // Hashed indices, not a short period: no two rows of x (or of w) are equal, so a
        // kernel that mixes up rows cannot pass by chance.
        let value = |i: usize, salt: u64| {
            let h = (i as u64 ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            (h % 2001) as f32 / 1000.0 - 1.0
        };
        let x = (0..m * k).map(|i| value(i, 0x5151));
        let w = (0..n * k).map(|i| value(i, 0xA3A3));
        (x.collect(), w.collect())
    }

    /// Asserts that `y` `(m, n)` is `x · wᵀ` computed in f64 (1e-4 relative), for `x`
    /// `(m, k)` and `w` `(n, k)` row-major.
    pub(crate) fn assert_is_the_product(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        y: &[f32],
    ) {
        assert_eq!(y.len(), m * n);
        for r in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum();
                let got = y[r * n + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "({m}, {k}, {n}) at ({r}, {j}): {got} against {want}"
                );
            }
        }
    }

    #[test]
    fn gemv_equals_the_naive_product() {
        for (m, k, n) in [(1, 1, 1), (1, 576, 1536), (3, 37, 130), (8, 16, 65)] {
            let (x, w) = operands(m, k, n);
            let y = gemv(&x, m, k, &w, n);
            assert_is_the_product(&x, m, k, &w, n, &y);
        }
    }
}
