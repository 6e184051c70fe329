//! The fused element-wise kernels (RMSNorm, SwiGLU, RoPE) against candle's composed ops
//! and against finite differences, and a whole model's gradients through every fused
//! kernel against the composed path.

mod common;
#[path = "common/tiny.rs"]
mod tiny;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use modification::loss::chunked_objective;
use modification::model::fused;
use modification::{Batch, Error, Llama, ModConfig, ModModel, Mode};
use std::collections::HashMap;

fn tensor(dims: &[usize], seed: u64, scale: f32, dtype: DType) -> Tensor {
    let n = dims.iter().product();
    let t = Tensor::from_vec(tiny::values(n, seed, scale), dims, &Device::Cpu).unwrap();
    t.to_dtype(dtype).unwrap()
}

/// Largest `|a − b|` relative to the largest `|b|`.
fn relative_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let (a, b): (Vec<f64>, Vec<f64>) = (a.to_vec1().unwrap(), b.to_vec1().unwrap());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// cos/sin tables `(B, T, hd/2)` at positions `0, 3, 6, ...` per row (gaps, as routing
/// leaves), base 10000.
fn rope_tables(b: usize, t: usize, hd: usize, dtype: DType) -> (Tensor, Tensor) {
    let half = hd / 2;
    let angles: Vec<f64> = (0..b * t * half)
        .map(|i| {
            let (pos, k) = ((i / half) % t * 3 + i / (t * half), i % half);
            pos as f64 * 10000f64.powf(-2.0 * k as f64 / hd as f64)
        })
        .collect();
    let table = |f: fn(f64) -> f64| {
        let v: Vec<f64> = angles.iter().map(|&a| f(a)).collect();
        (Tensor::from_vec(v, (b, t, half), &Device::Cpu).unwrap())
            .to_dtype(dtype)
            .unwrap()
    };
    (table(f64::cos), table(f64::sin))
}

#[test]
fn forward_equals_the_composed_ops() {
    for dims in [vec![1, 1, 5], vec![3, 7, 13], vec![2, 17, 576]] {
        let d = dims[2];
        let x = tensor(&dims, 1, 3.0, DType::F32);
        let w = tensor(&[d], 2, 1.0, DType::F32);
        let got = fused::rms_norm(&x, &w, 1e-5).unwrap();
        let want = candle_nn::ops::rms_norm_slow(&x, &w, 1e-5).unwrap();
        assert!(relative_diff(&got, &want) < 1e-6, "RMSNorm {dims:?}");

        let (a, b) = (
            tensor(&dims, 3, 8.0, DType::F32),
            tensor(&dims, 4, 2.0, DType::F32),
        );
        let got = fused::swiglu(&a, &b).unwrap();
        let want = (candle_nn::ops::silu(&a).unwrap() * &b).unwrap();
        assert!(relative_diff(&got, &want) < 1e-6, "SwiGLU {dims:?}");
    }
    // RoPE against candle's own (forward-only) kernel: single token, odd sizes, LLaMA's.
    for (b, h, t, hd) in [(1, 1, 1, 4), (2, 3, 5, 6), (2, 9, 33, 64)] {
        let x = tensor(&[b, h, t, hd], 5, 2.0, DType::F32);
        let (cos, sin) = rope_tables(b, t, hd, DType::F32);
        let got = fused::rope(&x, &cos, &sin).unwrap();
        let want = candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
        assert!(relative_diff(&got, &want) < 1e-6, "RoPE {:?}", x.dims());
    }
}

/// `Σ op(inputs) ⊙ probe`: a scalar whose gradient is the op's backward of `probe`.
fn probed(out: &Tensor, probe: &Tensor) -> f64 {
    (out * probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Checks `op`'s gradient for every input element against central finite differences, in
/// f64.
fn check_gradients(name: &str, inputs: &[Tensor], op: &dyn Fn(&[Tensor]) -> Tensor) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&tracked);
    let probe = tensor(out.dims(), 99, 1.0, DType::F64);
    let grads = (&out * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let h = 1e-6;
    for (i, input) in inputs.iter().enumerate() {
        let analytic: Vec<f64> = (grads
            .get(&tracked[i])
            .unwrap_or_else(|| panic!("{name}: input {i} has no gradient")))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
        let base: Vec<f64> = input.flatten_all().unwrap().to_vec1().unwrap();
        for (j, &want_at) in analytic.iter().enumerate() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut moved = inputs.to_vec();
                moved[i] = Tensor::from_vec(v, input.dims(), &Device::Cpu).unwrap();
                probed(&op(&moved), &probe)
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (numeric - want_at).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "{name}: d/d input {i}[{j}]: backward {want_at}, finite difference {numeric}"
            );
        }
    }
}

