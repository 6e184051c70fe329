//! One SmolLM2-sized layer (d 576, 9 heads, 3 KV heads, FFN 1536), batch 1, seq 1024:
//! dense vs routed at kept fractions 1.0, 0.5 and 0.25, threshold-p and top-k, Skip KV
//! policy, inference mode (the sparse path), all on the same engine. The routed time includes the router, the
//! selection (one host copy), gather and scatter.
//!
//! The model around the layer is a 1-layer decoder with a 16-token vocabulary, so that
//! embedding and `lm_head` cost nothing next to the layer.

#[path = "../examples/support/mod.rs"]
mod support;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use modification::mixture_of_depths::{LayerRule, RoutedLayers, RouterKind};
use modification::{Batch, Llama, LlamaConfig, ModConfig, ModModel, Mode};
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;

const T: usize = 1024;

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((((i as u64 + 1) * (seed * 2 + 1)) as f32 * 0.618_034).fract() - 0.5) * 2.0 * scale
        })
        .collect()
}

fn config() -> LlamaConfig {
    LlamaConfig::from_json_str(
        r#"{"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 1,
            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 16,
            "max_position_embeddings": 2048, "rope_theta": 100000.0, "rms_norm_eps": 1e-5}"#,
    )
    .unwrap()
}

fn weights(cfg: &LlamaConfig) -> HashMap<String, Tensor> {
    cfg.tensor_shapes()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let v = if name.contains("norm") {
                vec![1.0; n]
            } else {
                values(n, i as u64, 0.05)
            };
            (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        })
        .collect()
}

/// A routed model whose router keeps the fraction `kept` of the tokens of `batch`.
fn routed(base: &Llama, batch: &Batch, router: RouterKind, kept: f64) -> ModModel {
    let w = Tensor::from_vec(values(576, 99, 1.0), (1, 576), &Device::Cpu).unwrap();
    // Bias at the (1 - kept) quantile of the token logits: exactly `kept` pass p = 0.5.
    let x = base.embed(batch.ids()).unwrap();
    let mut logits: Vec<f32> = x
        .broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    logits.sort_by(|a, b| b.total_cmp(a));
    let n = ((kept * T as f64).round() as usize).clamp(1, T);
    let bias = if n == T {
        1e4
    } else {
        -(logits[n - 1] + logits[n]) / 2.0
    };
    let mut t = HashMap::new();
    t.insert("model.layers.0.router.weight".to_string(), w);
    t.insert(
        "model.layers.0.router.bias".to_string(),
        Tensor::new(&[bias], &Device::Cpu).unwrap(),
    );
    let cfg = ModConfig {
        routed_layers: RoutedLayers::Rule(LayerRule::All),
        router,
        sink_tokens: 0,
        gate_init_bias: 1e4,
        ..ModConfig::default()
    };
    ModModel::new(
        base.clone(),
        cfg,
        VarBuilder::from_tensors(t, DType::F32, &Device::Cpu),
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    support::tune_malloc_for_tensors();
    let cfg = config();
    let base = Llama::load(
        VarBuilder::from_tensors(weights(&cfg), DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let ids: Vec<u32> = (0..T as u32).map(|i| (i * 7 + 3) % 16).collect();
    let batch = Batch::single(&ids, 2048, &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("layer_seq1024");
    group.sample_size(10);
    // The dense layer on the same engine as the routed ones (the fused attention kernel);
    // `Llama::forward`, the reference path, materialises the masked (T, T) scores.
    let dense = ModModel::dense(base.clone()).unwrap();
    group.bench_function("dense", |b| {
        b.iter(|| black_box(dense.forward(&batch, Mode::Inference).unwrap()))
    });
    for kept in [1.0, 0.5, 0.25] {
        let thr = routed(
            &base,
            &batch,
            RouterKind::ThresholdP {
                p: 0.5,
                per_layer: BTreeMap::new(),
            },
            kept,
        );
        let got = thr.forward(&batch, Mode::Inference).unwrap().stats[0].kept_fraction();
        assert!(
            (got - kept).abs() < 0.01,
            "threshold-p kept {got}, wanted {kept}"
        );
        group.bench_with_input(BenchmarkId::new("threshold_p", kept), &kept, |b, _| {
            b.iter(|| black_box(thr.forward(&batch, Mode::Inference).unwrap()))
        });
        let topk = routed(&base, &batch, RouterKind::TopK { capacity: kept }, kept);
        group.bench_with_input(BenchmarkId::new("top_k", kept), &kept, |b, _| {
            b.iter(|| black_box(topk.forward(&batch, Mode::Inference).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
