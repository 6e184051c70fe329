//! The packed bf16 operands multiplied with AVX512-BF16 dot products (`vdpbf16ps`), for
//! CPUs without AMX tiles (AMD Zen 4 and later, Intel Cooper Lake).
//!
//! The right operand's tiles are already what `vdpbf16ps` takes: row `i` of a tile holds,
//! for each of 16 output columns, the pair of reduction values `2i` and `2i + 1`. A
//! left-operand row's pair for the same `i` is one 32-bit value, broadcast to every lane,
//! so that one instruction adds both products of the pair to 16 columns of that row. A
//! register block is 8 rows × 32 columns (16 accumulators), fed per pair by two loads of
//! the right operand and 8 broadcasts of the left; the order of the blocks
//! (`for_each_block`) and the split of the output's columns across threads are the AMX
//! kernel's.

use super::{TILE_K, TILE_LEN, TILE_ROWS};
use std::arch::x86_64::*;

/// Rows of one register block: two per tile of the left operand.
const GROUP: usize = 8;

/// The `32 × 32` blocks of output columns `32·columns` and every row block, as the AMX
/// kernel `tiles::blocks` computes them (same operands, same order, same output).
///
/// Safety: AVX-512F and AVX512-BF16; `a` holds `mp / 16` panels and `b` `np / 16` panels
/// of `steps` tiles; `c` points at `mp × np` writable f32 whose blocks in `columns` no
/// other thread writes meanwhile.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn blocks(
    a: &[u16],
    b: &[u16],
    mp: usize,
    steps: usize,
    columns: std::ops::Range<usize>,
    c: *mut f32,
    np: usize,
) {
    super::for_each_block(mp, steps, columns, |super::Block { s0, chunk, rb, cb }| {
        let b0 = &b[(2 * cb * steps + s0) * TILE_LEN..][..chunk * TILE_LEN];
        let b1 = &b[((2 * cb + 1) * steps + s0) * TILE_LEN..][..chunk * TILE_LEN];
        for group in 0..32 / GROUP {
            let panel = 2 * rb + group * GROUP / TILE_ROWS;
            let first_row = (group * GROUP) % TILE_ROWS;
            let a0 = &a[(panel * steps + s0) * TILE_LEN..][..chunk * TILE_LEN];
            // SAFETY: rows 32·rb + 8·group.. of the block lie inside the mp × np output;
            // its 32 columns at 32·cb inside its np.
            let out = unsafe { c.add((rb * 32 + group * GROUP) * np + cb * 32) };
            // SAFETY: the caller's CPU features; `out` as above.
            unsafe { group_block(a0, first_row, b0, b1, chunk, out, np, s0 == 0) };
        }
    });
}

/// Rows `first_row..first_row + 8` of the left tiles `a` times the right tiles `b0` and
/// `b1` (columns 0..16 and 16..32), over `chunk` steps: stored at `out` (row stride
/// `np`) when `first`, else added to what is there.
///
/// Safety: AVX-512F and AVX512-BF16; `a`, `b0` and `b1` hold `chunk` tiles; `out` points
/// at 8 rows of 32 writable f32, `np` apart.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn group_block(
    a: &[u16],
    first_row: usize,
    b0: &[u16],
    b1: &[u16],
    chunk: usize,
    out: *mut f32,
    np: usize,
    first: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; GROUP];
    for step in 0..chunk {
        let (a, b0, b1) = (
            &a[step * TILE_LEN + first_row * TILE_K..][..GROUP * TILE_K],
            &b0[step * TILE_LEN..][..TILE_LEN],
            &b1[step * TILE_LEN..][..TILE_LEN],
        );
        for pair in 0..TILE_ROWS {
            // SAFETY: each tile row is 32 u16 (64 bytes) inside the slices above.
            let (w0, w1) = unsafe {
                (
                    as_bf16(_mm512_loadu_si512(b0[pair * TILE_K..].as_ptr().cast())),
                    as_bf16(_mm512_loadu_si512(b1[pair * TILE_K..].as_ptr().cast())),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = r * TILE_K + 2 * pair;
                let x = (a[at] as u32 | (a[at + 1] as u32) << 16) as i32;
                let x = as_bf16(_mm512_set1_epi32(x));
                acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: row r of the block: 32 writable f32 at out + r·np (the caller's promise).
        unsafe {
            let row = out.add(r * np);
            let (lo, hi) = match first {
                true => (acc[0], acc[1]),
                false => (
                    _mm512_add_ps(_mm512_loadu_ps(row), acc[0]),
                    _mm512_add_ps(_mm512_loadu_ps(row.add(16)), acc[1]),
                ),
            };
            _mm512_storeu_ps(row, lo);
            _mm512_storeu_ps(row.add(16), hi);
        }
    }
}

/// 32 bf16 values, as the dot product takes them.
#[inline]
#[target_feature(enable = "avx512f")]
fn as_bf16(v: __m512i) -> __m512bh {
    // SAFETY: both are 512 bits of plain integers.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}
