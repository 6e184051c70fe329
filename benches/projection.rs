//! The projections of a prefill, `x · wᵀ` with a frozen weight stored `(out, in)`: the
//! crate's product (`model::linear::linear`: matrix-vector kernels up to 8 rows, outer
//! products up to 256, `gemm` above) against candle's matmul (`gemm` at every size), f32,
//! on SmolLM2's shapes (d 576, FFN 1536) at 128, 256 and 512 rows.
//!
//! Each iteration multiplies by the next of 24 distinct weights (85 MB at 576 × 1536), as
//! a prefill streams 30 layers' weights, so that the weight comes from memory rather than
//! a cache that a single weight would stay in. Throughput is reported in elements/s where
//! an element is one FLOP (`2·m·n·k` per product): read `Gelem/s` as GFLOP/s.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use modification::model::linear::linear;
use std::hint::black_box;

const WEIGHTS: usize = 24;

fn bench(c: &mut Criterion) {
    let device = Device::Cpu;
    let mut group = c.benchmark_group("projection");
    group.sample_size(20);
    for (m, k, n) in [
        (128, 576, 576),
        (128, 576, 1536),
        (128, 1536, 576),
        (256, 576, 1536),
        (512, 576, 1536),
        (512, 1536, 576),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &device).unwrap();
        let weights: Vec<Tensor> = (0..WEIGHTS)
            .map(|_| Tensor::randn(0f32, 0.05, (n, k), &device).unwrap())
            .collect();
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let shape = format!("{m}x{k}->{n}");
        let mut next = 0;
        group.bench_with_input(BenchmarkId::new("ours", &shape), &m, |b, _| {
            b.iter(|| {
                next = (next + 1) % WEIGHTS;
                black_box(linear(&x, &weights[next]).unwrap())
            })
        });
        group.bench_with_input(BenchmarkId::new("candle_gemm", &shape), &m, |b, _| {
            b.iter(|| {
                next = (next + 1) % WEIGHTS;
                black_box(x.matmul(&weights[next].t().unwrap()).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
