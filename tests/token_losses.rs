//! The fused per-token NLL and KL equal the composed log-softmax ops, in value and in the
//! gradient of the student logits.

mod common;

use candle_core::{Device, IndexOp, Tensor, Var, D};
use modification::model::token_losses::token_losses;

/// Deterministic logits in [-6, 6).
fn logits(n: usize, vocab: usize, seed: usize) -> Tensor {
    let v: Vec<f32> = (0..n * vocab)
        .map(|i| (((i + 7919 * seed) as f32 * 0.618_034).fract() - 0.5) * 12.0)
        .collect();
    Tensor::from_vec(v, (n, vocab), &Device::Cpu).unwrap()
}

#[test]
fn token_losses_equal_the_composed_ops_with_and_without_a_teacher() {
    // Vocabulary sizes below, at and above a whole number of 16-lane vectors.
    for (n, vocab) in [(5usize, 37usize), (3, 64), (1, 1000)] {
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 13 + 2) % vocab as u32).collect();
        let student = Var::from_tensor(&logits(n, vocab, 1)).unwrap();
        let teacher = logits(n, vocab, 2);
        // Weights on the two outputs, so that both gradients matter.
        let w = Tensor::from_vec(vec![0.7f32, 1.3], 2, &Device::Cpu).unwrap();
        for with_teacher in [false, true] {
            let what = format!("{n} × {vocab}, teacher {with_teacher}");
            let fused = token_losses(
                student.as_tensor(),
                with_teacher.then_some(&teacher),
                &targets,
            )
            .unwrap();
            // Composed: log-softmax, the target's pick, the KL.
            let log_s = candle_nn::ops::log_softmax(student.as_tensor(), D::Minus1).unwrap();
            let tg = Tensor::from_vec(targets.clone(), (n, 1), &Device::Cpu).unwrap();
            let nll = log_s
                .gather(&tg, 1)
                .unwrap()
                .squeeze(1)
                .unwrap()
                .neg()
                .unwrap();
            let kl = if with_teacher {
                let log_t = candle_nn::ops::log_softmax(&teacher, D::Minus1).unwrap();
                (log_t.exp().unwrap() * (&log_t - &log_s).unwrap())
                    .unwrap()
                    .sum(D::Minus1)
                    .unwrap()
            } else {
                Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap()
            };
            let composed = Tensor::stack(&[&nll, &kl], 1).unwrap();
            assert!(
                common::max_diff(&fused, &composed) < 1e-4,
                "{what}: values {fused} against {composed}"
            );
            let grad = |out: &Tensor| {
                let total = out.broadcast_mul(&w).unwrap().sum_all().unwrap();
                total
                    .backward()
                    .unwrap()
                    .get(student.as_tensor())
                    .unwrap()
                    .clone()
            };
            let (gf, gc) = (grad(&fused), grad(&composed));
            assert!(
                common::max_diff(&gf, &gc) < 1e-5,
                "{what}: gradients differ by {}",
                common::max_diff(&gf, &gc)
            );
            // The gradient of a row sums to 0 (softmax minus a distribution).
            let row: f32 = gf.i(0).unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(row.abs() < 1e-5, "{what}: row gradient sums to {row}");
        }
    }
}

#[test]
fn token_losses_refuse_targets_outside_the_vocabulary() {
    let err = token_losses(&logits(2, 10, 1), None, &[3, 10]).unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
}
