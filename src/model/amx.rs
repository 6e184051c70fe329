//! f32 matrix products on Intel AMX tiles: operands rounded to bf16, products summed in
//! f32 (mixed precision, what PyTorch runs for an f32 model's products after
//! `torch.set_float32_matmul_precision("medium")`, and oneDNN's bf16 path on such a CPU).
//!
//! An AMX unit multiplies a `16 × 32` bf16 tile by a `32 × 16` one into a `16 × 16` f32
//! tile in one instruction (`tdpbf16ps`): about 1 000 multiply-adds a cycle a core, where
//! AVX-512 does 32 in f32. Measured on this project's 2-core Xeon with PyTorch 2.15 (the
//! same CPU features): a `1024 × 576 · 576 × 1536` product at 2 640 GFLOP/s in bf16
//! against 325 in f32.
//!
//! Each operand is rounded and packed into tiles once per product (zero-padded to
//! multiples of 32 rows and 32 values of the reduction), then every `32 × 32` block of
//! the output is four accumulator tiles fed by two tiles of each operand per step of 32
//! along the reduction. The reduction runs in chunks of 32 steps, and the rows in chunks
//! of 1 MiB of packed tiles, so that a chunk of packed operands stays in the L2
//! cache while it is reused. The output's blocks are split by columns across the
//! threads of the awake pool.
//!
//! On a CPU without AMX but with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake),
//! the same packed tiles are multiplied with `vdpbf16ps` dot products instead
//! ([`Bf16Kernel::Avx512Dot`], in `amx/dot.rs`): twice the multiply-adds of an f32 FMA.
//!
//! Used where [`set_f32_matmul_precision`] or a [`precision_scope`] (a training step's,
//! from `TrainConfig::matmul_precision`) asked for [`MatmulPrecision::Bf16`] and the CPU
//! has one of the two kernels ([`bf16_kernel`]); everywhere else products stay f32.
//!
//! Measured: training steps 1.41-1.58× faster and prefill 1.3-2.0× on a 2-core Xeon with
//! AMX (session 12); training steps 1.28-1.88× and prefill 1.3-1.9× on a 2-core AMD EPYC
//! (Zen 4) with the dot products (session 13). A conversion's model at equal steps is a
//! little worse than with f32 products (worst held-out perplexity ratio +0.02 / +0.06 /
//! +0.03, mean +0.04 / +0.05 / +0.04 over three runs), so `convert` keeps f32 unless
//! `--matmul bf16`.

use std::sync::atomic::{AtomicU8, Ordering};

/// Precision of f32 matrix products on the CPU (PyTorch's `torch.set_float32_matmul_precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatmulPrecision {
    /// f32 products (the default).
    #[default]
    Highest,
    /// Operands rounded to bf16 (round to nearest, ties to even; values below about
    /// 1.2e-38 count as zero, as AMX takes them), products summed in f32 (partial sums and
    /// results below about 1.2e-38 flushed to zero, as both kernels' instructions do, per
    /// chunk of 1 024 reduction values), on AMX tiles
    /// or AVX512-BF16 dot products where the CPU has them ([`bf16_kernel`]); f32
    /// elsewhere. Forward products of at most 8 rows (decode steps, bound by reading the
    /// weight) stay f32.
    Bf16,
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the precision of the f32 matrix products of the crate's linear layers and their
/// gradients on the CPU, for the whole process (as PyTorch's
/// `torch.set_float32_matmul_precision`). Attention, norms, losses and optimizer state
/// stay f32 whatever the setting.
pub fn set_f32_matmul_precision(precision: MatmulPrecision) {
    PRECISION.store(precision as u8, Ordering::Relaxed);
}

/// The precision of this thread's products: the innermost [`precision_scope`]'s, else
/// the one [`set_f32_matmul_precision`] set ([`MatmulPrecision::Highest`] unless set).
pub fn f32_matmul_precision() -> MatmulPrecision {
    SCOPED
        .get()
        .unwrap_or(match PRECISION.load(Ordering::Relaxed) {
            0 => MatmulPrecision::Highest,
            _ => MatmulPrecision::Bf16,
        })
}

