//! Bias-free linear layers whose frozen weights cost no gradient.
//!
//! candle 0.11's matmul backward always computes both operands' gradients, so a
//! router-only conversion would spend a third of its backward pass on gradients of frozen
//! base weights that are thrown away. [`linear`] uses a matmul whose backward returns the
//! input's gradient only when the weight is not a trainable `Var`; its f32 products that
//! go to `gemm` write straight into their output (candle's matmul zero-fills it first,
//! on one thread; with the `mkl` feature they go to candle's matmul, MKL's sgemm). Where
//! [`set_f32_matmul_precision`](super::amx::set_f32_matmul_precision) asked for bf16 and
//! the CPU has a bf16 kernel (AMX tiles or AVX512-BF16 dot products), its products
//! (forward and both gradients) run on it.

use super::amx;
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor};

/// `x · wᵀ` over the last dimension: `x` `(..., in)`, `w` `(out, in)` -> `(..., out)`.
/// Input and weight are flattened to 2-D so the weight is never broadcast per batch row.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inp = *dims.last().unwrap_or(&0);
    let n = x.elem_count() / inp.max(1);
    let x2 = x.reshape((n, inp))?;
    let weight_grad = w.is_variable() || w.track_op();
    let y = x2.apply_op2(&w.t()?, LinearMatmul { weight_grad })?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = w.dim(0)?;
    }
    Ok(y.reshape(out_dims)?)
}

/// `a · b` for 2-D tensors: f32 operands on the CPU through [`Product`] (a bf16 kernel
/// where bf16 products are asked for and available, else `gemm` straight into the output),
/// others through candle's matmul; no gradient of its own (it computes gradients).
fn product(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let cpu_f32 = a.device().is_cpu()
        && b.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32;
    if cpu_f32 {
        a.apply_op2_no_bwd(b, &Product)
    } else {
        a.matmul(b)
    }
}

/// `a (m, k) · b (k, n)` for f32 operands in any strides, by `gemm` writing straight into
/// a fresh `(m, n)` buffer: candle's CPU matmul first fills its output with zeros on the
/// calling thread while the other threads wait (2-4% of a prefill's and of a routed
/// layer's samples on a Zen 3). `None` when a layout is not 2-D, the inner dimensions
/// differ, or an operand's slice is shorter than its strides reach, and always with the
/// `mkl` feature.
fn gemm_f32(a: &[f32], la: &Layout, b: &[f32], lb: &Layout) -> Option<Vec<f32>> {
    if cfg!(feature = "mkl") {
        return None; // the feature makes candle's matmul MKL's sgemm, which is what it is for
    }
    let ((m, k), (k2, n)) = (la.shape().dims2().ok()?, lb.shape().dims2().ok()?);
    // The furthest element an operand's strides reach must lie within its slice.
    let reaches = |len: usize, l: &Layout, rows: usize, cols: usize| {
        let [rs, cs] = l.stride() else { return false };
        let last = (rows.checked_sub(1), cols.checked_sub(1));
        let (Some(r), Some(c)) = last else {
            return true; // an empty operand reads nothing
        };
        let furthest = (r.checked_mul(*rs), c.checked_mul(*cs));
        let (Some(a), Some(b)) = furthest else {
            return false;
        };
        a.checked_add(b)
            .and_then(|x| x.checked_add(l.start_offset()))
            .is_some_and(|x| x < len)
    };
    if k != k2 || !reaches(a.len(), la, m, k) || !reaches(b.len(), lb, k, n) {
        return None;
    }
    let (sa, sb) = (la.stride(), lb.stride());
    let mut y = Vec::with_capacity(m * n);
    let threads = rayon::current_num_threads();
    let parallelism = match threads {
        0 | 1 => gemm::Parallelism::None,
        _ => gemm::Parallelism::Rayon(threads),
    };
    // SAFETY: the operands' strides stay within their slices (checked above); `y` has room
    // for the m × n row-major output, every element of which gemm writes when it does not
    // read the destination (zeros when k = 0).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            a[la.start_offset()..].as_ptr(),
            sa[1] as isize,
            sa[0] as isize,
            b[lb.start_offset()..].as_ptr(),
            sb[1] as isize,
            sb[0] as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        y.set_len(m * n);
    }
    Some(y)
}

