//! The prefix softmax (the GPU's masked attention softmax) on the CPU, where it is the
//! reference of its CUDA kernels (`tests/cuda.rs`): its forward against softmax computed
//! from its definition in f64, its backward against central finite differences.

mod common;
#[path = "common/tiny.rs"]
mod tiny;

use candle_core::{DType, Device, Tensor, Var};
use modification::model::prefix_softmax::prefix_softmax;
use modification::Error;

/// Batch rows, query heads per row (KV heads × group), queries per row, key slots.
const B: usize = 2;
const H: usize = 2;
const G: usize = 3;
const T: usize = 5;
const TK: usize = 7;
const SCALE: f32 = 0.35;

/// Visible-key counts, `B·T`: a full row, a single key, and 0 (a padding slot).
fn counts() -> Vec<usize> {
    vec![1, 2, 3, 7, 0, 7, 6, 1, 4, 5]
}

fn scores(seed: u64) -> Vec<f64> {
    tiny::values(B * H * G * T * TK, seed, 3.0)
        .into_iter()
        .map(f64::from)
        .collect()
}

/// The probabilities from the definition: row `(b, h, g·T + t)` is query t of row b.
fn expected(s: &[f64], counts: &[usize]) -> Vec<f64> {
    let mut p = vec![0.0; s.len()];
    for (row, (s, p)) in s.chunks(TK).zip(p.chunks_mut(TK)).enumerate() {
        let n = counts[(row / (H * G * T)) * T + row % T];
        let z: f64 = s[..n].iter().map(|v| (v * SCALE as f64).exp()).sum();
        for j in 0..n {
            p[j] = (s[j] * SCALE as f64).exp() / z;
        }
    }
    p
}

#[test]
fn forward_equals_the_definition() -> anyhow::Result<()> {
    let s = scores(1);
    let t = Tensor::from_vec(s.clone(), (B, H, G * T, TK), &Device::Cpu)?;
    let got: Vec<f64> = prefix_softmax(&t, &counts(), T, SCALE)?
        .flatten_all()?
        .to_vec1()?;
    let want = expected(&s, &counts());
    let diff = (got.iter().zip(&want))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-12, "largest difference {diff}");
    // Rows of query 4 of batch row 0 see no key: all zero.
    for h in 0..H * G {
        let row = h * T + 4;
        assert!(got[row * TK..(row + 1) * TK].iter().all(|&v| v == 0.0));
    }
    // f32 within rounding of the f64 values.
    let got32: Vec<f32> = prefix_softmax(&t.to_dtype(DType::F32)?, &counts(), T, SCALE)?
        .flatten_all()?
        .to_vec1()?;
    let diff = (got32.iter().zip(&want))
        .map(|(&a, b)| (a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-6, "f32: largest difference {diff}");
    Ok(())
}

#[test]
fn backward_equals_finite_differences() -> anyhow::Result<()> {
    let s = scores(2);
    let r = scores(3);
    let weights = Tensor::from_vec(r.clone(), (B, H, G * T, TK), &Device::Cpu)?;
    let var = Var::from_tensor(&Tensor::from_vec(
        s.clone(),
        (B, H, G * T, TK),
        &Device::Cpu,
    )?)?;
    let loss = (prefix_softmax(var.as_tensor(), &counts(), T, SCALE)? * &weights)?.sum_all()?;
    let grad: Vec<f64> = loss
        .backward()?
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()?
        .to_vec1()?;
    // L(s) = Σ P(s) ⊙ R from the definition, differentiated numerically.
    let objective = |s: &[f64]| -> f64 {
        expected(s, &counts())
            .iter()
            .zip(&r)
            .map(|(p, w)| p * w)
            .sum()
    };
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for i in 0..s.len() {
        let (mut up, mut down) = (s.clone(), s.clone());
        up[i] += h;
        down[i] -= h;
        let numeric = (objective(&up) - objective(&down)) / (2.0 * h);
        worst = worst.max((numeric - grad[i]).abs());
    }
    assert!(worst < 1e-7, "largest gradient difference {worst}");
    Ok(())
}

#[test]
fn misfit_counts_are_typed_errors() -> anyhow::Result<()> {
    let t = Tensor::zeros((B, H, G * T, TK), DType::F32, &Device::Cpu)?;
    let short = &counts()[1..];
    assert!(matches!(
        prefix_softmax(&t, short, T, SCALE),
        Err(Error::InvalidArgument(_))
    ));
    let mut beyond = counts();
    beyond[3] = TK + 1;
    assert!(matches!(
        prefix_softmax(&t, &beyond, T, SCALE),
        Err(Error::InvalidArgument(_))
    ));
    // Queries a row that do not divide the score rows.
    assert!(matches!(
        prefix_softmax(&t, &counts(), 4, SCALE),
        Err(Error::InvalidArgument(_))
    ));
    // The row maximum is taken over raw scores: a scale must be positive and finite.
    for scale in [0.0, -0.5, f32::NAN, f32::INFINITY] {
        let got = prefix_softmax(&t, &counts(), T, scale);
        assert!(
            matches!(got, Err(Error::InvalidArgument(_))),
            "scale {scale}"
        );
    }
    Ok(())
}

#[test]
fn empty_scores_give_empty_probabilities() -> anyhow::Result<()> {
    let t = Tensor::zeros((B, H, G * T, 0), DType::F32, &Device::Cpu)?;
    let p = prefix_softmax(&t, &[0; B * T], T, SCALE)?;
    assert_eq!(p.dims(), &[B, H, G * T, 0]);
    Ok(())
}

