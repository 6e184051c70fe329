//! A batch of token rows with explicit positions and padding.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Rows of token ids, right-padded to a common length T.
///
/// Every row holds its real tokens first and padding after them (right padding). A row
/// may start anywhere in its sequence: position `starts[b]` for its first token (0 for a
/// prompt, the number of tokens already seen for a continuation against a KV cache).
/// Padding is never a key, never kept by a router and never counted in a loss or in F, G.
///
/// Left padding is refused ([`Batch::from_tensors`]): a router keeps each row's first
/// tokens as attention sinks, and those must be the row's first *real* tokens.
///
/// The fields are private so that these invariants hold; the tensors are `(B, T)`:
/// [`ids`](Self::ids) u32, [`positions`](Self::positions) u32 (absolute positions in the
/// sequence; a padding slot repeats its row's last real position so that it never reaches
/// past the context), [`valid`](Self::valid) u8 (1 = real token, 0 = padding).
#[derive(Debug, Clone)]
pub struct Batch {
    ids: Tensor,
    positions: Tensor,
    valid: Tensor,
    lengths: Vec<usize>,
    starts: Vec<usize>,
    seq_len: usize,
}

impl Batch {
    /// Builds a batch of prompts (every row starts at position 0), right-padding with
    /// `pad_id`.
    ///
    /// Errors: [`Error::InvalidArgument`] for no rows or an empty row;
    /// [`Error::SequenceTooLong`] when a row is longer than `max_len` (the model's context).
    pub fn from_rows(
        rows: &[Vec<u32>],
        pad_id: u32,
        max_len: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::continuing(rows, &vec![0; rows.len()], pad_id, max_len, device)
    }

