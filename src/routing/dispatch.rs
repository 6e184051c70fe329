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
    /// How the slots' updates go back to their tokens.
    scatter: Scatter,
}

#[derive(Debug, Clone)]
enum Scatter {
    /// `index_add` of the updates, padding slots zeroed by `valid` as a `(B, K, 1)`
    /// float mask in the model dtype.
    IndexAdd { valid_f: Tensor },
    /// On a GPU, for every token `b * T + t`, `(B * T,)` u32: its slot `b * K + s` if it
    /// is kept, else `B * K`, a zero row appended to the update. The scatter then runs as
    /// a gather: candle's CUDA `index_add` runs one thread per column, serially over the
    /// slots, where `index_select` is parallel over every element.
    Gather { token_slots: Tensor },
}

impl Dispatch {
    /// Builds the index tensors on `device` (one host-to-device copy); `dtype` is the
    /// model's activation dtype. `None` when no row keeps a token (the layer is the
    /// identity and computes nothing).
    ///
    /// Errors: [`crate::Error::Candle`] when the index tensors cannot be built.
    pub fn new(sel: &Selection, device: &Device, dtype: DType) -> Result<Option<Self>> {
        Self::build(sel, device, dtype, device.is_cuda())
    }

    /// [`Dispatch::new`], scattering by a gather where `scatter_by_gather`.
    fn build(
        sel: &Selection,
        device: &Device,
        dtype: DType,
        scatter_by_gather: bool,
    ) -> Result<Option<Self>> {
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
        let scatter = match scatter_by_gather {
            true => {
                let mut slots = vec![(b * k) as u32; b * t];
                for (row, kept) in sel.kept().iter().enumerate() {
                    for (slot, &p) in kept.iter().enumerate() {
                        slots[row * t + p as usize] = (row * k + slot) as u32;
                    }
                }
                Scatter::Gather {
                    token_slots: Tensor::from_vec(slots, b * t, device)?,
                }
            }
            false => Scatter::IndexAdd {
                valid_f: valid.to_dtype(dtype)?.unsqueeze(2)?,
            },
        };
        Ok(Some(Self {
            index: Some(SlotIndex {
                flat: Tensor::from_vec(flat, b * k, device)?,
                scatter,
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
    /// (candle 0.11's `scatter_add` gets the base's gradient wrong); on a GPU, a gather of
    /// every token's update row (a zero row for a skipped token) and one add.
    pub fn add_back(&self, x: &Tensor, update: &Tensor) -> Result<Tensor> {
        let Some(index) = &self.index else {
            return Ok((x + update)?);
        };
        let d = x.dim(2)?;
        let sum = match &index.scatter {
            Scatter::Gather { token_slots } => {
                let flat_update = update.reshape((self.batch * self.width, d))?;
                let zero = Tensor::zeros((1, d), update.dtype(), update.device())?;
                let rows = Tensor::cat(&[&flat_update, &zero], 0)?;
                (x.reshape((self.batch * self.seq_len, d))? + rows.index_select(token_slots, 0)?)?
            }
            Scatter::IndexAdd { valid_f } => {
                let masked = update.broadcast_mul(valid_f)?;
                let masked = masked.reshape((self.batch * self.width, d))?;
                x.reshape((self.batch * self.seq_len, d))?
                    .index_add(&index.flat, &masked, 0)?
            }
        };
        Ok(sum.reshape((self.batch, self.seq_len, d))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scatter as a gather (a GPU's) equals the `index_add` one, values and gradients
    /// of both operands, with rows of different kept counts and padding slots.
    #[test]
    fn scatter_by_gather_equals_index_add() -> Result<()> {
        let (t, d) = (6, 3);
        let sel = Selection::new(vec![vec![0, 2, 5], vec![4], vec![]], t)?;
        let x0: Vec<f32> = (0..3 * t * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let u0: Vec<f32> = (0..3 * 3 * d).map(|i| (i as f32 * 0.71).cos()).collect();
        let run = |by_gather: bool| -> Result<Vec<Vec<f32>>> {
            let dev = Device::Cpu;
            let dispatch = Dispatch::build(&sel, &dev, DType::F32, by_gather)?.expect("kept");
            let x = candle_core::Var::from_vec(x0.clone(), (3, t, d), &dev)?;
            let u = candle_core::Var::from_vec(u0.clone(), (3, 3, d), &dev)?;
            let y = dispatch.add_back(x.as_tensor(), u.as_tensor())?;
            let probe = Tensor::arange(0f32, (3 * t * d) as f32, &dev)?.reshape((3, t, d))?;
            let grads = (&y * &probe)?.sum_all()?.backward()?;
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            Ok(vec![
                flat(&y)?,
                flat(grads.get(x.as_tensor()).expect("dx"))?,
                flat(grads.get(u.as_tensor()).expect("du"))?,
            ])
        };
        let (by_gather, by_index_add) = (run(true)?, run(false)?);
        assert_eq!(by_gather, by_index_add);
        // Padding slots (row 1's slots 1 and 2, all of row 2's) get no gradient.
        assert!(by_gather[2][(3 + 1) * d..(3 + 3) * d]
            .iter()
            .all(|&g| g == 0.0));
        Ok(())
    }
}
