//! Selection operators alone: threshold-p (MoDification) vs top-k (MoD), batch 4.
//!
//! Both take the router's per-token scores as they come back from the device (one host
//! copy, included) and return the kept positions of every row in ascending order.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use modification::routing::selection;
use std::hint::black_box;

fn scores(b: usize, t: usize) -> Tensor {
    let v: Vec<f32> = (0..b * t)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 8.0)
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn bench(c: &mut Criterion) {
    let b = 4;
    let mut group = c.benchmark_group("selection");
    group.sample_size(50);
    for t in [512usize, 2048, 8192] {
        let logits = scores(b, t);
        let gates = candle_nn::ops::sigmoid(&logits).unwrap();
        let lengths = vec![t; b];
        let sinks = vec![1; b];
        group.bench_with_input(BenchmarkId::new("threshold_p", t), &t, |bench, &t| {
            bench.iter(|| {
                let g: Vec<f32> = gates.flatten_all().unwrap().to_vec1().unwrap();
                black_box(selection::threshold_p(&g, &lengths, t, 0.5, &sinks).unwrap())
            })
        });
        group.bench_with_input(BenchmarkId::new("top_k", t), &t, |bench, &t| {
            bench.iter(|| {
                let l: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
                black_box(selection::top_k(&l, &lengths, t, 0.5, &sinks).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