    /// Builds a batch whose row b continues a sequence at position `starts[b]` (a decode
    /// step, or a chunk of a long prompt, against a KV cache that holds `starts[b]` tokens
    /// of the row; see [`crate::model::kv_cache::KvCache::next_positions`]).
    ///
    /// Errors: [`Error::InvalidArgument`] for no rows, an empty row, or `starts` of another
    /// length than `rows`; [`Error::SequenceTooLong`] when a row would end past `max_len`.
    pub fn continuing(
        rows: &[Vec<u32>],
        starts: &[usize],
        pad_id: u32,
        max_len: usize,
        device: &Device,
    ) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::InvalidArgument(
                "a batch needs at least one row".to_string(),
            ));
        }
        if rows.iter().any(Vec::is_empty) {
            return Err(Error::InvalidArgument(
                "a batch row has no tokens".to_string(),
            ));
        }
        if starts.len() != rows.len() {
            return Err(Error::InvalidArgument(format!(
                "{} start positions for {} rows",
                starts.len(),
                rows.len()
            )));
        }
        for (row, &start) in rows.iter().zip(starts) {
            let end = start.saturating_add(row.len());
            if end > max_len {
                return Err(Error::SequenceTooLong {
                    len: end,
                    max: max_len,
                });
            }
        }
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * t);
        for row in rows {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad_id, t - row.len()));
        }
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        let ids = Tensor::from_vec(ids, (rows.len(), t), device)?;
        Self::assemble(ids, lengths, starts.to_vec())
    }

    /// A batch of one prompt.
    ///
    /// Errors: as [`from_rows`](Self::from_rows).
    pub fn single(ids: &[u32], max_len: usize, device: &Device) -> Result<Self> {
        Self::from_rows(&[ids.to_vec()], 0, max_len, device)
    }

    /// Builds a batch of prompts from tensors a tokenizer produced: `ids` `(B, T)` u32 and
    /// `valid` `(B, T)` u8 or u32 (1 = real token, 0 = padding; an attention mask). Rows
    /// may end in any number of padding columns, including columns no row uses.
    ///
    /// Errors: [`Error::InvalidArgument`] for tensors of other ranks, shapes or dtypes, a
    /// row without real tokens, a `valid` value other than 0 or 1, or left padding (a
    /// real token after a padding slot); [`Error::SequenceTooLong`] when T exceeds
    /// `max_len`.
    pub fn from_tensors(ids: &Tensor, valid: &Tensor, max_len: usize) -> Result<Self> {
        let (b, t) = ids.dims2().map_err(|_| {
            Error::InvalidArgument(format!("ids must be (B, T), got {:?}", ids.dims()))
        })?;
        if valid.dims() != ids.dims() {
            return Err(Error::InvalidArgument(format!(
                "valid {:?} and ids {:?} differ in shape",
                valid.dims(),
                ids.dims()
            )));
        }
        if ids.dtype() != DType::U32 || !matches!(valid.dtype(), DType::U8 | DType::U32) {
            return Err(Error::InvalidArgument(format!(
                "ids must be u32 and valid u8 or u32, got {:?} and {:?}",
                ids.dtype(),
                valid.dtype()
            )));
        }
        if b == 0 || t == 0 {
            return Err(Error::InvalidArgument("an empty batch".to_string()));
        }
        if t > max_len {
            return Err(Error::SequenceTooLong {
                len: t,
                max: max_len,
            });
        }
        let mask: Vec<Vec<u32>> = valid.to_dtype(DType::U32)?.to_vec2()?;
        let mut lengths = Vec::with_capacity(b);
        for (row, m) in mask.iter().enumerate() {
            if m.iter().any(|&v| v > 1) {
                return Err(Error::InvalidArgument(format!(
                    "row {row} of valid holds a value other than 0 or 1"
                )));
            }
            let len = m.iter().take_while(|&&v| v == 1).count();
            if m[len..].contains(&1) {
                return Err(Error::InvalidArgument(format!(
                    "row {row} is left-padded (a real token follows padding); \
                     pad on the right"
                )));
            }
            if len == 0 {
                return Err(Error::InvalidArgument(format!(
                    "row {row} has no real tokens"
                )));
            }
            lengths.push(len);
        }
        Self::assemble(ids.clone(), lengths, vec![0; b])
    }

    /// Positions and the validity mask of `ids` `(B, T)` for rows of `lengths` real tokens
    /// starting at `starts`.
    fn assemble(ids: Tensor, lengths: Vec<usize>, starts: Vec<usize>) -> Result<Self> {
        let (b, t) = ids.dims2()?;
        let mut positions = Vec::with_capacity(b * t);
        let mut valid = Vec::with_capacity(b * t);
        for (&len, &start) in lengths.iter().zip(&starts) {
            positions.extend((0..t).map(|i| (start + i.min(len - 1)) as u32));
            valid.extend((0..t).map(|i| u8::from(i < len)));
        }
        let device = ids.device().clone();
        Ok(Self {
            positions: Tensor::from_vec(positions, (b, t), &device)?,
            valid: Tensor::from_vec(valid, (b, t), &device)?,
            ids,
            lengths,
            starts,
            seq_len: t,
        })
    }

    /// Token ids, `(B, T)` u32.
    pub fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// Absolute position of every token, `(B, T)` u32.
    pub fn positions(&self) -> &Tensor {
        &self.positions
    }

    /// 1 for real tokens, 0 for padding, `(B, T)` u8.
    pub fn valid(&self) -> &Tensor {
        &self.valid
    }

    /// Real tokens per row.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Position of each row's first token.
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// One past each row's last real position: `starts[b] + lengths[b]`.
    pub fn ends(&self) -> Vec<usize> {
        self.starts
            .iter()
            .zip(&self.lengths)
            .map(|(s, l)| s + l)
            .collect()
    }

    /// Batch size B.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// Padded length T (columns of the tensors).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of real (non-padding) tokens.
    pub fn num_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// Whether no row is padded (every row holds T real tokens).
    pub fn is_full(&self) -> bool {
        self.lengths.iter().all(|&l| l == self.seq_len)
    }
}