/// `x (m, k) · w_t (k, n)`, with a backward for `x`, and for `w_t` where `weight_grad`.
struct LinearMatmul {
    weight_grad: bool,
}

fn mnk(l1: &Layout, l2: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (m, k) = l1.shape().dims2()?;
    let (k2, n) = l2.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("linear: inner dimensions differ ({k} and {k2})");
    }
    Ok((m, n, k))
}

impl CustomOp2 for LinearMatmul {
    fn name(&self) -> &'static str {
        "linear-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n, k) = mnk(l1, l2)?;
        // A weight stored `(out, in)` (its transpose is the operand): a few rows are a
        // decode step, bound by reading the weight once; more rows run on a bf16 kernel in
        // bf16 where asked for; up to a few hundred, a short prompt, where outer products
        // on the weight as stored beat packing both operands.
        let weight_rows = l2.stride() == [1, k];
        if m > super::gemv::MAX_ROWS && amx::enabled() {
            if let Some(y) = bf16_storage(s1, l1, s2, l2) {
                return Ok((y, Shape::from((m, n))));
            }
        }
        if let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) {
            let w0 = l2.start_offset();
            if let (Some((x0, x1)), Some(w), true) =
                (l1.contiguous_offsets(), w.get(w0..w0 + n * k), weight_rows)
            {
                let x = &x[x0..x1];
                let y = if m <= super::gemv::MAX_ROWS {
                    Some(super::gemv::gemv(x, m, k, w, n))
                } else if m <= super::outer_product::MAX_ROWS {
                    super::outer_product::matmul_wt(x, m, k, w, n)
                } else {
                    None
                };
                if let Some(y) = y {
                    return Ok((CpuStorage::F32(y), Shape::from((m, n))));
                }
            }
        }
        if let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) {
            if let Some(y) = gemm_f32(x, l1, w, l2) {
                return Ok((CpuStorage::F32(y), Shape::from((m, n))));
            }
        }
        Ok((s1.matmul(s2, (1, m, n, k), l1, l2)?, Shape::from((m, n))))
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = mnk(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, l2)?, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = product(grad, &w_t.t()?)?;
        let dw_t = match self.weight_grad {
            true => Some(product(&x.t()?, grad)?),
            false => None,
        };
        Ok((Some(dx), dw_t))
    }
}

/// `a (m, k) · b (k, n)` (any strides) on a bf16 kernel where one is enabled and can take
/// the operands, else by [`gemm_f32`] for f32, else candle's matmul.
struct Product;

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n, k) = mnk(l1, l2)?;
        let bf16 = amx::enabled()
            .then(|| bf16_storage(s1, l1, s2, l2))
            .flatten();
        let f32 = || match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => gemm_f32(a, l1, b, l2).map(CpuStorage::F32),
            _ => None,
        };
        let y = match bf16.or_else(f32) {
            Some(y) => y,
            None => s1.matmul(s2, (1, m, n, k), l1, l2)?,
        };
        Ok((y, Shape::from((m, n))))
    }
}

/// The product of two 2-D f32 operands on a bf16 kernel (see [`amx::matmul`]); `None`
/// for another dtype or where no kernel can take them.
fn bf16_storage(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Option<CpuStorage> {
    let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
        return None;
    };
    let (a, b) = (amx::View::of_layout(a, l1)?, amx::View::of_layout(b, l2)?);
    amx::matmul(a, b).map(CpuStorage::F32)
}

