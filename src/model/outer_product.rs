//! `x · wᵀ` for a short prompt's rows: sums of outer products of weight values and
//! token vectors.
//!
//! A prefill of a few hundred tokens multiplies `(m, k)` activations by `(n, k)` weights
//! stored `(out, in)`, with `m` from 9 to 256. `gemm`'s packed matmul (candle's CPU
//! matmul) copies both operands into panels on every call, which a product this small does
//! not win back. Here each register tile holds `yᵀ` for [`ROWS`] weight rows × [`TOKENS`]
//! tokens: 24 vectors of sums; a step along `k` broadcasts one value of each of the 12
//! weight rows and multiplies it with two vectors of 16 tokens, 24 multiply-adds for 14
//! loads (BLIS's register tile, with the weight as the left operand). Its operands are
//! laid out for it once per call: the activations transposed into panels of 32 tokens
//! (`k × 32`, one copy of `x`, shared by the threads), and each thread's weight rows,
//! slice by slice of [`SLICE`] values, interleaved 12 rows at a time. A panel's slice
//! (32 KiB) stays in the L1 cache while a group of 16 blocks of weight rows is multiplied
//! with it, and the weight is read from memory once in all, its next slice fetched while
//! it is interleaved.
//!
//! Measured on this machine's 2 cores (AVX-512, 177 GFLOP/s a core on register-only
//! multiply-adds): the tile alone, in L1, 174 GFLOP/s on one core; whole products with
//! each weight read from memory as in a prefill, alternating in one process, 186-207 /
//! 209-233 / 208-234 GFLOP/s for `128 × 576 → 576`, `→ 1536` and `128 × 1536 → 576`,
//! against 166-190 / 138-180 / 150-178 for the tiles of dot products this replaced and
//! 100-130 / 185-197 / 113-118 for `gemm`; 224-227 against 109-180 at 256 rows. What
//! remains is mostly memory: reading the weight and the activations' transposition. At
//! 512 rows and more `gemm` ties or wins (a 2048-token prefill lost 10% here), hence
//! [`MAX_ROWS`].

/// Rows of `x` up to which [`matmul_wt`] is used (above it, in whole prefills of 512 and
/// 2048 tokens, `gemm`'s packed matmul tied or won).
pub(crate) const MAX_ROWS: usize = 256;

/// Weight rows in a register tile.
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 12;

/// Tokens in a panel of the transposed activations (two vectors of 16 f32).
#[cfg(target_arch = "x86_64")]
const TOKENS: usize = 32;

/// Values of `k` multiplied in one pass: a slice of a token panel (`SLICE × 32` values,
/// 32 KiB) stays in the L1 cache while a group of blocks of weight rows is multiplied
/// with it.
#[cfg(target_arch = "x86_64")]
const SLICE: usize = 256;

/// Blocks of [`ROWS`] weight rows multiplied together, slice by slice: their interleaved
/// slice and their sums (192 KiB each at 256 tokens) stay in the L2 cache, and a thread's
/// scratch is bounded whatever the weight's size (`lm_head`).
#[cfg(target_arch = "x86_64")]
const GROUP_BLOCKS: usize = 16;

/// Token panels larger than this (values, 4 MiB) are not kept for the next product.
#[cfg(target_arch = "x86_64")]
const KEEP_PANELS: usize = 1 << 20;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The calling thread's token panels, kept between products so that a prefill does
    /// not allocate (and fault in) fresh memory for each of them.
    static PANELS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// A thread's tile sums and interleaved weight slices, kept the same way.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `y = x · wᵀ`: `x` `(m, k)` and `w` `(n, k)` row-major f32 slices; returns `y` `(m, n)`
