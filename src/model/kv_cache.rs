//! A KV cache that holds, per layer and per row, only the tokens that wrote K/V there, and
//! the sequence state of every row (how many tokens it has seen).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Keys and values of one row at one layer, with the original position of every entry.
///
/// The entries live in buffers of `capacity >= len` slots that grow geometrically, so
/// that a decode step writes one slot in place instead of copying the row.
#[derive(Debug, Default)]
struct RowEntries {
    /// `(1, n_kv_heads, capacity, head_dim)` keys, rotated at their positions; slots
    /// `len..` hold nothing meaningful.
    k: Option<Tensor>,
    /// `(1, n_kv_heads, capacity, head_dim)` values.
    v: Option<Tensor>,
    /// The positions of the `len` entries, ascending.
    positions: Vec<u32>,
}

/// Slots of a row's first buffer.
const MIN_CAPACITY: usize = 16;

impl RowEntries {
    fn len(&self) -> usize {
        self.positions.len()
    }

    fn capacity(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[2])
    }

    /// A fresh buffer of `capacity` slots shaped like `like` (`(1, h, _, w)`) holding the
    /// first `len` entries of `old`.
    fn regrow(old: Option<&Tensor>, like: &Tensor, len: usize, capacity: usize) -> Result<Tensor> {
        let (_, heads, _, width) = like.dims4()?;
        let buf = Tensor::zeros((1, heads, capacity, width), like.dtype(), like.device())?;
        if let Some(old) = old.filter(|_| len > 0) {
            buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
        }
        Ok(buf)
    }

    /// The entries as `(1, h, len, w)` views of the buffers (no copy).
    fn views(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) if self.len() > 0 => Ok(Some((
                k.narrow(2, 0, self.len())?,
                v.narrow(2, 0, self.len())?,
            ))),
            _ => Ok(None),
        }
    }
}

impl Clone for RowEntries {
    /// A deep copy: buffers are written in place, so two caches must never share one.
    fn clone(&self) -> Self {
        let copy = |t: &Option<Tensor>| t.as_ref().and_then(|t| t.copy().ok());
        Self {
            k: copy(&self.k),
            v: copy(&self.v),
            positions: self.positions.clone(),
        }
    }
}

/// The KV cache of a batch: for every layer and row, the K/V entries of the tokens that
/// layer computed keys for, and for every row the number of tokens it has seen (the
/// position its next token must have).
///
/// A token skipped at a routed layer under the `Skip` policy has no entry there, which is
/// where a Mixture-of-Depths model saves memory. Every method returns a typed error for a
/// layer or row the cache does not have; none panics.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Vec<RowEntries>>,
    seen: Vec<usize>,
}

/// The padded keys of a batch at one layer, ready for attention. For a batch of one row
/// the tensors are views of the cache's buffers (no copy): use them before the cache
/// changes.
#[derive(Debug, Clone)]
pub struct LayerKeys {
    /// `(B, n_kv_heads, S, head_dim)`, rows zero-padded to the longest (a row's padding
    /// slots hold finite values that `valid` masks).
    pub k: Tensor,
    /// `(B, n_kv_heads, S, head_dim)`.
    pub v: Tensor,
    /// `(B, S)` u32 original positions.
    pub positions: Tensor,
    /// `(B, S)` u8, 1 for a real entry.
    pub valid: Tensor,
    /// Real entries per row.
    pub lengths: Vec<usize>,
    /// The positions of each row's real entries, ascending (a host copy of `positions`).
    pub row_positions: Vec<Vec<u32>>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers and `batch` rows.
    ///
    /// Errors: [`Error::InvalidArgument`] when either is zero.
    pub fn new(num_layers: usize, batch: usize) -> Result<Self> {
        if num_layers == 0 || batch == 0 {
            return Err(Error::InvalidArgument(format!(
                "a KV cache needs layers and rows, got {num_layers} layers and {batch} rows"
            )));
        }
        Ok(Self {
            layers: vec![vec![RowEntries::default(); batch]; num_layers],
            seen: vec![0; batch],
        })
    }

