//! A batch of token rows with explicit positions and padding.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};

/// Rows of token ids, right-padded to a common length.
///
/// All tensors are `(B, T)`: `ids` u32, `positions` u32 (0-based within the row; padding
/// continues the count, it is never visible), `valid` u8 (1 = real token, 0 = padding).
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids, `(B, T)` u32.
    pub ids: Tensor,
    /// Original position of every token, `(B, T)` u32.
    pub positions: Tensor,
    /// 1 for real tokens, 0 for padding, `(B, T)` u8.
    pub valid: Tensor,
    /// Real tokens per row (host copy of `valid`'s row sums).
    pub lengths: Vec<usize>,
    /// Position of each row's first token (host copy; 0 for a prompt, the row's length so
    /// far for a decode step).
    pub starts: Vec<usize>,
}

impl Batch {
    /// Builds a batch from rows of ids, right-padding with `pad_id`.
    ///
    /// Errors: [`Error::InvalidArgument`] for no rows or an empty row;
    /// [`Error::SequenceTooLong`] when a row is longer than `max_len` (the model's context).
    pub fn from_rows(
        rows: &[Vec<u32>],
        pad_id: u32,
        max_len: usize,
        device: &Device,
    ) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::InvalidArgument(
                "a batch needs at least one row".to_string(),
            ));
        }
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        if rows.iter().any(Vec::is_empty) {
            return Err(Error::InvalidArgument(
                "a batch row has no tokens".to_string(),
            ));
        }
        if t > max_len {
            return Err(Error::SequenceTooLong {
                len: t,
                max: max_len,
            });
        }
        let b = rows.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut valid = Vec::with_capacity(b * t);
        for row in rows {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad_id, t - row.len()));
            valid.extend(std::iter::repeat_n(1u8, row.len()));
            valid.extend(std::iter::repeat_n(0u8, t - row.len()));
        }
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions: Tensor::from_vec(positions, (b, t), device)?,
            valid: Tensor::from_vec(valid, (b, t), device)?,
            lengths: rows.iter().map(Vec::len).collect(),
            starts: vec![0; b],
        })
    }

    /// A batch of one row.
    ///
    /// Errors: as [`from_rows`](Self::from_rows).
    pub fn single(ids: &[u32], max_len: usize, device: &Device) -> Result<Self> {
        Self::from_rows(&[ids.to_vec()], 0, max_len, device)
    }

    /// Batch size B.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// Padded length T.
    pub fn seq_len(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0)
    }

    /// Number of real (non-padding) tokens.
    pub fn num_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// Whether no row is padded (every row holds T real tokens).
    pub fn is_full(&self) -> bool {
        let t = self.seq_len();
        self.lengths.iter().all(|&l| l == t)
    }
}
