//! The fused (inference) and composed (differentiable) paths of the model's ops agree, and
//! the composed path carries gradients.

mod common;

use candle_core::{Device, Tensor, Var};
use modification::model::ops;

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 6.0)
        .collect()
}

#[test]
fn rms_norm_fused_and_differentiable_paths_agree_and_only_the_latter_has_a_gradient() {
    let x = Tensor::from_vec(data(2 * 3 * 16), (2, 3, 16), &Device::Cpu).unwrap();
    let w = Tensor::from_vec(data(16), 16, &Device::Cpu).unwrap();
    let fused = ops::rms_norm(&x, &w, 1e-5).unwrap();
    // Independent value for one row: x / sqrt(mean(x^2) + eps) * w.
    let row: Vec<f32> = x.flatten_all().unwrap().to_vec1::<f32>().unwrap()[..16].to_vec();
    let ms = row.iter().map(|v| v * v).sum::<f32>() / 16.0;
    let wv: Vec<f32> = w.to_vec1().unwrap();
    let got: Vec<f32> = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap()[..16].to_vec();
    for i in 0..16 {
        let want = row[i] / (ms + 1e-5).sqrt() * wv[i];
        assert!((got[i] - want).abs() < 1e-5, "{i}: {} vs {want}", got[i]);
    }
    let xv = Var::from_tensor(&x).unwrap();
    let slow = ops::rms_norm(xv.as_tensor(), &w, 1e-5).unwrap();
    assert!(common::max_diff(&fused, &slow) < 1e-5);
    let grads = slow.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(xv.as_tensor()).is_some());
}

#[test]
fn softmax_fused_and_differentiable_paths_agree() {
    let x = Tensor::from_vec(data(4 * 33), (4, 33), &Device::Cpu).unwrap();
    let fused = ops::softmax_last_dim(&x).unwrap();
    let sums: Vec<f32> = fused.sum(1).unwrap().to_vec1().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    let xv = Var::from_tensor(&x).unwrap();
    let slow = ops::softmax_last_dim(xv.as_tensor()).unwrap();
    assert!(common::max_diff(&fused, &slow) < 1e-6);
    let picked = slow.narrow(1, 0, 1).unwrap().sum_all().unwrap();
    let g = picked.backward().unwrap();
    let gx = g
        .get(xv.as_tensor())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(gx > 0.0);
}
