//! Token selection operators: threshold-p (MoDification) and top-k (MoD).

use crate::error::{Error, Result};

/// The tokens a routed layer keeps: per row of the batch, the kept positions (indices into
/// the row, `< T`) in strictly ascending order. Padding is never kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    kept: Vec<Vec<u32>>,
    seq_len: usize,
}

impl Selection {
    /// A selection of the given kept positions per row, in rows padded to `seq_len`.
    ///
    /// Errors: [`Error::InvalidArgument`] for a position `>= seq_len` or a row that is not
    /// strictly ascending.
    pub fn new(kept: Vec<Vec<u32>>, seq_len: usize) -> Result<Self> {
        for (b, row) in kept.iter().enumerate() {
            let ascending = row.windows(2).all(|w| w[0] < w[1]);
            if !ascending || row.last().is_some_and(|&p| p as usize >= seq_len) {
                return Err(Error::InvalidArgument(format!(
                    "row {b}'s kept positions {row:?} are not ascending within 0..{seq_len}"
                )));
            }
        }
        Ok(Self { kept, seq_len })
    }

    /// Kept positions of every row, ascending.
    pub fn kept(&self) -> &[Vec<u32>] {
        &self.kept
    }

    /// Kept tokens per row.
    pub fn kept_per_row(&self) -> Vec<usize> {
        self.kept.iter().map(Vec::len).collect()
    }

    /// Padded row length T.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Every real token of rows of `lengths` tokens, padded to `seq_len`: the queries and
    /// writers of a dense layer.
    pub fn all(lengths: &[usize], seq_len: usize) -> Self {
        Self {
            kept: lengths.iter().map(|&l| (0..l as u32).collect()).collect(),
            seq_len,
        }
    }

    /// The tokens this selection skips among the real tokens of rows of `lengths` tokens
    /// (ascending per row): where a routed layer's skipped tokens get its skip adapter.
    pub fn skipped(&self, lengths: &[usize]) -> Self {
        let kept = (self.kept.iter().zip(lengths))
            .map(|(row, &len)| {
                let mut next_kept = row.iter().copied().peekable();
                (0..len as u32)
                    .filter(|&i| {
                        while next_kept.next_if(|&k| k < i).is_some() {}
                        next_kept.next_if_eq(&i).is_none()
                    })
                    .collect()
            })
            .collect();
        Self {
            kept,
            seq_len: self.seq_len,
        }
    }

    /// Whether every position of every row is kept (no padding, nothing skipped): the
    /// layer can run on the batch as it is, without gather and scatter.
    pub fn is_full(&self) -> bool {
        self.kept.iter().all(|row| row.len() == self.seq_len)
    }

    /// Total kept tokens over the batch.
    pub fn num_kept(&self) -> usize {
        self.kept.iter().map(Vec::len).sum()
    }

    /// The largest number of kept tokens in a row (the width of a dispatch).
    pub fn max_kept(&self) -> usize {
        self.kept.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Per-token 0/1 membership, row-major `(B, T)` (positions past T are ignored).
    pub fn mask(&self) -> Vec<f32> {
        let mut m = vec![0f32; self.kept.len() * self.seq_len];
        for (b, row) in self.kept.iter().enumerate() {
            for &i in row.iter().filter(|&&i| (i as usize) < self.seq_len) {
                m[b * self.seq_len + i as usize] = 1.0;
            }
        }
        m
    }
}

fn check_sinks(sinks: &[usize], lengths: &[usize]) -> Result<()> {
    if sinks.len() != lengths.len() {
        return Err(Error::InvalidArgument(format!(
            "{} sink counts for {} rows",
            sinks.len(),
            lengths.len()
        )));
    }
    Ok(())
}

fn check_shapes(scores: &[f32], lengths: &[usize], seq_len: usize) -> Result<()> {
    if scores.len() != lengths.len() * seq_len {
        return Err(Error::InvalidArgument(format!(
            "{} scores for {} rows of {seq_len} tokens",
            scores.len(),
            lengths.len()
        )));
    }
    if let Some(&bad) = lengths.iter().find(|&&l| l > seq_len) {
        return Err(Error::InvalidArgument(format!(
            "row length {bad} exceeds the padded length {seq_len}"
        )));
    }
    Ok(())
}

/// Threshold-p (MoDification): token i of row b is kept iff `gates[i] >= p`, or it is one
/// of the row's first `sinks[b]` tokens (attention sinks; a decode step's rows start
/// past the sinks and pass 0). Per token and causal: a decision depends on that token's
/// gate only, so decoding decides exactly as a full forward does.
///
/// `gates`: row-major `(B, T)` gate values; `lengths`: real tokens per row (the rest is
/// padding); `seq_len`: T.
///
/// Errors: [`Error::InvalidArgument`] for p outside (0, 1) or inconsistent shapes.
pub fn threshold_p(
    gates: &[f32],
    lengths: &[usize],
    seq_len: usize,
    p: f64,
    sinks: &[usize],
) -> Result<Selection> {
    if !(p > 0.0 && p < 1.0) {
        return Err(Error::InvalidArgument(format!(
            "threshold p = {p} is outside (0, 1)"
        )));
    }
    check_shapes(gates, lengths, seq_len)?;
    check_sinks(sinks, lengths)?;
    let p = p as f32;
    let kept = lengths
        .iter()
        .enumerate()
        .map(|(b, &len)| {
            let row = &gates[b * seq_len..b * seq_len + len];
            row.iter()
                .enumerate()
                .filter(|&(i, &g)| i < sinks[b] || g >= p)
                .map(|(i, _)| i as u32)
                .collect()
        })
        .collect();
    Ok(Selection { kept, seq_len })
}

/// Top-k (MoD, Raposo et al. 2024): per row, `k = ceil(capacity · len)` tokens kept: the row's
/// first `sinks[b]` tokens, then the largest router logits (ties to the lower position). Not causal.
///
/// `logits`: row-major `(B, T)`; `lengths`: real tokens per row; padding is never kept and
/// never counted in k.
///
/// Errors: [`Error::InvalidArgument`] for capacity outside (0, 1] or inconsistent shapes.
pub fn top_k(
    logits: &[f32],
    lengths: &[usize],
    seq_len: usize,
    capacity: f64,
    sinks: &[usize],
) -> Result<Selection> {
    if !(capacity > 0.0 && capacity <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "capacity {capacity} is outside (0, 1]"
        )));
    }
    check_shapes(logits, lengths, seq_len)?;
    check_sinks(sinks, lengths)?;
    let kept = lengths
        .iter()
        .enumerate()
        .map(|(b, &len)| {
            let k = ((capacity * len as f64).ceil() as usize).min(len);
            let row = &logits[b * seq_len..b * seq_len + len];
            let n_sinks = sinks[b].min(len);
            let mut rest: Vec<u32> = (n_sinks as u32..len as u32).collect();
            let want = k.saturating_sub(n_sinks).min(rest.len());
            // Larger logit first, then lower position; NaN logits sort last.
            let order = |a: &u32, b: &u32| {
                let (la, lb) = (row[*a as usize], row[*b as usize]);
                lb.partial_cmp(&la)
                    .unwrap_or_else(|| la.is_nan().cmp(&lb.is_nan()))
                    .then(a.cmp(b))
            };
            if want > 0 && want < rest.len() {
                rest.select_nth_unstable_by(want - 1, order);
            }
            rest.truncate(want);
            let mut chosen: Vec<u32> = (0..n_sinks as u32).chain(rest).collect();
            chosen.sort_unstable();
            chosen
        })
        .collect();
    Ok(Selection { kept, seq_len })
}