thread_local! {
    static SCOPED: std::cell::Cell<Option<MatmulPrecision>> = const { std::cell::Cell::new(None) };
}

/// Runs this thread's products at `precision` until the returned guard is dropped (the
/// enclosing scope's precision comes back), whatever the process-wide setting: how a
/// training step runs its products in bf16 while evaluation stays f32, like PyTorch's
/// `torch.autocast`. A product's decision is taken on the thread that calls it (candle
/// runs a backward pass on the thread that calls `backward`).
pub fn precision_scope(precision: MatmulPrecision) -> PrecisionScope {
    PrecisionScope {
        outer: SCOPED.replace(Some(precision)),
        _same_thread: std::marker::PhantomData,
    }
}

/// The guard of [`precision_scope`]; it stays on its thread. Guards restore what they
/// replaced, so nested guards must be dropped innermost first (as scopes drop them).
#[must_use = "the precision holds while the guard lives"]
pub struct PrecisionScope {
    outer: Option<MatmulPrecision>,
    _same_thread: std::marker::PhantomData<*const ()>,
}

impl Drop for PrecisionScope {
    fn drop(&mut self) {
        SCOPED.set(self.outer);
    }
}

/// Whether this CPU has AMX tiles with bf16 products and the OS lets this process use
/// them (Linux, x86-64; the permission is requested once, at the first call).
pub fn amx_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(request_amx)
}

/// The kernel that multiplies the packed bf16 operands on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`tdpbf16ps`, Intel Sapphire Rapids and later): about 1 000
    /// multiply-adds a cycle a core.
    AmxTiles,
    /// AVX512-BF16 dot products (`vdpbf16ps`, AMD Zen 4 and later, Intel Cooper Lake):
    /// 32 multiply-adds an instruction, twice what an f32 FMA does.
    Avx512Dot,
}

/// The kernel that runs products asked for in [`MatmulPrecision::Bf16`] on this CPU:
/// AMX tiles where [`amx_available`], else AVX512-BF16 dot products where the CPU has
/// AVX512-F, -BW and -BF16; `None` elsewhere (those products stay f32).
pub fn bf16_kernel() -> Option<Bf16Kernel> {
    static KERNEL: std::sync::OnceLock<Option<Bf16Kernel>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| match amx_available() {
        true => Some(Bf16Kernel::AmxTiles),
        false => avx512_bf16_available().then_some(Bf16Kernel::Avx512Dot),
    })
}

/// Whether products run in bf16 now: bf16 precision asked for and a [`bf16_kernel`].
pub(crate) fn enabled() -> bool {
    f32_matmul_precision() == MatmulPrecision::Bf16 && bf16_kernel().is_some()
}

/// AVX-512 with bf16 conversions and dot products, and 16-bit permutes: what the packing
/// and the dot-product kernel need.
#[cfg(target_arch = "x86_64")]
fn avx512_bf16_available() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_bf16_available() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_amx() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE. The packing uses AVX-512's
    // bf16 conversions and 16-bit permutes (every AMX CPU so far has them).
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if (leaf.edx >> 22) & 1 == 0 || (leaf.edx >> 24) & 1 == 0 || !avx512_bf16_available() {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only asks the kernel for permission to
    // use the tile data state; it reads and writes no memory of ours.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    granted == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_amx() -> bool {
    false
}

/// A 2-D f32 operand in place: element `(r, c)` at `data[offset + r·row_stride + c·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// The view of a 2-D candle layout over `data`; `None` for another rank.
    pub fn of_layout(data: &'a [f32], layout: &candle_core::Layout) -> Option<Self> {
        let (&[rows, cols], &[row_stride, col_stride]) = (layout.dims(), layout.stride()) else {
            return None;
        };
        Some(Self {
            data,
            offset: layout.start_offset(),
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// The same values seen transposed, `(cols, rows)`.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last =
            self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        last < self.data.len()
    }

    #[inline]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[self.offset + r * self.row_stride + c * self.col_stride]
    }
}