/// `x · Wᵀ` through quantized blocks when `x` `(..., in)` has at most
/// [`MAX_ROWS`](super::gemv::MAX_ROWS) rows: a decode step, bound by reading the weight,
/// which the blocks make 3-6 times smaller. `None` for more rows: a prefill is bound by
/// arithmetic, where the dense f32 weight's packed matmul is faster than candle's 8-bit
/// kernels on this CPU (about 500 against 30-160 tokens/s on SmolLM2). Q4_1 and Q8_0
/// blocks on the CPU go through [`gemv_blocks`](super::qgemv::gemv_blocks), other types
/// through candle's `QMatMul`.
pub(crate) fn blocks_product(q: &QMatMul, x: &Tensor) -> Result<Option<Tensor>> {
    let inp = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / inp.max(1);
    if rows > super::gemv::MAX_ROWS {
        return Ok(None);
    }
    let x = x.contiguous()?;
    if let QMatMul::QTensor(blocks) = q {
        use super::qgemv::{gemv_blocks, Format, BLOCK};
        let format = match blocks.dtype() {
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        };
        let (n, k) = blocks.shape().dims2()?;
        let data = blocks.data()?;
        let ours = format.filter(|f| {
            x.device().is_cpu()
                && x.dtype() == candle_core::DType::F32
                && k == inp
                && k % BLOCK == 0
                && data.len() == n * k / BLOCK * f.block_bytes()
        });
        if let Some(format) = ours {
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let y = gemv_blocks(&xs, rows, k, &data, n, format);
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = n;
            }
            return Ok(Some(Tensor::from_vec(y, dims, x.device())?));
        }
    }
    Ok(Some(q.forward(&x)?))
}

/// Checks that `blocks` hold a matrix of `weight`'s shape `(out, in)`.
///
/// Errors: [`crate::Error::ShapeMismatch`] naming `name` and both shapes.
pub(crate) fn check_block_shape(name: &str, blocks: &QTensor, weight: &Tensor) -> Result<()> {
    if blocks.shape().dims() == weight.dims() {
        return Ok(());
    }
    Err(crate::Error::ShapeMismatch {
        name: name.to_string(),
        expected: weight.dims().to_vec(),
        found: blocks.shape().dims().to_vec(),
    })
}

/// A bias-free projection: a weight `(out, in)` (frozen or trainable) and, when a
/// conversion heals its base model, a low-rank [`Adapter`](super::lora::Adapter) beside it;
/// for inference, the weight may also be held as quantized blocks ([`quantize`]).
///
/// [`quantize`]: Projection::quantize
#[derive(Debug, Clone)]
pub struct Projection {
    /// The weight `(out, in)` (the dense values, also when quantized blocks are used).
    pub weight: Tensor,
    /// The LoRA adapter, if one is attached.
    pub adapter: Option<super::lora::Adapter>,
    /// The weight as GGML blocks (Q4_1, Q8_0, ...): forward multiplies by them instead.
    quantized: Option<QMatMul>,
}

