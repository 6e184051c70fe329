//! A KV cache that holds, per layer and per row, only the tokens that wrote K/V there.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// Keys and values of one row at one layer, with the original position of every entry.
#[derive(Debug, Clone, Default)]
struct RowEntries {
    /// `(1, n_kv_heads, S, head_dim)` keys, rotated at their positions.
    k: Option<Tensor>,
    /// `(1, n_kv_heads, S, head_dim)` values.
    v: Option<Tensor>,
    positions: Vec<u32>,
}

/// The KV cache of a batch: for every layer and row, the K/V entries of the tokens that
/// layer computed keys for. A token skipped at a routed layer under the `Skip` policy has
/// no entry there, which is where a Mixture-of-Depths model saves memory.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Vec<RowEntries>>,
}

/// The padded keys of a batch at one layer, ready for attention.
#[derive(Debug, Clone)]
pub struct LayerKeys {
    /// `(B, n_kv_heads, S, head_dim)`, rows zero-padded to the longest.
    pub k: Tensor,
    /// `(B, n_kv_heads, S, head_dim)`.
    pub v: Tensor,
    /// `(B, S)` u32 original positions.
    pub positions: Tensor,
    /// `(B, S)` u8, 1 for a real entry.
    pub valid: Tensor,
}

impl KvCache {
    /// An empty cache for `num_layers` layers and `batch` rows.
    pub fn new(num_layers: usize, batch: usize) -> Self {
        Self {
            layers: vec![vec![RowEntries::default(); batch]; num_layers],
        }
    }

    /// Layers the cache was made for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Rows of the batch.
    pub fn batch_size(&self) -> usize {
        self.layers.first().map_or(0, Vec::len)
    }

    /// Entries of `row` at `layer` (0 for a layer or row the cache does not have).
    pub fn len(&self, layer: usize, row: usize) -> usize {
        self.layers
            .get(layer)
            .and_then(|l| l.get(row))
            .map_or(0, |r| r.positions.len())
    }

    /// Whether the cache holds no entry at all.
    pub fn is_empty(&self) -> bool {
        self.layers.iter().flatten().all(|r| r.positions.is_empty())
    }

    /// Appends `k`, `v` (`(1, n_kv_heads, s, head_dim)`) at `positions` (length s) to `row`
    /// of `layer`.
    pub fn append(
        &mut self,
        layer: usize,
        row: usize,
        k: &Tensor,
        v: &Tensor,
        positions: &[u32],
    ) -> Result<()> {
        let e = &mut self.layers[layer][row];
        let cat = |old: &Option<Tensor>, new: &Tensor| -> Result<Tensor> {
            Ok(match old {
                None => new.contiguous()?,
                Some(old) => Tensor::cat(&[old, new], 2)?,
            })
        };
        e.k = Some(cat(&e.k, k)?);
        e.v = Some(cat(&e.v, v)?);
        e.positions.extend_from_slice(positions);
        Ok(())
    }

    /// Every row's entries at `layer`, zero-padded into one batch. `None` when no row has
    /// an entry. `n_kv_heads`, `head_dim`, `dtype` and `device` describe the padding.
    pub fn layer_keys(
        &self,
        layer: usize,
        device: &Device,
        dtype: DType,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<Option<LayerKeys>> {
        let rows = &self.layers[layer];
        let s = rows.iter().map(|r| r.positions.len()).max().unwrap_or(0);
        if s == 0 {
            return Ok(None);
        }
        let pad = |t: &Option<Tensor>, len: usize| -> Result<Tensor> {
            let missing = s - len;
            let zeros = || Tensor::zeros((1, n_kv, missing, head_dim), dtype, device);
            Ok(match t {
                None => Tensor::zeros((1, n_kv, s, head_dim), dtype, device)?,
                Some(t) if missing == 0 => t.clone(),
                Some(t) => Tensor::cat(&[t, &zeros()?], 2)?,
            })
        };
        let mut ks = Vec::with_capacity(rows.len());
        let mut vs = Vec::with_capacity(rows.len());
        let mut pos = Vec::with_capacity(rows.len() * s);
        let mut valid = Vec::with_capacity(rows.len() * s);
        for r in rows {
            let len = r.positions.len();
            ks.push(pad(&r.k, len)?);
            vs.push(pad(&r.v, len)?);
            pos.extend_from_slice(&r.positions);
            pos.extend(std::iter::repeat_n(0, s - len));
            valid.extend(std::iter::repeat_n(1u8, len));
            valid.extend(std::iter::repeat_n(0u8, s - len));
        }
        let b = rows.len();
        let stack = |mut parts: Vec<Tensor>| -> Result<Tensor> {
            Ok(if parts.len() == 1 {
                parts.remove(0)
            } else {
                Tensor::cat(&parts, 0)?
            })
        };
        Ok(Some(LayerKeys {
            k: stack(ks)?,
            v: stack(vs)?,
            positions: Tensor::from_vec(pos, (b, s), device)?,
            valid: Tensor::from_vec(valid, (b, s), device)?,
        }))
    }

    /// Bytes held by the keys and values of each layer (all rows).
    pub fn layer_bytes(&self) -> Vec<usize> {
        self.layers
            .iter()
            .map(|rows| {
                rows.iter()
                    .flat_map(|r| [&r.k, &r.v])
                    .flatten()
                    .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                    .sum()
            })
            .collect()
    }

    /// Bytes held by every key and value of the cache.
    pub fn bytes(&self) -> usize {
        self.layer_bytes().iter().sum()
    }
}