/// row-major, or `None` (the caller then uses `gemm`) where this CPU has no AVX-512, `m`
/// or `k` is 0, or a slice is shorter than its shape. Meant for `m` up to [`MAX_ROWS`]:
/// the token panels it keeps for the calling thread grow with `m·k` (up to
/// [`KEEP_PANELS`]).
pub(crate) fn matmul_wt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f")
        && m > 0
        && k > 0
        && x.len() >= m * k
        && w.len() >= n * k
    {
        let mut y = Vec::with_capacity(m * n);
        let out = Output(y.as_mut_ptr());
        let slice = k.div_ceil(k.div_ceil(SLICE).max(1)).max(1);
        PANELS.with(|kept| {
            let mut buffer = kept.take();
            let panels = token_panels(&x[..m * k], m, k, &mut buffer);
            let split = super::awake_pool::Next::Later;
            super::awake_pool::for_each_range(n, ROWS, 4 * ROWS, split, |rows| {
                // The whole `Output` (which is Sync), not its pointer field alone.
                let out = &out;
                let w = &w[rows.start * k..rows.end * k];
                // SAFETY: the CPU supports AVX-512F (checked above); `w` holds these rows
                // of k values; `panels` m.div_ceil(32) panels of 32·k values; `y` has room
                // for m rows of n, and columns `rows` of it are written by this part only.
                unsafe { avx512::weight_rows(w, k, slice, panels, m, out.0, n, rows.start) };
            });
            // A prefill's panels are at most 1.5 MB; larger ones are not kept.
            if buffer.len() <= KEEP_PANELS {
                kept.replace(buffer);
            }
        });
        // SAFETY: every output was written: each of the n columns belongs to one part,
        // which writes it for all m rows.
        unsafe { y.set_len(m * n) };
        return Some(y);
    }
    let _ = (x, m, k, w, n);
    None
}

/// `x` `(m, k)` as `m.div_ceil(32)` panels of `k × 32` values, in `buffer` (grown if
/// needed, never cleared): panel `p` holds `x[32p + t][j]` at `p·32k + 32j + t`, zero past
/// the last token. Returns the panels, starting on a cache line.
#[cfg(target_arch = "x86_64")]
fn token_panels<'a>(x: &[f32], m: usize, k: usize, buffer: &'a mut Vec<f32>) -> &'a [f32] {
    let len = m.div_ceil(TOKENS) * TOKENS * k;
    if buffer.len() < len + 16 {
        buffer.resize(len + 16, 0.0);
    }
    // Rows of a panel start on a cache line, so no vector load of a row spans two lines.
    let start = buffer.as_ptr().align_offset(64).min(16);
    let panels = &mut buffer[start..start + len];
    for (p, panel) in panels.chunks_mut(TOKENS * k).enumerate() {
        let t0 = p * TOKENS;
        let tokens = TOKENS.min(m - t0);
        // SAFETY: the CPU supports AVX-512F (checked by the caller); `x` holds rows
        // t0..t0 + tokens of k values and `panel` 32·k values.
        unsafe { avx512::transpose_into(&x[t0 * k..(t0 + tokens) * k], k, panel) };
    }
    panels
}

/// The output of a product (here [`matmul_wt`], also the AMX products), written by
/// several threads at once, each in elements of its own.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Output(pub(crate) *mut f32);