impl Projection {
    /// Loads `{vb}.weight` of shape `(out, in)`.
    ///
    /// Errors: [`crate::Error::Candle`] when the tensor is missing or misshapen.
    pub fn load(vb: candle_nn::VarBuilder, out: usize, inp: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out, inp), "weight")?,
            adapter: None,
            quantized: None,
        })
    }

    /// Holds the weight as GGML blocks of `dtype` (quantized from the dense weight, with
    /// the adapter merged in) and multiplies inputs of at most 8 rows (decode steps) by
    /// them from now on (the crate's Q4_1 / Q8_0 kernels, or candle's `QMatMul`); larger
    /// inputs keep the dense weight.
    /// Inference only: the product has no gradient. The dense weight is kept.
    ///
    /// Errors: [`crate::Error::Candle`] when `in` is not a multiple of the type's block
    /// size (32 for Q4_0 / Q4_1 / Q8_0, 256 for the K-quants).
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        let weight = self.merged_weight()?.to_dtype(candle_core::DType::F32)?;
        self.quantized = Some(QMatMul::from_qtensor(QTensor::quantize(&weight, dtype)?)?);
        Ok(())
    }

    /// Multiplies by `blocks` (GGML blocks of this weight, e.g. a GGUF file's own) from now
    /// on, as [`quantize`](Self::quantize) does with blocks it makes.
    ///
    /// Errors: [`crate::Error::ShapeMismatch`] unless `blocks` is `(out, in)` like the
    /// weight; [`crate::Error::InvalidArgument`] when an adapter is attached (the blocks
    /// could not hold it).
    pub fn use_blocks(&mut self, name: &str, blocks: std::sync::Arc<QTensor>) -> Result<()> {
        check_block_shape(name, &blocks, &self.weight)?;
        if self.adapter.is_some() {
            return Err(crate::Error::InvalidArgument(format!(
                "{name}: a projection with a LoRA adapter cannot take stored blocks"
            )));
        }
        self.quantized = Some(QMatMul::from_arc(blocks)?);
        Ok(())
    }

    /// `x·Wᵀ (+ adapter)`: `x` `(..., in)` -> `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.quantized {
            // The blocks hold the adapter already.
            if let Some(y) = blocks_product(q, x)? {
                return Ok(y);
            }
        }
        let y = linear(x, &self.weight)?;
        match &self.adapter {
            None => Ok(y),
            Some(adapter) => {
                let dims = y.dims().to_vec();
                let inp = x.dim(candle_core::D::Minus1)?;
                let low = adapter.forward(&x.reshape(((), inp))?)?;
                Ok((y + low.reshape(dims)?)?)
            }
        }
    }

    /// Attaches a LoRA adapter read or created from `vb` (`...q_proj`: `lora_a`, `lora_b`).
    ///
    /// Errors: [`crate::Error::Candle`] when a stored adapter tensor is misshapen.
    pub fn attach_lora(
        &mut self,
        vb: candle_nn::VarBuilder,
        cfg: &super::lora::LoraConfig,
    ) -> Result<()> {
        let (out, inp) = self.weight.dims2()?;
        self.adapter = Some(super::lora::Adapter::load(vb, out, inp, cfg)?);
        Ok(())
    }

    /// The weight with the adapter (if any) merged in, `(out, in)` in the weight's dtype.
    pub fn merged_weight(&self) -> Result<Tensor> {
        match &self.adapter {
            None => Ok(self.weight.clone()),
            Some(adapter) => adapter.merge_into(&self.weight),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gemv::tests::{assert_is_the_product, operands};
    use candle_core::{Device, Var};

    /// `dL/d var` for `L = Σ y ⊙ r`, flattened.
    fn gradient(y: &Tensor, r: &Tensor, var: &Var) -> Vec<f32> {
        let loss = (y * r).and_then(|l| l.sum_all()).unwrap();
        let grads = loss.backward().unwrap();
        grads
            .get(var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// [`gemm_f32`] on the storage and layouts of two f32 CPU tensors.
    #[cfg(not(feature = "mkl"))]
    fn gemm_of(a: &Tensor, b: &Tensor) -> Option<Vec<f32>> {
        let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
        match (&*sa, &*sb) {
            (
                candle_core::Storage::Cpu(CpuStorage::F32(a)),
                candle_core::Storage::Cpu(CpuStorage::F32(b)),
            ) => gemm_f32(a, la, b, lb),
            _ => panic!("f32 CPU tensors expected"),
        }
    }

    #[test]
    #[cfg(not(feature = "mkl"))] // with MKL, gemm_f32 leaves every product to candle's sgemm
    fn gemm_writes_the_product_of_strided_operands() {
        // x (m, k) as stored and w (n, k) read as its transpose (k, n), both views into
        // larger buffers at an offset.
        let dev = Device::Cpu;
        for (m, k, n) in [(300, 70, 45), (9, 576, 192), (1, 3, 1)] {
            let (x, w) = operands(m, k, n);
            let view = |v: &[f32], rows: usize| {
                let big: Vec<f32> = [vec![7.0; 5], v.to_vec()].concat();
                let len = big.len();
                Tensor::from_vec(big, len, &dev)
                    .and_then(|t| t.narrow(0, 5, v.len()))
                    .and_then(|t| t.reshape((rows, k)))
                    .unwrap()
            };
            let y = gemm_of(&view(&x, m), &view(&w, n).t().unwrap()).expect("operands that fit");
            assert_is_the_product(&x, m, k, &w, n, &y);
        }
        // k = 0: every output is written, as zero.
        let (a, b) = (
            Tensor::zeros((4, 0), DType::F32, &dev).unwrap(),
            Tensor::zeros((0, 3), DType::F32, &dev).unwrap(),
        );
        assert_eq!(gemm_of(&a, &b), Some(vec![0.0; 12]));
        // A layout whose strides reach past its slice is refused, not read.
        let short = Layout::contiguous_with_offset((2, 3), 1);
        let fits = Layout::contiguous((3, 2));
        assert_eq!(gemm_f32(&[0.0; 6], &short, &[0.0; 6], &fits), None);
    }

    #[test]
    fn a_trainable_weight_gets_the_product_as_its_gradient() {
        // dL/dW for L = Σ (x · Wᵀ) ⊙ R is Rᵀ · x: the shared f64 check with rows of W as
        // outputs, Rᵀ (n, m) times x (m, k), i.e. Rᵀ · (xᵀ)ᵀ.
        let (m, k, n) = (300, 70, 45);
        let (x, w) = operands(m, k, n);
        let dev = Device::Cpu;
        let weight = Var::from_vec(w, (n, k), &dev).unwrap();
        let xs = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
        let (r, _) = operands(m, n, 1);
        let rt = Tensor::from_vec(r.clone(), (m, n), &dev).unwrap();
        let dw = gradient(&linear(&xs, weight.as_tensor()).unwrap(), &rt, &weight);
        let r_t: Vec<f32> = (0..n * m).map(|i| r[(i % m) * n + i / m]).collect();
        let x_t: Vec<f32> = (0..k * m).map(|i| x[(i % m) * k + i / m]).collect();
        assert_is_the_product(&r_t, n, m, &x_t, k, &dw);
    }

    #[test]
    fn the_input_gradient_through_a_frozen_weight_is_the_product_computed_in_f64() {
        // Inputs of a decode step's, a prompt's and a batch's size (the forward takes the
        // matrix-vector kernels, the outer products and gemm): dL/dx for
        // L = Σ (x · Wᵀ) ⊙ R is R · W.
        let (k, n) = (70, 45);
        let value = |i: usize, salt: usize| ((i * 7919 + salt) % 1999) as f32 / 999.5 - 1.0;
        let w: Vec<f32> = (0..n * k).map(|i| value(i, 3)).collect();
        let weight = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        // R (m, n) · W (n, k) is R · (Wᵀ)ᵀ: the shared f64 check of x · wᵀ with w = Wᵀ.
        let w_t: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        for m in [3, 64, 300] {
            let x = Var::from_vec(
                (0..m * k).map(|i| value(i, 11)).collect(),
                (m, k),
                &Device::Cpu,
            )
            .unwrap();
            let r: Vec<f32> = (0..m * n).map(|i| value(i, 29)).collect();
            let r_t = Tensor::from_vec(r.clone(), (m, n), &Device::Cpu).unwrap();
            let dx = gradient(&linear(x.as_tensor(), &weight).unwrap(), &r_t, &x);
            crate::model::gemv::tests::assert_is_the_product(&r, m, n, &w_t, k, &dx);
        }
    }
}
