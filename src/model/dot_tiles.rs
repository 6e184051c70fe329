//! `x · wᵀ` for a short prompt's rows: tiles of dot products over the stored weight.
//!
//! A prefill of a few hundred tokens multiplies `(m, k)` activations by `(n, k)` weights
//! with `m` from 9 to a few hundred. `gemm`'s packed matmul (candle's CPU matmul) first
//! copies both operands into panels, which a product this small does not win back. Here
//! both operands are read as stored, since each row of `x` and of the weight `(out, in)`
//! is already contiguous along `k`: a tile of 4 rows of `x` and 4 rows of `w` keeps 16
//! vectors of partial dot products in registers, reduced once at the end of `k` (in
//! slices of at most 768 values, so that a block of 8 weight rows fits the L1 cache).
//!
//! The weight's rows are split across the threads of [`awake_pool`](super::awake_pool), so
//! that it is read from memory once in all; within a thread, a block of weight rows is
//! multiplied with every row of `x` before the next block.
//!
//! Measured side by side on this machine's 2 cores (AVX-512), each weight read from
//! memory as in a prefill: 151 / 224 / 267 GFLOP/s for `128 × 576 → 576`,
//! `128 × 576 → 1536` and `128 × 1536 → 576`, against `gemm`'s 110 / 193 / 129; at 256
//! rows 287 / 279 against 250 / 197 (`576 → 1536`, `1536 → 576`). In a whole prefill
//! the 128-token prompt gained 28-30%, the 256-token one 1-4%, and 512 tokens lost 15-25%
//! against `gemm`, hence [`MAX_ROWS`].

/// Rows of `x` up to which [`matmul_wt`] is used (measured in whole prefills: above it,
/// `gemm`'s packed matmul was faster).
pub(crate) const MAX_ROWS: usize = 256;

/// Rows of `x` and of `w` in a tile.
const TILE: usize = 4;

/// `y = x · wᵀ`: `x` `(m, k)` and `w` `(n, k)` row-major f32 slices; returns `y` `(m, n)`
/// row-major, or `None` where this CPU has no AVX-512 (the caller then uses `gemm`).
pub(crate) fn matmul_wt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && x.len() >= m * k && w.len() >= n * k {
        let mut y = vec![0f32; m * n];
        let out = Output(y.as_mut_ptr());
        // Each thread multiplies every row of x by its own rows of the weight, so the
        // weight is read from memory once in all.
        let split = super::awake_pool::Next::Later;
        super::awake_pool::for_each_range(n, TILE, 8 * TILE, split, |cols| {
            let out = &out;
            // SAFETY: the CPU supports AVX-512F (checked above); `x` holds `m` rows of `k`
            // values and `w` `n` rows (checked above); the outputs of columns `cols` of
            // each of the `m` rows of `y` (`n` apart) are written by this call only.
            unsafe {
                let w = &w[cols.start * k..cols.end * k];
                avx512::product(&x[..m * k], k, w, cols.len(), out.0.add(cols.start), n)
            };
        });
        return Some(y);
    }
    let _ = (x, m, k, w, n);
    None
}

/// The output of [`matmul_wt`], written by several threads at once, each in columns of
/// its own.
#[cfg(target_arch = "x86_64")]
struct Output(*mut f32);