// SAFETY: the threads that share an `Output` write disjoint elements, and the vector it
// points into outlives them (`for_each_range` returns after every part).
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Output {}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{GROUP_BLOCKS, ROWS, TOKENS};
    use std::arch::x86_64::*;

    /// `panel[j·32 + t] = rows[t·k + j]` for the `rows.len() / k` (at most 32) rows of `k`
    /// values, and zero for the panel's other tokens: every value of the panel is written.
    ///
    /// Safety: AVX-512F; `panel.len() ≥ 32·k`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_into(rows: &[f32], k: usize, panel: &mut [f32]) {
        let tokens = rows.len() / k.max(1);
        let whole = k / 16 * 16;
        for t0 in (0..TOKENS).step_by(16) {
            let count = tokens.saturating_sub(t0).min(16);
            for j0 in (0..whole).step_by(16) {
                // 16 tokens × 16 values, zero past the last token (an array of constant
                // indices, so that it stays in registers).
                let block: [__m512; 16] = std::array::from_fn(|t| {
                    let (row, lanes) = if t < count {
                        (t0 + t, u16::MAX)
                    } else {
                        (0, 0)
                    };
                    // SAFETY: row `row` < tokens holds values j0..j0 + 16 ≤ k; a load with
                    // no lanes reads nothing.
                    unsafe { _mm512_maskz_loadu_ps(lanes, rows.as_ptr().add(row * k + j0)) }
                });
                let columns = if count == 0 {
                    block
                } else {
                    transpose16(block)
                };
                for (j, v) in columns.iter().enumerate() {
                    let at = (j0 + j) * TOKENS + t0;
                    // SAFETY: (j0 + j)·32 + t0 + 16 ≤ 32·k ≤ panel.len().
                    unsafe { _mm512_storeu_ps(panel.as_mut_ptr().add(at), *v) };
                }
            }
            for t in t0..t0 + 16 {
                for j in whole..k {
                    panel[j * TOKENS + t] = if t < tokens { rows[t * k + j] } else { 0.0 };
                }
            }
        }
    }

    /// The transpose of a 16 × 16 block held as 16 row vectors: values interleaved in
    /// pairs, then in pairs of pairs, then the 128-bit lanes exchanged in two steps.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // Per 128-bit lane L: t[4i] = [a0 b0 a1 b1], t[4i+1] = [a2 b2 a3 b3] of rows
        // a = 4i, b = 4i+1; t[4i+2], t[4i+3] the same of rows 4i+2, 4i+3.
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // u[4i + q], lane L: column 4L + q of rows 4i..4i + 4.
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (g, q) = (i / 4 * 4, i % 4);
            let (a, b) = (
                _mm512_castps_pd(t[g + q / 2]),
                _mm512_castps_pd(t[g + 2 + q / 2]),
            );
            _mm512_castpd_ps(if q % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        // For each q, the 4 × 4 lanes of u[q], u[4+q], u[8+q], u[12+q] transposed: output
        // row 4L + q is lane L of each.
        let mut out = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x44>(u[q], u[4 + q]);
            let v1 = _mm512_shuffle_f32x4::<0xEE>(u[q], u[4 + q]);
            let v2 = _mm512_shuffle_f32x4::<0x44>(u[8 + q], u[12 + q]);
            let v3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + q], u[12 + q]);
            out[q] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
            out[4 + q] = _mm512_shuffle_f32x4::<0xDD>(v0, v2);
            out[8 + q] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
            out[12 + q] = _mm512_shuffle_f32x4::<0xDD>(v1, v3);
        }
        out
    }

    /// Columns `c0..c0 + w.len() / k` of `y` `(m, n)`: weight rows `w` (`k` values each)
    /// times every token panel, in groups of [`GROUP_BLOCKS`] blocks of [`ROWS`] rows, `k`
    /// in slices of `slice` values. The sums of a block and a panel are kept transposed
    /// (`ROWS × 32`) until the last slice, then written to `y`.
    ///
    /// Safety: AVX-512F; `panels` holds `m.div_ceil(32)` panels of `32·k` values; `y`
    /// points at `m` rows of `n` writable values and columns `c0..c0 + rows` are not
    /// written by another thread meanwhile.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_rows(
        w: &[f32],
        k: usize,
        slice: usize,
        panels: &[f32],
        m: usize,
        y: *mut f32,
        n: usize,
        c0: usize,
    ) {
        let rows = w.len() / k.max(1);
        let panel_count = m.div_ceil(TOKENS);
        let tile_len = ROWS * TOKENS;
        // The thread's scratch, kept between products (it only grows): the sums of a group
        // of blocks' tiles (the first slice writes each) and their weight slice interleaved.
        let sums_len = GROUP_BLOCKS * panel_count * tile_len;
        let mut kept = super::SCRATCH.take();
        let need = sums_len + GROUP_BLOCKS * slice * ROWS + 16;
        if kept.len() < need {
            kept.resize(need, 0.0);
        }
        let start = kept.as_ptr().align_offset(64).min(16);
        let (sums, interleaved) = kept[start..].split_at_mut(sums_len);
        for g0 in (0..rows).step_by(GROUP_BLOCKS * ROWS) {
            let group = &w[g0 * k..(g0 + GROUP_BLOCKS * ROWS).min(rows) * k];
            let group_rows = group.len() / k.max(1);
            let blocks = group_rows.div_ceil(ROWS);
            for j0 in (0..k).step_by(slice) {
                let len = slice.min(k - j0);
                for b in 0..blocks {
                    let block = &group[b * ROWS * k..((b + 1) * ROWS).min(group_rows) * k];
                    let out = interleaved[b * len * ROWS..].as_mut_ptr();
                    // SAFETY: the block holds its rows of k ≥ j0 + len values; the
                    // interleaved buffer holds GROUP_BLOCKS blocks of slice × ROWS values.
                    unsafe { interleave(block, k, j0, len, out) };
                }
                for p in 0..panel_count {
                    let panel = &panels[(p * k + j0) * TOKENS..][..len * TOKENS];
                    for b in 0..blocks {
                        let at = (b * panel_count + p) * tile_len;
                        // SAFETY: block b of the interleaved slice holds len × ROWS values,
                        // the panel slice len × 32 values, and the tile's sums ROWS × 32.
                        unsafe {
                            let w = interleaved.as_ptr().add(b * len * ROWS);
                            let sums = sums[at..at + tile_len].as_mut_ptr();
                            tile(w, len, panel.as_ptr(), sums, j0 > 0)
                        };
                    }
                }
            }
            for (b, block) in sums.chunks(panel_count * tile_len).take(blocks).enumerate() {
                let (c, cols) = (c0 + g0 + b * ROWS, ROWS.min(group_rows - b * ROWS));
                for (p, sums) in block.chunks(tile_len).enumerate() {
                    // SAFETY: the tile's sums hold ROWS × 32 values; its outputs are rows
                    // p·32.. (< m) and columns c..c + cols (≤ n) of y.
                    unsafe { write_tile(sums, p * TOKENS, m, y.add(c), n, cols) };
                }
            }
        }
        super::SCRATCH.replace(kept);
    }

    /// Writes a tile's sums (`ROWS × 32`, transposed) to rows `t0..min(t0 + 32, m)` and
    /// the first `cols` columns at `y` (rows `n` apart): 16 × 16 transposes and masked
    /// stores, not one store per value.
    ///
    /// Safety: AVX-512F; `sums` holds `ROWS · 32` values; `y` points at `m` rows of
    /// `cols` writable values, `n` apart.
    #[target_feature(enable = "avx512f")]
    unsafe fn write_tile(sums: &[f32], t0: usize, m: usize, y: *mut f32, n: usize, cols: usize) {
        let lanes = ((1u32 << cols) - 1) as __mmask16;
        for half in 0..TOKENS / 16 {
            let first = t0 + half * 16;
            if first >= m {
                break;
            }
            let rows: [__m512; 16] = std::array::from_fn(|r| {
                if r < ROWS {
                    // SAFETY: row r < ROWS of the sums holds 32 values.
                    unsafe { _mm512_loadu_ps(sums.as_ptr().add(r * TOKENS + half * 16)) }
                } else {
                    _mm512_setzero_ps()
                }
            });
            for (t, v) in transpose16(rows).iter().enumerate().take(m - first) {
                // SAFETY: row first + t < m of y holds `cols` writable values.
                unsafe { _mm512_mask_storeu_ps(y.add((first + t) * n), lanes, *v) };
            }
        }
    }

    /// Values `j0..j0 + len` of the (at most [`ROWS`]) rows of `block`, `k` values each,
    /// interleaved: `out[j·ROWS + r] = block[r][j0 + j]`, zero for rows past the block's.
    ///
    /// Safety: AVX-512F; `block` holds its rows of `k ≥ j0 + len` values; `out` points at
    /// `len · ROWS` writable values.
    #[target_feature(enable = "avx512f")]
    unsafe fn interleave(block: &[f32], k: usize, j0: usize, len: usize, out: *mut f32) {
        let rows = block.len() / k.max(1);
        let first_rows = (1u16 << ROWS) - 1;
        for jj in (0..len).step_by(16) {
            let count = 16.min(len - jj);
            let mask = ((1u32 << count) - 1) as __mmask16;
            // 16 rows × 16 values, zero for rows past the block's (an array of constant
            // indices, so that it stays in registers).
            let values: [__m512; 16] = std::array::from_fn(|r| {
                let (row, lanes) = if r < rows { (r, mask) } else { (0, 0) };
                // SAFETY: row `row` < rows holds values j0 + jj..j0 + jj + count ≤ k;
                // a load with no lanes reads nothing.
                unsafe { _mm512_maskz_loadu_ps(lanes, block.as_ptr().add(row * k + j0 + jj)) }
            });
            // The same values of the next slice are fetched meanwhile (into L2), so that
            // the weight is streamed from memory ahead of its use.
            if j0 + len + jj < k {
                for r in 0..rows {
                    let ahead = block.as_ptr().wrapping_add(r * k + j0 + len + jj);
                    _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                }
            }
            let columns = transpose16(values);
            for (j, v) in columns.iter().enumerate().take(count) {
                // SAFETY: (jj + j + 1)·ROWS ≤ len·ROWS values of `out`.
                unsafe { _mm512_mask_storeu_ps(out.add((jj + j) * ROWS), first_rows, *v) };
            }
        }
    }

    /// `sums[r][t] (+)= Σ_j w[j][r] · panel[j][t]` for an interleaved weight slice `w`
    /// (`len × ROWS`) and a panel slice (`len × 32`); `sums` is `ROWS × 32`, added to when
    /// `add`.
    ///
    /// Safety: AVX-512F; `w` points at `len · ROWS` readable values, `panel` at `32·len`,
    /// `sums` at `ROWS · 32` writable values.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile(w: *const f32, len: usize, panel: *const f32, sums: *mut f32, add: bool) {
        let (mut lo, mut hi) = ([_mm512_setzero_ps(); ROWS], [_mm512_setzero_ps(); ROWS]);
        if add {
            for r in 0..ROWS {
                // SAFETY: row r of the sums holds 32 values.
                unsafe {
                    lo[r] = _mm512_loadu_ps(sums.add(r * TOKENS));
                    hi[r] = _mm512_loadu_ps(sums.add(r * TOKENS + 16));
                }
            }
        }
        for j in 0..len {
            // SAFETY: j < len, so row j of the panel and of the weight slice exist.
            let (a, b) = unsafe {
                let at = panel.add(j * TOKENS);
                (_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16)))
            };
            for r in 0..ROWS {
                let v = _mm512_set1_ps(unsafe { *w.add(j * ROWS + r) });
                lo[r] = _mm512_fmadd_ps(v, a, lo[r]);
                hi[r] = _mm512_fmadd_ps(v, b, hi[r]);
            }
        }
        for r in 0..ROWS {
            // SAFETY: row r of the sums holds 32 values.
            unsafe {
                _mm512_storeu_ps(sums.add(r * TOKENS), lo[r]);
                _mm512_storeu_ps(sums.add(r * TOKENS + 16), hi[r]);
            }
        }
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
    fn outer_products_equal_the_product_computed_in_f64() {
        // Token counts that leave a partial panel (and an empty half of one), weight rows
        // that leave a partial block and group, a single output column (a router), a
        // single token, widths below one vector or not whole vectors, a prefill's shapes,
        // and the most rows this path takes.
        for (m, k, n) in [
            (9, 576, 576),
            (13, 37, 130),
            (1, 16, 4),
            (130, 576, 1),
            (17, 5, 7),
            (33, 1537, 13),
            (128, 576, 1536),
            (64, 1536, 25),
            (40, 64, 419),
            (256, 100, 50),
        ] {
            let (x, w) = operands(m, k, n);
            match matmul_wt(&x, m, k, &w, n) {
                Some(y) => assert_is_the_product(&x, m, k, &w, n, &y),
                // Only a CPU without AVX-512 may decline (the caller then uses gemm).
                None => assert!(!avx512(), "declined ({m}, {k}, {n}) on an AVX-512 CPU"),
            }
        }
    }

    #[test]
    fn empty_or_short_operands_are_declined() {
        let (x, w) = operands(4, 16, 13);
        assert!(matmul_wt(&[], 0, 16, &w, 13).is_none());
        assert!(matmul_wt(&x, 4, 0, &w, 13).is_none());
        assert!(matmul_wt(&x[..63], 4, 16, &w, 13).is_none());
        assert!(matmul_wt(&x, 4, 16, &w[..207], 13).is_none());
    }
}