/// `f32 → bf16` bits as the packing's AVX-512 conversion (`vcvtne2ps2bf16`) gives them:
/// rounded to nearest with ties to even, a subnormal to a zero of its sign, a NaN to a
/// quiet NaN. The packing's scalar path (operands with no unit stride) uses it, so that
/// a product does not depend on its operands' layout.
#[inline]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    if x.is_subnormal() {
        return ((x.to_bits() >> 16) & 0x8000) as u16;
    }
    half::bf16::from_f32(x).to_bits()
}

/// Rows of one tile.
const TILE_ROWS: usize = 16;
/// Reduction values in a row of a left-operand tile (64 bytes of bf16).
const TILE_K: usize = 32;
/// u16 values in one tile (16 rows of 64 bytes).
const TILE_LEN: usize = TILE_ROWS * TILE_K;
/// Steps of 32 along the reduction per chunk: a block's two tiles of each operand for a
/// chunk are 64 KiB.
const K_CHUNK: usize = 32;
/// Bytes of packed rows per chunk of rows: a chunk's rows for a reduction chunk stay in
/// the L2 cache while every column block of a thread passes over them, so that the
/// other operand is read from memory once per chunk of rows (once in all for a product
/// of a few hundred rows, such as a loss chunk's with a 49 k vocabulary).
const ROW_CHUNK_BYTES: usize = 1 << 20;

/// `a · b` in bf16 with f32 sums: `a` `(m, k)`, `b` `(k, n)`, any strides; returns
/// `(m, n)` row-major, or `None` where the CPU has no [`bf16_kernel`], a dimension is 0,
/// the inner dimensions differ, or a view reaches past its data. Callers check
/// [`enabled`] (the precision asked for) first.
pub(crate) fn matmul(a: View, b: View) -> Option<Vec<f32>> {
    matmul_with(bf16_kernel()?, a, b)
}

/// [`matmul`] on a given kernel (the caller checked that the CPU has it).
fn matmul_with(kernel: Bf16Kernel, a: View, b: View) -> Option<Vec<f32>> {
    if a.cols != b.rows || !a.in_bounds() || !b.in_bounds() {
        return None;
    }
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || k == 0 || n == 0 {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(tiles::product(kernel, a, b.t(), m, k, n))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kernel;
        None
    }
}

/// One visit of a `32 × 32` output block: reduction steps `s0..s0 + chunk` of row block
/// `rb` (rows `32·rb..`) and column block `cb` (columns `32·cb..`).
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    s0: usize,
    chunk: usize,
    rb: usize,
    cb: usize,
}