// SAFETY: the threads that share an `Output` write disjoint elements, and the vector it
// points into outlives them (`for_each_range` returns after every part).
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Output {}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::TILE;
    use std::arch::x86_64::*;

    /// `y = x · wᵀ` for `x` `(m, k)` with `m = x.len() / k` and `w` `(n, k)`; `y` `(m, n)`
    /// with rows `ldy` apart.
    ///
    /// Safety: the CPU supports AVX-512F; `w.len() ≥ n·k`; `y` points at `m` rows of `n`
    /// writable values, `ldy` apart.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(
        x: &[f32],
        k: usize,
        w: &[f32],
        n: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let m = x.len() / k.max(1);
        debug_assert!(w.len() >= n * k);
        // Products over a long `k` run in slices of at most `SLICE` values, added up in
        // `y`, so that a block of at least 8 weight rows still fits the L1 cache.
        const SLICE: usize = 768;
        let slices = k.div_ceil(SLICE).max(1);
        let slice_len = k.div_ceil(slices);
        // Weight rows per block: about half the L1 data cache, a multiple of the tile.
        let block = ((24 << 10) / (slice_len.max(1) * 4) / TILE * TILE).max(TILE);
        let (xp, wp, yp) = (x.as_ptr(), w.as_ptr(), y);
        for p0 in (0..k).step_by(slice_len.max(1)) {
            let len = slice_len.min(k - p0);
            let add = p0 > 0;
            for j0 in (0..n).step_by(block) {
                let j_end = (j0 + block).min(n);
                for i in (0..m).step_by(TILE) {
                    let i_end = (i + TILE).min(m);
                    let mut j = j0;
                    if i_end - i == TILE {
                        while j + TILE <= j_end {
                            // SAFETY: rows i..i+4 of x, j..j+4 of w (values p0..p0+len of
                            // each) and the 4 × 4 outputs at (i, j) are in bounds.
                            unsafe {
                                let (xs, ws) = (xp.add(i * k + p0), wp.add(j * k + p0));
                                tile(xs, ws, len, k, yp.add(i * ldy + j), ldy, add)
                            };
                            j += TILE;
                        }
                    }
                    for r in i..i_end {
                        for c in j..j_end {
                            // SAFETY: row r of x, row c of w and output (r, c) are in bounds.
                            unsafe {
                                let d = dot(xp.add(r * k + p0), wp.add(c * k + p0), len);
                                let out = yp.add(r * ldy + c);
                                *out = if add { *out + d } else { d };
                            }
                        }
                    }
                }
            }
        }
    }

    /// The lanes of the last, partial vector of a row of `k` values.
    #[inline(always)]
    fn tail_mask(k: usize) -> __mmask16 {
        ((1u32 << (k % 16)) - 1) as __mmask16
    }

    /// The 4 × 4 outputs `y[r][c] = x_r · w_c` (`+=` if `add`) of 4 rows of `x` and 4 rows
    /// of `w`, each of `len` values, rows `stride` apart; `y` rows are `ldy` apart.
    ///
    /// Safety: AVX-512F; `x` and `w` point at 4 rows of `len` readable values each, `y` at
    /// 4 rows of 4 writable values.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile(
        x: *const f32,
        w: *const f32,
        len: usize,
        stride: usize,
        y: *mut f32,
        ldy: usize,
        add: bool,
    ) {
        let mut acc = [_mm512_setzero_ps(); TILE * TILE];
        let whole = len / 16 * 16;
        let mut p = 0;
        // SAFETY (all loads): p + 16 ≤ len in this loop; the masked loads below read only
        // the lanes before len.
        while p < whole {
            let xs: [__m512; TILE] =
                std::array::from_fn(|r| unsafe { _mm512_loadu_ps(x.add(r * stride + p)) });
            for c in 0..TILE {
                let wv = unsafe { _mm512_loadu_ps(w.add(c * stride + p)) };
                for r in 0..TILE {
                    acc[r * TILE + c] = _mm512_fmadd_ps(xs[r], wv, acc[r * TILE + c]);
                }
            }
            p += 16;
        }
        if p < len {
            let mask = tail_mask(len);
            let xs: [__m512; TILE] = std::array::from_fn(|r| unsafe {
                _mm512_maskz_loadu_ps(mask, x.add(r * stride + p))
            });
            for c in 0..TILE {
                let wv = unsafe { _mm512_maskz_loadu_ps(mask, w.add(c * stride + p)) };
                for r in 0..TILE {
                    acc[r * TILE + c] = _mm512_fmadd_ps(xs[r], wv, acc[r * TILE + c]);
                }
            }
        }
        for r in 0..TILE {
            let sums = sum4(
                acc[r * TILE],
                acc[r * TILE + 1],
                acc[r * TILE + 2],
                acc[r * TILE + 3],
            );
            // SAFETY: row r of the 4 × 4 outputs is readable and writable.
            unsafe {
                let out = y.add(r * ldy);
                let sums = if add {
                    _mm_add_ps(_mm_loadu_ps(out), sums)
                } else {
                    sums
                };
                _mm_storeu_ps(out, sums);
            }
        }
    }

    /// The horizontal sums of four vectors, `[Σa, Σb, Σc, Σd]`: pairs interleaved and
    /// added, then the 128-bit lanes added (13 instructions where four separate
    /// reductions take about 32).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sum4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        // Per 128-bit lane: [a, b, c, d] partial sums.
        let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
        let abcd = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)),
        );
        let halves = _mm256_add_ps(
            _mm512_castps512_ps256(abcd),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)),
        );
        _mm_add_ps(
            _mm256_castps256_ps128(halves),
            _mm256_extractf128_ps(halves, 1),
        )
    }

    /// `x · w` over `k` values.
    ///
    /// Safety: AVX-512F; `x` and `w` point at `k` readable values each.
    #[target_feature(enable = "avx512f")]
    unsafe fn dot(x: *const f32, w: *const f32, k: usize) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let whole = k / 16 * 16;
        let mut p = 0;
        // SAFETY (all loads): as in `tile`.
        while p < whole {
            let (xv, wv) = unsafe { (_mm512_loadu_ps(x.add(p)), _mm512_loadu_ps(w.add(p))) };
            acc = _mm512_fmadd_ps(xv, wv, acc);
            p += 16;
        }
        if p < k {
            let mask = tail_mask(k);
            let (xv, wv) = unsafe {
                (
                    _mm512_maskz_loadu_ps(mask, x.add(p)),
                    _mm512_maskz_loadu_ps(mask, w.add(p)),
                )
            };
            acc = _mm512_fmadd_ps(xv, wv, acc);
        }
        _mm512_reduce_add_ps(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gemv::tests::{assert_is_the_product, operands};

    fn avx512() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    #[test]
    fn tiles_equal_the_product_computed_in_f64() {
        // Odd row counts (tile remainders), widths that are not whole vectors, a single
        // output column (a router), a width below one vector, and widths summed in two
        // and three slices.
        for (m, k, n) in [
            (9, 576, 576),
            (13, 37, 130),
            (4, 16, 4),
            (130, 576, 1),
            (17, 5, 7),
            (9, 1537, 13),
            (8, 1000, 8),
        ] {
            let (x, w) = operands(m, k, n);
            match matmul_wt(&x, m, k, &w, n) {
                Some(y) => assert_is_the_product(&x, m, k, &w, n, &y),
                // Only a CPU without AVX-512 may decline (the caller then uses gemm).
                None => assert!(!avx512(), "declined ({m}, {k}, {n}) on an AVX-512 CPU"),
            }
        }
    }
}
