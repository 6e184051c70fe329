//! `x · wᵀ` for a few rows of f32 `x` against a weight stored as GGML blocks (Q4_1 or
//! Q8_0): the decode step of a quantized GGUF file.
//!
//! A decode step is bound by reading the weight, not by arithmetic. candle has no
//! vectorised Q4_1 kernel (its Q4_1 products run at a tenth of its Q4_0 ones here), and
//! its quantized kernels run on a thread pool of their own that contends with rayon's on a
//! small machine. So the blocks are read once, unpacked to f32 in registers and multiplied
//! with the f32 activations directly, rows of outputs split across threads as in
//! [`gemv`](super::gemv): a fifth (Q4_1) or a quarter (Q8_0) of the f32 weight's bytes,
//! and no 8-bit quantization of the activations (which costs llama.cpp's and candle's
//! integer kernels about 0.9% of perplexity on SmolLM2).
//!
//! Block layouts (GGML's `block_q4_1` and `block_q8_0`, 32 weights each):
//! - Q4_1, 20 bytes: f16 scale `d`, f16 offset `m`, 16 bytes of 4-bit codes, element `j`
//!   in the low nibble of byte `j` and element `j + 16` in its high nibble; weight =
//!   `d · code + m`. A block's dot product with `x` is `d · Σ code·x + m · Σ x`, and
//!   `Σ x` per block is computed once per row of `x`.
//! - Q8_0, 34 bytes: f16 scale `d`, 32 signed 8-bit codes; weight = `d · code`.

/// Weights per block.
pub(crate) const BLOCK: usize = 32;

/// A block format [`gemv_blocks`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// GGML Q4_1: 20 bytes a block.
    Q4_1,
    /// GGML Q8_0: 34 bytes a block.
    Q8_0,
}