/// `softmax(scale · q·Kᵀ + mask)·V` composed from candle's ops, the prefix counts as an
/// additive mask (a padding slot's row masked entirely, then zeroed).
fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, counts: &[usize]) -> Tensor {
    let (b, n_kv, gq, _) = q.dims4().unwrap();
    let tk = k.dim(2).unwrap();
    let t = counts.len() / b;
    let mut mask = Vec::with_capacity(b * n_kv * gq * tk);
    let mut seen = Vec::with_capacity(b * n_kv * gq);
    for row in 0..b * n_kv * gq {
        let n = counts[(row / (n_kv * gq)) * t + row % t];
        mask.extend((0..tk).map(|j| if j < n { 0.0 } else { -1e9 }));
        seen.push(if n > 0 { 1.0 } else { 0.0 });
    }
    let mask = Tensor::from_vec(mask, (b, n_kv, gq, tk), &Device::Cpu).unwrap();
    let seen = Tensor::from_vec(seen, (b, n_kv, gq, 1), &Device::Cpu).unwrap();
    let scores = ((q.matmul(&k.t().unwrap()).unwrap() * SCALE as f64).unwrap() + mask).unwrap();
    let p = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
    p.broadcast_mul(&seen).unwrap().matmul(v).unwrap()
}

/// The GPU's training attention, checked on the CPU (f64) against the composed masked
/// attention: output and the gradients of q, K and V, with query groups, a padding slot
/// and keys of another row length than the queries.
#[test]
fn recomputed_attention_equals_the_composed_attention() -> anyhow::Result<()> {
    use modification::model::recomputed_attention::recomputed_prefix_attention;
    let (n_kv, hd) = (H, 4);
    let tensor = |dims: (usize, usize, usize, usize), seed| -> anyhow::Result<Var> {
        let n = dims.0 * dims.1 * dims.2 * dims.3;
        let v: Vec<f64> = tiny::values(n, seed, 1.5)
            .into_iter()
            .map(f64::from)
            .collect();
        Ok(Var::from_tensor(&Tensor::from_vec(v, dims, &Device::Cpu)?)?)
    };
    let run = |fused: bool| -> anyhow::Result<Vec<Vec<f64>>> {
        let q = tensor((B, n_kv, G * T, hd), 11)?;
        let k = tensor((B, n_kv, TK, hd), 12)?;
        let v = tensor((B, n_kv, TK, hd), 13)?;
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let out = match fused {
            true => recomputed_prefix_attention(qt, kt, vt, &counts(), SCALE)?,
            false => composed_attention(qt, kt, vt, &counts()),
        };
        let probe: Vec<f64> = (tiny::values(out.elem_count(), 14, 1.0).into_iter())
            .map(f64::from)
            .collect();
        let probe = Tensor::from_vec(probe, out.dims(), &Device::Cpu)?;
        let grads = (&out * &probe)?.sum_all()?.backward()?;
        let mut values = vec![out.flatten_all()?.to_vec1()?];
        for var in [&q, &k, &v] {
            let g = grads.get(var.as_tensor()).expect("a gradient");
            values.push(g.flatten_all()?.to_vec1()?);
        }
        Ok(values)
    };
    let (got, want) = (run(true)?, run(false)?);
    for (what, (g, w)) in ["output", "dq", "dk", "dv"]
        .iter()
        .zip(got.iter().zip(&want))
    {
        let diff = (g.iter().zip(w))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.1, "{what}: the reference is all but zero");
        assert!(
            diff < 1e-12 * scale.max(1.0),
            "{what}: largest difference {diff}"
        );
    }
    // A padding slot (query 4 of row 0) gets a zero output.
    let out = &got[0];
    for h in 0..n_kv * G {
        let slot = h * T + 4;
        assert!(
            out[slot * hd..][..hd].iter().all(|&x| x == 0.0),
            "padding slot {slot}"
        );
    }
    Ok(())
}

#[test]
fn recomputed_attention_rejects_misfit_inputs() -> anyhow::Result<()> {
    use modification::model::recomputed_attention::recomputed_prefix_attention;
    let q = Tensor::zeros((B, H, G * T, 4), DType::F32, &Device::Cpu)?;
    let k = Tensor::zeros((B, H, TK, 4), DType::F32, &Device::Cpu)?;
    let short = Tensor::zeros((B, H, TK - 1, 4), DType::F32, &Device::Cpu)?;
    let mut too_many = counts();
    too_many[0] = TK + 1;
    for (what, result) in [
        (
            "K and V of different lengths",
            recomputed_prefix_attention(&q, &k, &short, &counts(), SCALE),
        ),
        (
            "a count above the keys",
            recomputed_prefix_attention(&q, &k, &k, &too_many, SCALE),
        ),
        (
            "a count missing",
            recomputed_prefix_attention(&q, &k, &k, &counts()[1..], SCALE),
        ),
        (
            "a zero scale",
            recomputed_prefix_attention(&q, &k, &k, &counts(), 0.0),
        ),
    ] {
        assert!(
            matches!(result, Err(Error::InvalidArgument(_))),
            "{what}: {result:?}"
        );
    }
    Ok(())
}

/// No key (or no query): zeros of the queries' shape, not a panic.
#[test]
fn recomputed_attention_without_keys_is_zero() -> anyhow::Result<()> {
    use modification::model::recomputed_attention::recomputed_prefix_attention;
    let q = Tensor::ones((B, H, G * T, 4), DType::F32, &Device::Cpu)?;
    let none = Tensor::zeros((B, H, 0, 4), DType::F32, &Device::Cpu)?;
    let out = recomputed_prefix_attention(&q, &none, &none, &[0; B * T], SCALE)?;
    assert_eq!(out.dims(), q.dims());
    assert_eq!(out.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}
