//! The linear layers' products, f32 and bf16 (AMX tiles or AVX512-BF16 dot products,
//! whichever the CPU has): forward and both gradients (the weight's only where it
//! trains) equal the products of the operands, bf16-rounded for bf16, summed in f64 (to
//! f32 summation error), and a precision scope ends where its guard is dropped. Where the
//! CPU has no bf16 kernel, bf16 products stay f32, and the tests check that instead.

use candle_core::{Device, Tensor, Var};
use modification::model::amx::{
    bf16_kernel, f32_matmul_precision, precision_scope, MatmulPrecision,
};
use modification::model::linear::linear;

/// `x` rounded to bf16 (to nearest, ties to even) and back, as f64.
fn bf16(x: f32) -> f64 {
    half::bf16::from_f32(x).to_f64()
}

/// `a · b` for row-major `a` `(m, k)` and `b` `(k, n)`, each operand rounded first when
/// `round`; also the sums of the products' magnitudes (the scale of the rounding error).
fn reference(
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    round: bool,
) -> (Vec<f64>, Vec<f64>) {
    let r = |x: f32| if round { bf16(x) } else { x as f64 };
    let (mut out, mut scale) = (vec![0.0; m * n], vec![0.0; m * n]);
    for i in 0..m {
        for j in 0..n {
            for l in 0..k {
                let p = r(a[i * k + l]) * r(b[l * n + j]);
                out[i * n + j] += p;
                scale[i * n + j] += p.abs();
            }
        }
    }
    (out, scale)
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| a[(i % rows) * cols + i / rows])
        .collect()
}

fn assert_close(name: &str, got: &[f32], want: &(Vec<f64>, Vec<f64>), k: usize) {
    assert_eq!(got.len(), want.0.len(), "{name}: length");
    for (i, (&g, (&w, &s))) in got.iter().zip(want.0.iter().zip(&want.1)).enumerate() {
        // f32 sums of k exact products err by at most k·2⁻²⁴ of their magnitudes.
        let bound = k as f64 * 6e-8 * s + 1e-30;
        assert!(
            (g as f64 - w).abs() <= bound,
            "{name}[{i}]: {g} against {w} (bound {bound})"
        );
    }
}

#[test]
fn linear_layers_forward_and_gradients_equal_the_products_in_f64() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    // Odd sizes (padding of rows, columns and the reduction), a loss chunk-like shape, and
    // more than 256 rows (the packed `gemm` path in f32); inputs of rank 3.
    for &(m, k, n) in &[(9, 33, 17), (64, 96, 48), (130, 70, 200), (300, 40, 24)] {
        for precision in [MatmulPrecision::Highest, MatmulPrecision::Bf16] {
            for trainable in [true, false] {
                let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let x_var = Var::from_tensor(&x)?;
                let w_var = Var::from_tensor(&w)?;
                let weight = match trainable {
                    true => w_var.as_tensor().clone(),
                    false => w.clone(),
                };
                // A fixed incoming gradient through a weighted sum.
                let g = Tensor::randn(0f32, 1.0, (1, m, n), &dev)?;
                let (y, grads) = {
                    let _scope = precision_scope(precision);
                    let y = linear(x_var.as_tensor(), &weight)?;
                    let grads = (&y * &g)?.sum_all()?.backward()?;
                    (y, grads)
                };
                let dx = grads.get(x_var.as_tensor()).expect("input gradient");
                let (xs, ws, gs) = (
                    x.flatten_all()?.to_vec1::<f32>()?,
                    w.flatten_all()?.to_vec1::<f32>()?,
                    g.flatten_all()?.to_vec1::<f32>()?,
                );
                let round = precision == MatmulPrecision::Bf16 && bf16_kernel().is_some();
                let case = format!("{precision:?}, trainable {trainable}, ({m}, {k}, {n})");
                // y = x · wᵀ; dx = g · w; dwᵀ = xᵀ · g.
                let want_y = reference(&xs, &transpose(&ws, n, k), (m, k, n), round);
                let want_dx = reference(&gs, &ws, (m, n, k), round);
                assert_close(
                    &format!("y {case}"),
                    &y.flatten_all()?.to_vec1()?,
                    &want_y,
                    k,
                );
                assert_close(
                    &format!("dx {case}"),
                    &dx.flatten_all()?.to_vec1()?,
                    &want_dx,
                    n,
                );
                match grads.get(w_var.as_tensor()) {
                    Some(dw) => {
                        assert!(trainable, "{case}: a frozen weight got a gradient");
                        assert_eq!(dw.dims(), &[n, k], "{case}: the weight's own layout");
                        let want = reference(&transpose(&xs, m, k), &gs, (k, m, n), round);
                        let dw_t = dw.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                        assert_close(&format!("dw {case}"), &dw_t, &want, m);
                    }
                    None => assert!(!trainable, "{case}: no weight gradient"),
                }
            }
        }
    }
    Ok(())
}

#[test]
fn bf16_products_differ_from_f32_only_by_rounding_the_operands() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (m, k, n) = (40, 576, 64);
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
    let f32_y = linear(&x, &w)?.flatten_all()?.to_vec1::<f32>()?;
    let bf16_y = {
        let _bf16 = precision_scope(MatmulPrecision::Bf16);
        linear(&x, &w)?.flatten_all()?.to_vec1::<f32>()?
    };
    let largest_change = f32_y
        .iter()
        .zip(&bf16_y)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    if bf16_kernel().is_some() {
        // bf16 keeps 8 significant bits: sums of 576 products of unit normals (about 24 in
        // size) move by about 0.1, and never by as much as 2.
        assert!(largest_change > 1e-3, "the products did not run in bf16");
        assert!(
            largest_change < 2.0,
            "bf16 products off by {largest_change}"
        );
    } else {
        assert_eq!(
            largest_change, 0.0,
            "without a bf16 kernel the products stay f32"
        );
    }
    Ok(())
}

#[test]
fn a_precision_scope_ends_with_its_guard() {
    let before = f32_matmul_precision();
    {
        let _outer = precision_scope(MatmulPrecision::Bf16);
        assert_eq!(f32_matmul_precision(), MatmulPrecision::Bf16);
        {
            let _inner = precision_scope(MatmulPrecision::Highest);
            assert_eq!(f32_matmul_precision(), MatmulPrecision::Highest);
        }
        assert_eq!(f32_matmul_precision(), MatmulPrecision::Bf16);
        // Another thread keeps the process-wide setting.
        let elsewhere = std::thread::spawn(f32_matmul_precision).join().unwrap();
        assert_eq!(elsewhere, MatmulPrecision::Highest);
    }
    assert_eq!(f32_matmul_precision(), before);
}