    /// Layers the cache was made for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Rows of the batch.
    pub fn batch_size(&self) -> usize {
        self.seen.len()
    }

    /// The position each row's next token must have: the number of tokens the row has
    /// seen. What [`crate::Batch::continuing`] takes as `starts`.
    pub fn next_positions(&self) -> &[usize] {
        &self.seen
    }

    /// Entries of `row` at `layer`.
    ///
    /// Errors: [`Error::InvalidArgument`] for a layer or row the cache does not have.
    pub fn len(&self, layer: usize, row: usize) -> Result<usize> {
        Ok(self.entries(layer, row)?.positions.len())
    }

    /// Whether no row has seen a token.
    pub fn is_empty(&self) -> bool {
        self.seen.iter().all(|&s| s == 0)
    }

    /// Forgets everything: every row starts again at position 0.
    pub fn reset(&mut self) {
        for row in self.layers.iter_mut().flatten() {
            *row = RowEntries::default();
        }
        self.seen.fill(0);
    }

    /// Keeps the first `len` tokens of every row (rows shorter than `len` are unchanged):
    /// entries at positions `>= len` are dropped, and a row continues at `min(seen, len)`.
    /// How a shared prompt prefix is reused for another continuation.
    ///
    /// Errors: [`Error::Candle`] on a tensor failure.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for row in self.layers.iter_mut().flatten() {
            let keep = row.positions.partition_point(|&p| (p as usize) < len);
            if keep == row.len() {
                continue;
            }
            row.positions.truncate(keep);
            // Fresh buffers: views handed out before must not see later writes.
            if let (Some(k), Some(v)) = (row.k.take(), row.v.take()) {
                if keep > 0 {
                    let capacity = keep.max(MIN_CAPACITY);
                    row.k = Some(RowEntries::regrow(Some(&k), &k, keep, capacity)?);
                    row.v = Some(RowEntries::regrow(Some(&v), &v, keep, capacity)?);
                }
            }
        }
        for s in &mut self.seen {
            *s = (*s).min(len);
        }
        Ok(())
    }

    /// Checks that row b of a batch starting at `starts[b]` continues the row's sequence.
    ///
    /// Errors: [`Error::InvalidArgument`] for another number of rows;
    /// [`Error::PositionMismatch`] for a restart, a gap or an overlap.
    pub fn check_continues(&self, starts: &[usize]) -> Result<()> {
        if starts.len() != self.seen.len() {
            return Err(Error::InvalidArgument(format!(
                "a batch of {} rows against a KV cache of {} rows",
                starts.len(),
                self.seen.len()
            )));
        }
        match (starts.iter().zip(&self.seen)).position(|(s, seen)| s != seen) {
            None => Ok(()),
            Some(row) => Err(Error::PositionMismatch {
                row,
                expected: self.seen[row],
                got: starts[row],
            }),
        }
    }

    /// Records that every row has now seen `ends[b]` tokens (after a forward pass appended
    /// their entries).
    pub(crate) fn advance(&mut self, ends: &[usize]) {
        self.seen.copy_from_slice(ends);
    }

    fn entries(&self, layer: usize, row: usize) -> Result<&RowEntries> {
        self.layers
            .get(layer)
            .and_then(|l| l.get(row))
            .ok_or_else(|| self.out_of_range(layer, row))
    }

    fn out_of_range(&self, layer: usize, row: usize) -> Error {
        Error::InvalidArgument(format!(
            "layer {layer}, row {row} is outside a KV cache of {} layers and {} rows",
            self.num_layers(),
            self.batch_size()
        ))
    }

    /// The number of entries of every layer and row, for [`restore`](Self::restore).
    pub(crate) fn snapshot(&self) -> Vec<Vec<usize>> {
        (self.layers.iter())
            .map(|rows| rows.iter().map(RowEntries::len).collect())
            .collect()
    }

    /// Drops every entry appended since `snapshot` (a forward pass that failed half-way).
    /// Buffer slots past a row's length are never read, so nothing is copied.
    pub(crate) fn restore(&mut self, snapshot: &[Vec<usize>]) {
        for (rows, lens) in self.layers.iter_mut().zip(snapshot) {
            for (row, &len) in rows.iter_mut().zip(lens) {
                row.positions.truncate(len);
            }
        }
    }

    /// Appends `k`, `v` (`(1, n_kv_heads, s, head_dim)`) at `positions` (length s,
    /// ascending, after the row's last entry) to `row` of `layer`. Only a forward pass
    /// appends: the cache's sequence state must stay the same at every layer.
    ///
    /// Errors: [`Error::InvalidArgument`] for a layer or row the cache does not have, `k`
    /// and `v` of different shapes or not of rank 4 with one row, `s` different from
    /// `positions.len()`, or positions that are not ascending past the row's entries;
    /// [`Error::Candle`] when the new entries differ from the old in heads, width or dtype.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        row: usize,
        k: &Tensor,
        v: &Tensor,
        positions: &[u32],
    ) -> Result<()> {
        let last = self.entries(layer, row)?.positions.last().copied();
        let shape_ok = k.dims() == v.dims() && k.rank() == 4 && k.dims()[0] == 1;
        if k.dtype() != v.dtype() {
            return Err(Error::InvalidArgument(format!(
                "keys in {:?} and values in {:?}",
                k.dtype(),
                v.dtype()
            )));
        }
        if !shape_ok || k.dims()[2] != positions.len() {
            return Err(Error::InvalidArgument(format!(
                "keys {:?} and values {:?} for {} positions: expected (1, heads, {}, width) each",
                k.dims(),
                v.dims(),
                positions.len(),
                positions.len()
            )));
        }
        let ascending = positions.windows(2).all(|w| w[0] < w[1]);
        let after = match (last, positions.first()) {
            (Some(l), Some(&p)) => p > l,
            _ => true,
        };
        if !ascending || !after {
            return Err(Error::InvalidArgument(format!(
                "positions {positions:?} do not follow the row's last entry {last:?} in order"
            )));
        }
        let e = &mut self.layers[layer][row];
        let (len, s) = (e.len(), positions.len());
        if len + s > e.capacity() {
            let capacity = (len + s).max(2 * e.capacity()).max(MIN_CAPACITY);
            e.k = Some(RowEntries::regrow(e.k.as_ref(), k, len, capacity)?);
            e.v = Some(RowEntries::regrow(e.v.as_ref(), v, len, capacity)?);
        }
        if let (Some(bk), Some(bv)) = (&e.k, &e.v) {
            bk.slice_set(&k.contiguous()?, 2, len)?;
            bv.slice_set(&v.contiguous()?, 2, len)?;
        }
        e.positions.extend_from_slice(positions);
        Ok(())
    }

    /// Every row's entries at `layer`, zero-padded into one batch. `None` when no row has
    /// an entry. `n_kv_heads`, `head_dim`, `dtype` and `device` describe the padding.
    ///
    /// Errors: [`Error::InvalidArgument`] for a layer the cache does not have;
    /// [`Error::Candle`] when stored entries differ from the padding's shape or dtype.
    pub fn layer_keys(
        &self,
        layer: usize,
        device: &Device,
        dtype: DType,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<Option<LayerKeys>> {
        let rows = self
            .layers
            .get(layer)
            .ok_or_else(|| self.out_of_range(layer, 0))?;
        let lengths: Vec<usize> = rows.iter().map(|r| r.positions.len()).collect();
        let s = lengths.iter().copied().max().unwrap_or(0);
        if s == 0 {
            return Ok(None);
        }
        let b = rows.len();
        let mut pos = Vec::with_capacity(b * s);
        let mut valid = Vec::with_capacity(b * s);
        for (r, &len) in rows.iter().zip(&lengths) {
            pos.extend_from_slice(&r.positions);
            pos.extend(std::iter::repeat_n(0, s - len));
            valid.extend(std::iter::repeat_n(1u8, len));
            valid.extend(std::iter::repeat_n(0u8, s - len));
        }
        let (k, v) = match rows.as_slice() {
            // One row: views of its buffers, nothing copied.
            [row] => row
                .views()?
                .ok_or_else(|| Error::InvalidArgument(format!("layer {layer} lost its entries")))?,
            _ => {
                let zeros = |n: usize| Tensor::zeros((1, n_kv, n, head_dim), dtype, device);
                let (mut ks, mut vs) = (Vec::with_capacity(b), Vec::with_capacity(b));
                for (row, &len) in rows.iter().zip(&lengths) {
                    let (k, v) = match row.views()? {
                        Some((k, v)) if len == s => (k, v),
                        Some((k, v)) => (
                            Tensor::cat(&[&k, &zeros(s - len)?], 2)?,
                            Tensor::cat(&[&v, &zeros(s - len)?], 2)?,
                        ),
                        None => (zeros(s)?, zeros(s)?),
                    };
                    ks.push(k);
                    vs.push(v);
                }
                (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)
            }
        };
        Ok(Some(LayerKeys {
            k,
            v,
            positions: Tensor::from_vec(pos, (b, s), device)?,
            valid: Tensor::from_vec(valid, (b, s), device)?,
            lengths,
            row_positions: rows.iter().map(|r| r.positions.clone()).collect(),
        }))
    }

    /// Bytes of the key and value entries of each layer (all rows): what the cache must
    /// hold, excluding the spare capacity of its buffers.
    pub fn layer_bytes(&self) -> Vec<usize> {
        self.layers
            .iter()
            .map(|rows| {
                rows.iter()
                    .filter_map(|r| Some((r.len(), r.k.as_ref()?)))
                    .map(|(len, k)| {
                        let (_, heads, _, width) = k.dims4().unwrap_or_default();
                        2 * len * heads * width * k.dtype().size_in_bytes()
                    })
                    .sum()
            })
            .collect()
    }

    /// Bytes of every key and value entry of the cache (see
    /// [`layer_bytes`](Self::layer_bytes)).
    pub fn bytes(&self) -> usize {
        self.layer_bytes().iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_appends_are_errors_and_change_nothing() -> Result<()> {
        let mut cache = KvCache::new(2, 1)?;
        let k = Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu)?;
        let bad = |r: Result<()>| assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        bad(cache.append(2, 0, &k, &k, &[0, 1, 2]));
        bad(cache.append(0, 1, &k, &k, &[0, 1, 2]));
        bad(cache.append(0, 0, &k, &k, &[0, 1]));
        bad(cache.append(0, 0, &k, &k, &[2, 1, 3]));
        let v = Tensor::zeros((1, 2, 2, 4), DType::F32, &Device::Cpu)?;
        bad(cache.append(0, 0, &k, &v, &[0, 1, 2]));
        let v16 = k.to_dtype(DType::BF16)?;
        bad(cache.append(0, 0, &k, &v16, &[0, 1, 2]));
        assert_eq!(cache.len(0, 0)?, 0);
        cache.append(0, 0, &k, &k, &[0, 1, 2])?;
        bad(cache.append(0, 0, &k, &k, &[2, 3, 4]));
        assert_eq!(cache.len(0, 0)?, 3);
        // A restore drops what came after the snapshot.
        let snap = cache.snapshot();
        cache.append(1, 0, &k, &k, &[0, 1, 2])?;
        cache.restore(&snap);
        assert_eq!((cache.len(0, 0)?, cache.len(1, 0)?), (3, 0));
        Ok(())
    }
}