/// The order in which both kernels visit the blocks of `columns` (column blocks) for
/// `mp` rows and `steps` steps: chunks of [`K_CHUNK`] steps outermost (a block's sums are
/// stored after its first chunk and added to after the others), then chunks of row
/// blocks whose packed tiles for the chunk fit [`ROW_CHUNK_BYTES`], then every column
/// block, then the chunk's row blocks: the chunk's rows stay in the L2 cache while the
/// other operand streams past them.
#[cfg(target_arch = "x86_64")]
fn for_each_block(
    mp: usize,
    steps: usize,
    columns: std::ops::Range<usize>,
    mut visit: impl FnMut(Block),
) {
    let row_blocks = mp / 32;
    for s0 in (0..steps).step_by(K_CHUNK) {
        let chunk = K_CHUNK.min(steps - s0);
        let row_chunk = (ROW_CHUNK_BYTES / (2 * TILE_LEN * 2 * chunk)).max(1);
        for r0 in (0..row_blocks).step_by(row_chunk) {
            for cb in columns.clone() {
                for rb in r0..(r0 + row_chunk).min(row_blocks) {
                    visit(Block { s0, chunk, rb, cb });
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod dot;

#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::{bf16_bits, Bf16Kernel, View, TILE_K, TILE_LEN, TILE_ROWS};
    use crate::model::awake_pool::{for_each_range, Next};
    use crate::model::outer_product::avx512::transpose16;
    use crate::model::outer_product::Output;
    use std::arch::asm;
    use std::arch::x86_64::*;

    thread_local! {
        /// The calling thread's packed operands, kept between products: a training step's
        /// products would otherwise map (and fault in) fresh pages for each, tens of MB
        /// for a loss chunk's `lm_head`.
        static PACKED: std::cell::Cell<(Vec<u16>, Vec<u16>)> =
            const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    }

    /// `a · btᵀ` for `a` `(m, k)` and `bt` `(n, k)`.
    pub(super) fn product(
        kernel: Bf16Kernel,
        a: View,
        bt: View,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        let (mp, np, steps) = (m.div_ceil(32) * 32, n.div_ceil(32) * 32, k.div_ceil(TILE_K));
        let (mut a_tiles, mut b_tiles) = PACKED.take();
        pack_rows(a, mp, steps, &mut a_tiles);
        pack_pairs(bt, np, steps, &mut b_tiles);
        let mut c = Vec::<f32>::with_capacity(mp * np);
        let out = Output(c.as_mut_ptr());
        for_each_range(np / 32, 1, 1, Next::Later, |columns| {
            let out = &out;
            // SAFETY: the CPU has the kernel (checked by `matmul`); the packed operands
            // hold mp / 16 and np / 16 panels of `steps` tiles; `c` has room for mp × np
            // values, and the blocks of these columns are written by this part only.
            unsafe {
                match kernel {
                    Bf16Kernel::AmxTiles => {
                        blocks(&a_tiles, &b_tiles, mp, steps, columns, out.0, np)
                    }
                    Bf16Kernel::Avx512Dot => {
                        super::dot::blocks(&a_tiles, &b_tiles, mp, steps, columns, out.0, np)
                    }
                }
            };
        });
        // SAFETY: every block of the padded output was written (each column block by one
        // part, for every row block).
        unsafe { c.set_len(mp * np) };
        PACKED.set((a_tiles, b_tiles));
        // Padding rows are last: drop them; padding columns: move each row left, in place
        // (a row's new place never lies after its old one).
        if np != n {
            for row in 1..m {
                c.copy_within(row * np..row * np + n, row * n);
            }
        }
        c.truncate(m * n);
        c
    }

    /// The rows of `a` `(m, k)` as tiles: panel `p` (rows `16p..16p + 16`), step `s`
    /// (values `32s..32s + 32`) at `(p·steps + s)·512`, row-major `16 × 32`; zero past
    /// the last row and value.
    fn pack_rows(a: View, mp: usize, steps: usize, tiles: &mut Vec<u16>) {
        // SAFETY: AVX-512 with bf16 conversions (every AMX CPU has them).
        pack(mp / TILE_ROWS, steps, tiles, |p, s, tile| unsafe {
            row_tile(a, p, s, tile)
        })
    }

    /// Tile `(p, s)` of [`pack_rows`].
    ///
    /// Safety: AVX-512F, AVX512-BW and AVX512-BF16; `tile` holds 512 values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn row_tile(a: View, p: usize, s: usize, tile: &mut [u16]) {
        let (r0, c0) = (p * TILE_ROWS, s * TILE_K);
        let rows = a.rows.saturating_sub(r0).min(TILE_ROWS);
        let cols = a.cols.saturating_sub(c0).min(TILE_K);
        // SAFETY: the helpers' loads stay inside the view's rows and columns, which lie
        // inside its data; the stores inside the tile.
        unsafe {
            if a.col_stride == 1 {
                for r in 0..TILE_ROWS {
                    let row = match r < rows {
                        true => row_values(a, r0 + r, c0, cols),
                        false => _mm512_setzero_si512(),
                    };
                    _mm512_storeu_si512(tile[r * TILE_K..].as_mut_ptr().cast(), row);
                }
            } else if a.row_stride == 1 {
                // Columns are contiguous: pairs of columns side by side, transposed.
                let pairs: [__m512; 16] = std::array::from_fn(|i| {
                    _mm512_castsi512_ps(column_pair(a, r0, rows, c0 + 2 * i))
                });
                for (r, row) in transpose16(pairs).iter().enumerate() {
                    _mm512_storeu_ps(tile[r * TILE_K..].as_mut_ptr().cast(), *row);
                }
            } else {
                for r in 0..TILE_ROWS {
                    for c in 0..TILE_K {
                        tile[r * TILE_K + c] = match r < rows && c < cols {
                            true => bf16_bits(a.at(r0 + r, c0 + c)),
                            false => 0,
                        };
                    }
                }
            }
        }
    }

    /// The rows of `bt` `(n, k)` as the right operand's tiles (pairs of reduction values
    /// side by side, AMX's VNNI layout): panel `q` (rows `16q..16q + 16` of `bt`, columns
    /// of the product), step `s` at `(q·steps + s)·512`, where tile row `i` holds
    /// `bt[16q + j][32s + 2i + e]` at `32i + 2j + e`; zero past the last row and value.
    fn pack_pairs(bt: View, np: usize, steps: usize, tiles: &mut Vec<u16>) {
        // SAFETY: as in `pack_rows`.
        pack(np / TILE_ROWS, steps, tiles, |q, s, tile| unsafe {
            pair_tile(bt, q, s, tile)
        })
    }

    /// Tile `(q, s)` of [`pack_pairs`].
    ///
    /// Safety: AVX-512F, AVX512-BW and AVX512-BF16; `tile` holds 512 values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pair_tile(bt: View, q: usize, s: usize, tile: &mut [u16]) {
        let (j0, c0) = (q * TILE_ROWS, s * TILE_K);
        let rows = bt.rows.saturating_sub(j0).min(TILE_ROWS);
        let cols = bt.cols.saturating_sub(c0).min(TILE_K);
        // SAFETY: as in `row_tile`.
        unsafe {
            if bt.col_stride == 1 {
                // Rows are contiguous: each row's 16 pairs, transposed.
                let rows_of_pairs: [__m512; 16] = std::array::from_fn(|j| match j < rows {
                    true => _mm512_castsi512_ps(row_values(bt, j0 + j, c0, cols)),
                    false => _mm512_setzero_ps(),
                });
                for (i, row) in transpose16(rows_of_pairs).iter().enumerate() {
                    _mm512_storeu_ps(tile[i * TILE_K..].as_mut_ptr().cast(), *row);
                }
            } else if bt.row_stride == 1 {
                // Columns are contiguous: tile row i is columns 2i and 2i + 1 side by side.
                for i in 0..TILE_ROWS {
                    let row = column_pair(bt, j0, rows, c0 + 2 * i);
                    _mm512_storeu_si512(tile[i * TILE_K..].as_mut_ptr().cast(), row);
                }
            } else {
                for i in 0..TILE_ROWS {
                    for j in 0..TILE_ROWS {
                        for e in 0..2 {
                            let c = 2 * i + e;
                            tile[i * TILE_K + 2 * j + e] = match j < rows && c < cols {
                                true => bf16_bits(bt.at(j0 + j, c0 + c)),
                                false => 0,
                            };
                        }
                    }
                }
            }
        }
    }

    /// Values `c0..c0 + count` (count ≤ 32) of row `r` of a view whose rows are
    /// contiguous, as 32 bf16 (zero past `count`).
    ///
    /// Safety: AVX-512F and AVX512-BF16; row `r` exists and holds those values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn row_values(v: View, r: usize, c0: usize, count: usize) -> __m512i {
        // SAFETY: the caller's promise.
        unsafe { to_bf16(v.data, v.offset + r * v.row_stride + c0, count) }
    }

    /// Rows `r0..r0 + rows` (rows ≤ 16) of columns `c` and `c + 1` of a view whose columns
    /// are contiguous, as bf16 pairs side by side (a column past the view's is zero).
    ///
    /// Safety: AVX-512F, AVX512-BW and AVX512-BF16; those rows exist.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn column_pair(v: View, r0: usize, rows: usize, c: usize) -> __m512i {
        let column = |c: usize| match c < v.cols {
            // SAFETY: rows r0..r0 + rows of column c lie inside the view's data.
            true => unsafe {
                load(
                    v.data,
                    v.offset + r0 * v.row_stride + c * v.col_stride,
                    rows,
                )
            },
            false => _mm512_setzero_ps(),
        };
        side_by_side(column(c), column(c + 1))
    }

    /// `panels × steps` tiles at the start of `tiles` (grown if shorter), filled by
    /// `fill(panel, step, tile)`, which writes every value of its tile; the panels are
    /// split across the awake pool's threads.
    fn pack(
        panels: usize,
        steps: usize,
        tiles: &mut Vec<u16>,
        fill: impl Fn(usize, usize, &mut [u16]) + Sync,
    ) {
        let len = panels * steps * TILE_LEN;
        // Grown (zeroed) once and then reused: `fill` overwrites every value of `..len`.
        if tiles.len() < len {
            tiles.resize(len, 0);
        }
        let out = Output(tiles.as_mut_ptr().cast());
        for_each_range(panels, 1, 1, Next::Later, |range| {
            let out = &out;
            for p in range {
                for s in 0..steps {
                    // SAFETY: tile (p, s) lies inside the first `len` (initialised)
                    // values of `tiles`, and panel p is filled by this part only.
                    let tile = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.0.cast::<u16>().add((p * steps + s) * TILE_LEN),
                            TILE_LEN,
                        )
                    };
                    fill(p, s, tile);
                }
            }
        });
    }

    /// `count` (≤ 16) f32 from `data[start..]`, zero in the other lanes.
    ///
    /// Safety: AVX-512F; `data[start..start + count]` exists.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(data: &[f32], start: usize, count: usize) -> __m512 {
        let lanes = ((1u32 << count.min(16)) - 1) as __mmask16;
        // SAFETY: the lanes read lie in `data` (the caller's promise); no lane, no read.
        unsafe { _mm512_maskz_loadu_ps(lanes, data.as_ptr().wrapping_add(start)) }
    }

    /// `count` (≤ 32) f32 from `data[start..]` as 32 bf16, zero past `count`.
    ///
    /// Safety: AVX-512F and AVX512-BF16; `data[start..start + count]` exists.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn to_bf16(data: &[f32], start: usize, count: usize) -> __m512i {
        // SAFETY: as `load`'s.
        let (lo, hi) = unsafe {
            (
                load(data, start, count.min(16)),
                load(data, start + 16, count.saturating_sub(16)),
            )
        };
        // The second operand gives the low half. SAFETY: both are 512 bits of plain
        // integers.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
    }

    /// `even` and `odd` (16 f32 each) as bf16 pairs: lane `j` holds `(even[j], odd[j])`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    fn side_by_side(even: __m512, odd: __m512) -> __m512i {
        // bf16 values even0..even15, odd0..odd15, then interleaved.
        // SAFETY: both are 512 bits of plain integers.
        let halves =
            unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(odd, even)) };
        let order = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        _mm512_permutexvar_epi16(order, halves)
    }

    /// Palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const CONFIG: TileConfig = {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        let mut t = 0;
        while t < 8 {
            bytes[16 + 2 * t] = 64;
            bytes[48 + t] = TILE_ROWS as u8;
            t += 1;
        }
        TileConfig(bytes)
    };

    /// The `32 × 32` blocks of output columns `32·columns` and every row block: tiles
    /// `tmm0..tmm3` accumulate a block, `tmm4`/`tmm5` hold its two row panels' tiles of a
    /// step, `tmm6`/`tmm7` its two column panels'.
    ///
    /// Safety: AMX-BF16 usable by this process; `a` holds `mp / 16` panels and `b`
    /// `np / 16` panels of `steps` tiles; `c` points at `mp × np` writable f32 whose
    /// blocks in `columns` no other thread writes meanwhile.
    unsafe fn blocks(
        a: &[u16],
        b: &[u16],
        mp: usize,
        steps: usize,
        columns: std::ops::Range<usize>,
        c: *mut f32,
        np: usize,
    ) {
        let row_stride = 64usize;
        let c_stride = np * 4;
        // SAFETY: CONFIG is a valid palette-1 configuration, 64-byte aligned.
        unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack)) };
        super::for_each_block(mp, steps, columns, |super::Block { s0, chunk, rb, cb }| {
            let b0 = b[(2 * cb * steps + s0) * TILE_LEN..].as_ptr();
            let b1 = b[((2 * cb + 1) * steps + s0) * TILE_LEN..].as_ptr();
            let a0 = a[(2 * rb * steps + s0) * TILE_LEN..].as_ptr();
            let a1 = a[((2 * rb + 1) * steps + s0) * TILE_LEN..].as_ptr();
            // SAFETY: block (rb, cb) lies inside the mp × np output.
            let out = unsafe { c.add(rb * 32 * np + cb * 32) };
            let lower = unsafe { out.add(TILE_ROWS * np) };
            // SAFETY: the four accumulator tiles are rows of 64 bytes at
            // `out`, `out + 16`, `lower`, `lower + 16`, c_stride apart.
            unsafe {
                if s0 == 0 {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack)
                    );
                } else {
                    asm!(
                        "tileloadd tmm0, [{o} + {s}]",
                        "tileloadd tmm1, [{o} + {s} + 64]",
                        "tileloadd tmm2, [{l} + {s}]",
                        "tileloadd tmm3, [{l} + {s} + 64]",
                        o = in(reg) out, l = in(reg) lower, s = in(reg) c_stride,
                        options(nostack, readonly)
                    );
                }
            }
            for step in 0..chunk {
                let at = step * TILE_LEN;
                // SAFETY: each operand tile is 16 rows of 64 bytes, contiguous.
                unsafe {
                    asm!(
                        "tileloadd tmm4, [{a0} + {s}]",
                        "tileloadd tmm5, [{a1} + {s}]",
                        "tileloadd tmm6, [{b0} + {s}]",
                        "tileloadd tmm7, [{b1} + {s}]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(at), a1 = in(reg) a1.add(at),
                        b0 = in(reg) b0.add(at), b1 = in(reg) b1.add(at),
                        s = in(reg) row_stride,
                        options(nostack, readonly)
                    );
                }
            }
            // SAFETY: as for the loads above.
            unsafe {
                asm!(
                    "tilestored [{o} + {s}], tmm0",
                    "tilestored [{o} + {s} + 64], tmm1",
                    "tilestored [{l} + {s}], tmm2",
                    "tilestored [{l} + {s} + 64], tmm3",
                    o = in(reg) out, l = in(reg) lower, s = in(reg) c_stride,
                    options(nostack)
                );
            }
        });
        // Hands the tile state back, so that a context switch saves no tiles.
        unsafe { asm!("tilerelease", options(nostack)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_value(x: f32) -> f64 {
        f32::from_bits((bf16_bits(x) as u32) << 16) as f64
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_with_ties_to_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(-2.0), 0xc000);
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: to the even one, 1.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶: up.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(1.0 + 1.5 / 256.0), 0x3f81);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80);
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
        // The largest subnormal would round up to the smallest normal; the hardware
        // conversion takes it as zero.
        assert_eq!(bf16_bits(f32::from_bits(0x007f_ffff)), 0x0000);
        assert_eq!(bf16_bits(-f32::from_bits(0x007f_ffff)), 0x8000);
        assert_eq!(bf16_bits(f32::MIN_POSITIVE), 0x0080);
    }

    /// Values with a spread of magnitudes and signs, from a fixed sequence.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn products_equal_the_bf16_rounded_operands_product_in_f64() {
        let shapes = [
            (1, 1, 1),
            (17, 33, 5),
            (32, 64, 32),
            (40, 100, 70),
            (128, 576, 192),
            // More than one chunk of the reduction (35 steps of 32): sums carried over.
            (33, 1100, 40),
        ];
        for &(m, k, n) in &shapes {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            // b stored transposed, (n, k), read as (k, n): the strided packing path.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let a_view = View {
                data: &a,
                offset: 0,
                rows: m,
                cols: k,
                row_stride: k,
                col_stride: 1,
            };
            let b_views = [
                View {
                    data: &b,
                    offset: 0,
                    rows: k,
                    cols: n,
                    row_stride: n,
                    col_stride: 1,
                },
                View {
                    data: &bt,
                    offset: 0,
                    rows: k,
                    cols: n,
                    row_stride: 1,
                    col_stride: k,
                },
            ];
            if bf16_kernel().is_none() {
                assert!(
                    matmul(a_view, b_views[0]).is_none(),
                    "no bf16 kernel here: the caller must fall back to f32"
                );
                continue;
            }
            for (kernel, b_view) in kernels().into_iter().flat_map(|k| b_views.map(|b| (k, b))) {
                let got = matmul_with(kernel, a_view, b_view).expect("bf16 product");
                assert_eq!(got.len(), m * n);
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut scale) = (0f64, 0f64);
                        for l in 0..k {
                            let p = bf16_value(a[i * k + l]) * bf16_value(b[l * n + j]);
                            want += p;
                            scale += p.abs();
                        }
                        let diff = (got[i * n + j] as f64 - want).abs();
                        // Sequential f32 sums of k exact products err by at most k·2⁻²⁴ of
                        // the sum of their magnitudes.
                        assert!(
                            diff <= k as f64 * 6e-8 * scale,
                            "{kernel:?} ({m}, {k}, {n}) at ({i}, {j}): {} against {want}",
                            got[i * n + j]
                        );
                    }
                }
            }
        }
        // The transposed left operand (a gradient's `xᵀ · dy`).
        let (m, k, n) = (24, 50, 36);
        let (at, b) = (values(k * m, 3), values(k * n, 4));
        let a_view = View {
            data: &at,
            offset: 0,
            rows: m,
            cols: k,
            row_stride: 1,
            col_stride: m,
        };
        let b_view = View {
            data: &b,
            offset: 0,
            rows: k,
            cols: n,
            row_stride: n,
            col_stride: 1,
        };
        for kernel in kernels() {
            let got = matmul_with(kernel, a_view, b_view).expect("bf16 product");
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|l| bf16_value(at[l * m + i]) * bf16_value(b[l * n + j]))
                        .sum();
                    let diff = (got[i * n + j] as f64 - want).abs();
                    assert!(diff < 1e-4, "{kernel:?} at ({i}, {j})");
                }
            }
        }
    }

    /// Every kernel this CPU has: the dot-product kernel also where AMX is the default.
    fn kernels() -> Vec<Bf16Kernel> {
        let mut kernels = Vec::new();
        if amx_available() {
            kernels.push(Bf16Kernel::AmxTiles);
        }
        if avx512_bf16_available() {
            kernels.push(Bf16Kernel::Avx512Dot);
        }
        kernels
    }

    #[test]
    fn a_cpu_with_avx512_bf16_has_a_kernel() {
        assert_eq!(bf16_kernel().is_some(), avx512_bf16_available());
        if amx_available() {
            assert_eq!(bf16_kernel(), Some(Bf16Kernel::AmxTiles));
        }
    }
}