impl Format {
    /// Bytes per block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// `y = x · wᵀ`: `x` `(m, k)` row-major f32, `w` `(n, k)` as `n · k / 32` blocks of
/// `format` (row-major, `k / 32` blocks a row); returns `y` `(m, n)` row-major. `k` must be
/// a multiple of 32 and `w` hold `n · k / 32` blocks (checked by the caller).
pub(crate) fn gemv_blocks(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    format: Format,
) -> Vec<f32> {
    let block_bytes = format.block_bytes();
    debug_assert!(k.is_multiple_of(BLOCK) && w.len() >= n * k / BLOCK * block_bytes);
    let blocks = k / BLOCK;
    let row_bytes = blocks * block_bytes;
    // Σ x over each block of each row of x.
    let sums: Vec<f32> = x[..m * k]
        .chunks_exact(BLOCK)
        .map(|c| c.iter().sum())
        .collect();
    let dot = row_kernel(format);
    super::gemv::by_weight_rows(m, n, |j, outputs| {
        let row = &w[j * row_bytes..][..row_bytes];
        for (r, y) in outputs.iter_mut().enumerate() {
            *y = dot(row, &x[r * k..][..k], &sums[r * blocks..][..blocks]);
        }
    })
}

type RowDot = fn(&[u8], &[f32], &[f32]) -> f32;

/// The row kernel of `format` compiled for the widest vector instructions this CPU has
/// (chosen once per product).
fn row_kernel(format: Format) -> RowDot {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::is_x86_feature_detected!("avx512f");
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        // SAFETY (each call below): the CPU supports the features the function is compiled
        // for, checked just above.
        match (format, avx512, avx2) {
            (Format::Q4_1, true, _) => return |w, x, s| unsafe { q4_1_avx512(w, x, s) },
            (Format::Q4_1, false, true) => return |w, x, s| unsafe { q4_1_avx2(w, x, s) },
            (Format::Q8_0, true, _) => return |w, x, s| unsafe { q8_0_avx512(w, x, s) },
            (Format::Q8_0, false, true) => return |w, x, s| unsafe { q8_0_avx2(w, x, s) },
            _ => {}
        }
    }
    match format {
        Format::Q4_1 => row_q4_1,
        Format::Q8_0 => row_q8_0,
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn q4_1_avx512(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    row_q4_1(w, x, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn q4_1_avx2(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    row_q4_1(w, x, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn q8_0_avx512(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    row_q8_0(w, x, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn q8_0_avx2(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    row_q8_0(w, x, sums)
}

/// A little-endian f16 as f32. Normal numbers by moving the bits (a few integer
/// operations, where a library call per block would cost more than the block's
/// arithmetic); zeros, subnormals, infinities and NaNs through `half`.
#[inline(always)]
fn f16_to_f32(lo: u8, hi: u8) -> f32 {
    let h = u16::from_le_bytes([lo, hi]) as u32;
    let exponent = h & 0x7c00;
    if exponent == 0 || exponent == 0x7c00 {
        return half::f16::from_bits(h as u16).to_f32();
    }
    // Sign to bit 31; exponent and mantissa up by 13 bits, exponent re-biased 15 -> 127.
    f32::from_bits(((h & 0x8000) << 16) | (((h & 0x7fff) << 13) + ((127 - 15) << 23)))
}

/// One output from a Q8_0 row: Σ_b d_b · Σ code·x (the block sums of x are not needed).
#[inline(always)]
fn row_q8_0(w: &[u8], x: &[f32], _sums: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (block, xb) in w.chunks_exact(34).zip(x.chunks_exact(BLOCK)) {
        let d = f16_to_f32(block[0], block[1]);
        let qs: &[u8; BLOCK] = block[2..34].try_into().unwrap_or(&[0; BLOCK]);
        let (lo, hi) = xb.split_at(16);
        for j in 0..16 {
            acc[j] += d * (qs[j] as i8 as f32 * lo[j] + qs[j + 16] as i8 as f32 * hi[j]);
        }
    }
    tree_sum(acc)
}

/// One output: the Q4_1 row `w` (whole blocks) times `x`, with `sums[b]` = Σ x over block
/// `b`. Written as fixed-width lanes so that it vectorises at the caller's width.
#[inline(always)]
fn row_q4_1(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    // Sixteen partial sums carried across blocks (one horizontal sum per row, not per
    // block); the offsets' share, m · Σ x, is scalar.
    let mut acc = [0f32; 16];
    let mut offsets = 0f32;
    for ((block, xb), &sum) in w.chunks_exact(20).zip(x.chunks_exact(BLOCK)).zip(sums) {
        let d = f16_to_f32(block[0], block[1]);
        let m = f16_to_f32(block[2], block[3]);
        let qs: &[u8; 16] = block[4..20].try_into().unwrap_or(&[0; 16]);
        let (lo, hi) = xb.split_at(16);
        for j in 0..16 {
            let codes = (qs[j] & 0x0f) as f32 * lo[j] + (qs[j] >> 4) as f32 * hi[j];
            acc[j] += d * codes;
        }
        offsets += m * sum;
    }
    tree_sum(acc) + offsets
}

/// The sum of 16 lanes by halving (four vector adds), not a chain of 15 scalar adds: a
/// row of SmolLM2 is only 18 blocks long, so a serial sum per row costs as much as a
/// fifth of the row's arithmetic.
#[inline(always)]
fn tree_sum(mut v: [f32; 16]) -> f32 {
    for width in [8, 4, 2, 1] {
        for i in 0..width {
            v[i] += v[i + width];
        }
    }
    v[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs `codes` (32 per block, 0..=15) as Q4_1 with scale `d` and offset `m`.
    fn pack_q4_1(codes: &[u8], d: f32, m: f32) -> Vec<u8> {
        let mut out = Vec::new();
        for block in codes.chunks(BLOCK) {
            out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&half::f16::from_f32(m).to_le_bytes());
            for j in 0..16 {
                out.push(block[j] | (block[j + 16] << 4));
            }
        }
        out
    }

    /// Packs `codes` (32 per block) as Q8_0 with scale `d`.
    fn pack_q8_0(codes: &[i8], d: f32) -> Vec<u8> {
        let mut out = Vec::new();
        for block in codes.chunks(BLOCK) {
            out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
            out.extend(block.iter().map(|&c| c as u8));
        }
        out
    }

    #[test]
    fn f16_conversion_equals_half_for_every_value() {
        for bits in 0..=u16::MAX {
            let [lo, hi] = bits.to_le_bytes();
            let want = half::f16::from_bits(bits).to_f32();
            let got = f16_to_f32(lo, hi);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{bits:#06x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn block_gemv_equals_the_product_with_the_dequantized_weight() {
        let (d, off) = (0.125, -0.75);
        for (m, k, n) in [(1, 32, 1), (1, 576, 130), (3, 64, 65), (8, 96, 7)] {
            let codes: Vec<u8> = (0..n * k).map(|i| ((i * 7 + i / 5) % 16) as u8).collect();
            let signed: Vec<i8> = (0..n * k).map(|i| ((i * 37) % 255) as u8 as i8).collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 5 % 13) as f32 - 6.0) / 7.0)
                .collect();
            let cases = [
                (Format::Q4_1, pack_q4_1(&codes, d, off)),
                (Format::Q8_0, pack_q8_0(&signed, d)),
            ];
            for (format, w) in cases {
                let weight = |j: usize, i: usize| match format {
                    Format::Q4_1 => d as f64 * codes[j * k + i] as f64 + off as f64,
                    Format::Q8_0 => d as f64 * signed[j * k + i] as f64,
                };
                let y = gemv_blocks(&x, m, k, &w, n, format);
                for r in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * weight(j, i)).sum();
                        let got = y[r * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{format:?} ({m}, {k}, {n}) row {r} output {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