#[test]
fn backward_matches_finite_differences_in_f64() {
    for dims in [vec![1, 5], vec![3, 2, 7]] {
        let d = *dims.last().unwrap();
        let inputs = [
            tensor(&dims, 6, 2.0, DType::F64),
            tensor(&[d], 7, 1.5, DType::F64),
        ];
        check_gradients("RMSNorm", &inputs, &|t| {
            fused::rms_norm(&t[0], &t[1], 1e-5).unwrap()
        });
    }
    for dims in [vec![1], vec![3, 5]] {
        let inputs = [
            tensor(&dims, 8, 6.0, DType::F64),
            tensor(&dims, 9, 2.0, DType::F64),
        ];
        check_gradients("SwiGLU", &inputs, &|t| fused::swiglu(&t[0], &t[1]).unwrap());
    }
    for (b, h, t, hd) in [(1, 1, 1, 4), (2, 3, 5, 6)] {
        let (cos, sin) = rope_tables(b, t, hd, DType::F64);
        let inputs = [tensor(&[b, h, t, hd], 10, 2.0, DType::F64)];
        check_gradients("RoPE", &inputs, &|x| {
            fused::rope(&x[0], &cos, &sin).unwrap()
        });
    }
}

#[test]
fn a_frozen_rms_norm_weight_gets_no_gradient() {
    let x = Var::from_tensor(&tensor(&[4, 9], 11, 1.0, DType::F32)).unwrap();
    let w = tensor(&[9], 12, 1.0, DType::F32);
    let y = fused::rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(&w).is_none());
}

#[test]
fn mismatched_operands_are_typed_errors() {
    let f32_ = |dims: &[usize]| tensor(dims, 1, 1.0, DType::F32);
    let cases = [
        fused::rms_norm(&f32_(&[2, 8]), &f32_(&[7]), 1e-5),
        fused::rms_norm(&f32_(&[2, 8]), &tensor(&[8], 1, 1.0, DType::F64), 1e-5),
        fused::swiglu(&f32_(&[2, 8]), &f32_(&[8, 2])),
        fused::rope(&f32_(&[1, 2, 3, 4]), &f32_(&[1, 3, 3]), &f32_(&[1, 3, 3])),
        fused::rope(&f32_(&[1, 2, 3, 5]), &f32_(&[1, 3, 2]), &f32_(&[1, 3, 2])),
    ];
    for (i, case) in cases.into_iter().enumerate() {
        assert!(
            matches!(case, Err(Error::InvalidArgument(_))),
            "case {i}: {case:?}"
        );
    }
}

/// Every weight of the tiny routed model as a `Var` of `dtype`, and the model over them.
fn model_over_vars(dtype: DType) -> (ModModel, Vec<(String, Var)>) {
    let cfg = tiny::config(3);
    let mut weights = tiny::weights(&cfg);
    // The default config routes the odd layers: layer 1 of 3.
    let config = ModConfig::default();
    let routed = config.routed_layer_indices(3).unwrap();
    weights.extend(tiny::router_tensors(&routed, 0.3, 0.2));
    let vars: Vec<(String, Var)> = (weights.into_iter())
        .map(|(name, t)| (name, Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()))
        .collect();
    let tensors: HashMap<String, Tensor> = (vars.iter())
        .map(|(name, v)| (name.clone(), v.as_tensor().clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
    let llama = Llama::load(vb.clone(), &cfg).unwrap();
    let model = ModModel::new(llama, config, vb).unwrap();
    (model, vars)
}

#[test]
fn whole_model_gradients_equal_those_of_the_composed_ops() {
    // f32 runs every fused kernel (RMSNorm, RoPE, SwiGLU, prefix attention, token
    // losses); f64 runs candle's composed ops throughout.
    let rows = vec![tiny::ids(40, 1), tiny::ids(33, 2)];
    let mut grads_by_dtype = Vec::new();
    for dtype in [DType::F32, DType::F64] {
        let (model, vars) = model_over_vars(dtype);
        let batch = Batch::from_rows(&rows, 0, 64, &Device::Cpu).unwrap();
        let out = model.forward_hidden(&batch, Mode::Training).unwrap();
        let terms =
            chunked_objective(model.base(), &out.hidden, None, batch.ids(), batch.valid()).unwrap();
        let loss = terms.lm_loss().unwrap();
        let grads = loss.backward().unwrap();
        let by_name: HashMap<String, Tensor> = (vars.iter())
            .map(|(name, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient"));
                (name.clone(), g.clone())
            })
            .collect();
        grads_by_dtype.push(by_name);
    }
    let (fused_grads, composed_grads) = (&grads_by_dtype[0], &grads_by_dtype[1]);
    assert_eq!(fused_grads.len(), composed_grads.len());
    for (name, want) in composed_grads {
        let got = &fused_grads[name];
        let diff = (got.to_dtype(DType::F64).unwrap() - want).unwrap();
        let (err, scale) = (common::l2_norm(&diff), common::l2_norm(want));
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(
            err <= 1e-4 * scale,
            "{name}: relative gradient error {}",
            err / scale
        );
    }
}
