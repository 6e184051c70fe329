//! Gather the kept tokens of every row into a dense `(B, K, d)` block, and add the block's
//! update back into the full `(B, T, d)` hidden states.

use super::selection::Selection;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// Index tensors of a [`Selection`]: row b's kept tokens occupy slots `0..k_b` of a
/// `(B, K)` grid, `K = max_b k_b`; the remaining slots are padding (invalid, zero update).
/// When every token of every row is kept, the dispatch is the identity: no index is built
/// and nothing is copied.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// `None` for the identity (every token kept).
    index: Option<SlotIndex>,
    valid: Tensor,
    batch: usize,
    width: usize,
    seq_len: usize,
}

#[derive(Debug, Clone)]
struct SlotIndex {
    /// `b * T + index` of every slot, `(B * K,)` u32 (padding slots point at `b * T`).
    flat: Tensor,
    /// `valid` as a `(B, K, 1)` float mask in the model dtype.
    valid_f: Tensor,
}

impl Dispatch {
    /// Builds the index tensors on `device` (one host-to-device copy); `dtype` is the
    /// model's activation dtype. `None` when no row keeps a token (the layer is the
    /// identity and computes nothing).
    ///
    /// Errors: [`crate::Error::Candle`] when the index tensors cannot be built.
    pub fn new(sel: &Selection, device: &Device, dtype: DType) -> Result<Option<Self>> {
        let (b, k, t) = (sel.kept().len(), sel.max_kept(), sel.seq_len());
        if k == 0 {
            return Ok(None);
        }
        if sel.is_full() {
            return Ok(Some(Self {
                index: None,
                valid: Tensor::ones((b, t), DType::U8, device)?,
                batch: b,
                width: t,
                seq_len: t,
            }));
        }
        let mut flat = Vec::with_capacity(b * k);
        let mut valid = Vec::with_capacity(b * k);
        for (row, kept) in sel.kept().iter().enumerate() {
            for slot in 0..k {
                let p = kept.get(slot).copied();
                flat.push((row * t) as u32 + p.unwrap_or(0));
                valid.push(p.is_some() as u8);
            }
        }
        let valid = Tensor::from_vec(valid, (b, k), device)?;
        Ok(Some(Self {
            index: Some(SlotIndex {
                flat: Tensor::from_vec(flat, b * k, device)?,
                valid_f: valid.to_dtype(dtype)?.unsqueeze(2)?,
            }),
            valid,
            batch: b,
            width: k,
            seq_len: t,
        }))
    }

    /// 1 for a kept token, 0 for a padding slot, `(B, K)` u8.
    pub fn valid(&self) -> &Tensor {
        &self.valid
    }

    /// Slots per row K.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Gathers `(B, T, d)` -> `(B, K, d)` (padding slots hold row b's token 0).
    /// Differentiable (index_select).
    pub fn gather(&self, x: &Tensor) -> Result<Tensor> {
        let Some(index) = &self.index else {
            return Ok(x.clone());
        };
        let d = x.dim(2)?;
        Ok(x.reshape((self.batch * self.seq_len, d))?
            .index_select(&index.flat, 0)?
            .reshape((self.batch, self.width, d))?)
    }

    /// Gathers a per-token value `(B, T)` -> `(B, K)` (position ids, gates).
    pub fn gather_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let Some(index) = &self.index else {
            return Ok(x.clone());
        };
        Ok(x.flatten_all()?
            .index_select(&index.flat, 0)?
            .reshape((self.batch, self.width))?)
    }

    /// `x + scatter(update)`: adds `update` `(B, K, d)` of the kept tokens into `x`
    /// `(B, T, d)` at their positions, exactly once; padding slots add nothing and skipped
    /// tokens are untouched. Uses `index_add`, whose gradient is right for both operands
    /// (candle 0.11's `scatter_add` gets the base's gradient wrong).
    pub fn add_back(&self, x: &Tensor, update: &Tensor) -> Result<Tensor> {
        let Some(index) = &self.index else {
            return Ok((x + update)?);
        };
        let d = x.dim(2)?;
        let update = update.broadcast_mul(&index.valid_f)?;
        Ok(x.reshape((self.batch * self.seq_len, d))?
            .index_add(
                &index.flat,
                &update.reshape((self.batch * self.width, d))?,
                0,
            )?
            .reshape((self.batch, self.seq_len, d))?)
    }
}
