//! Generation with the routed KV cache.

mod common;
#[path = "common/tiny.rs"]
mod tiny;

use candle_core::{Device, IndexOp, Tensor};
use modification::generate::{self, decode_batch, SamplingConfig};
use modification::mixture_of_depths::KvPolicy;
use modification::{Batch, Llama, ModConfig, ModModel, Mode};

fn routed(kv: KvPolicy) -> ModModel {
    let cfg = ModConfig {
        kv_policy: kv,
        sink_tokens: 1,
        ..tiny::config_all_layers()
    };
    tiny::mod_model(tiny::llama(3), cfg, 3.0, 0.0)
}

/// Prefill `prompt_len` tokens, decode the rest one by one; compare every position's
/// logits with one full causal forward over the same tokens.
fn check_prefill_decode(model: &ModModel, tokens: &[u32], prompt_len: usize) {
    let full = model
        .forward_causal(
            &Batch::single(tokens, 64, &Device::Cpu).unwrap(),
            Mode::Inference,
        )
        .unwrap();
    let mut cache = model.new_cache(1).unwrap();
    let pre = model
        .forward_cached(
            &Batch::single(&tokens[..prompt_len], 64, &Device::Cpu).unwrap(),
            &mut cache,
        )
        .unwrap();
    let mut rows = vec![pre.logits.i(0).unwrap()];
    for (p, &tok) in tokens.iter().enumerate().skip(prompt_len) {
        let step = model
            .forward_cached(
                &decode_batch(&[tok], &[p], 64, &Device::Cpu).unwrap(),
                &mut cache,
            )
            .unwrap();
        rows.push(step.logits.i(0).unwrap());
    }
    let cached = Tensor::cat(&rows, 0).unwrap();
    let d = common::max_diff(&cached, &full.logits.i(0).unwrap());
    assert!(d < 1e-4, "prompt {prompt_len}: max diff {d}");
}

#[test]
fn prefill_then_decode_equals_full_forward() {
    let tokens = tiny::ids(14, 21);
    for model in [
        routed(KvPolicy::Skip),
        routed(KvPolicy::Keep),
        ModModel::dense(tiny::llama(3)).unwrap(),
    ] {
        // The routing must be partial for the test to mean something.
        let out = model
            .forward_causal(
                &Batch::single(&tokens, 64, &Device::Cpu).unwrap(),
                Mode::Inference,
            )
            .unwrap();
        if !out.stats.is_empty() {
            assert!(out.stats.iter().any(|s| s.kept > 1 && s.kept < 14));
        }
        for prompt_len in [1, 3, 7, 14] {
            check_prefill_decode(&model, &tokens, prompt_len);
        }
    }
}

#[test]
fn decode_steps_where_every_or_no_routed_layer_keeps_the_token() {
    for (bias, kept) in [(-50.0, 0usize), (50.0, 1)] {
        let cfg = ModConfig {
            sink_tokens: 1,
            ..tiny::config_all_layers()
        };
        let model = tiny::mod_model(tiny::llama(3), cfg, 0.0, bias);
        let tokens = tiny::ids(6, 22);
        check_prefill_decode(&model, &tokens, 2);
        let mut cache = model.new_cache(1).unwrap();
        model
            .forward_cached(
                &Batch::single(&tokens[..3], 64, &Device::Cpu).unwrap(),
                &mut cache,
            )
            .unwrap();
        let step = model
            .forward_cached(
                &decode_batch(&[5], &[3], 64, &Device::Cpu).unwrap(),
                &mut cache,
            )
            .unwrap();
        assert!(step.stats.iter().all(|s| s.kept == kept && s.valid == 1));
        // A skipped token adds no entry: only the sink (and, when kept, the others) are cached.
        let expected = if kept == 1 { 4 } else { 1 };
        assert_eq!(cache.len(1, 0).unwrap(), expected);
    }
}

#[test]
fn batched_generation_gives_each_row_what_it_gets_alone() {
    for kv in [KvPolicy::Skip, KvPolicy::Keep] {
        let model = routed(kv);
        let prompts = vec![tiny::ids(9, 23), tiny::ids(2, 24), tiny::ids(5, 25)];
        let together = generate::greedy_batch(&model, &prompts, 6).unwrap();
        for (p, row) in prompts.iter().zip(&together) {
            let alone = generate::greedy_batch(&model, std::slice::from_ref(p), 6).unwrap();
            assert_eq!(row, &alone[0], "{kv:?}");
            assert_eq!(row.len(), 6);
        }
    }
}

#[test]
fn kv_cache_shrinks_by_the_skipped_fraction_measured() {
    let model = routed(KvPolicy::Skip);
    let dense = ModModel::dense(model.base().clone()).unwrap();
    let tokens = tiny::ids(20, 26);
    let batch = Batch::single(&tokens, 64, &Device::Cpu).unwrap();
    let mut routed_cache = model.new_cache(1).unwrap();
    let out = model.forward_cached(&batch, &mut routed_cache).unwrap();
    let mut dense_cache = dense.new_cache(1).unwrap();
    dense.forward_cached(&batch, &mut dense_cache).unwrap();
    // Per layer: 20 tokens × K and V × 2 KV heads × 16 dims × 4 bytes.
    let per_token_layer = 2 * 2 * 16 * 4;
    assert_eq!(dense_cache.bytes(), 3 * 20 * per_token_layer);
    let kept: usize = out.stats.iter().map(|s| s.kept).sum();
    assert!(kept < 60 && kept > 3);
    assert_eq!(routed_cache.bytes(), kept * per_token_layer);
    // Keep policy: compute saved, memory not.
    let keep = routed(KvPolicy::Keep);
    let mut keep_cache = keep.new_cache(1).unwrap();
    keep.forward_cached(&batch, &mut keep_cache).unwrap();
    assert_eq!(keep_cache.bytes(), dense_cache.bytes());
}

#[test]
fn real_model_greedy_reference_through_the_cache() {
    let ckpt = common::smollm2();
    let model = ModModel::dense(Llama::from_checkpoint(ckpt).unwrap()).unwrap();
    let cfg = SamplingConfig {
        max_new_tokens: 20,
        ..SamplingConfig::default()
    };
    let mut streamed = String::new();
    let out = generate::generate(
        &model,
        &ckpt.tokenizer,
        "Once upon a time, there was a little girl named",
        &cfg,
        |t| streamed.push_str(t),
    )
    .unwrap();
    let want =
        " Emma who loved to play in the sun. She would often go to the beach and play with her";
    assert_eq!(out.text, want);
    assert_eq!(streamed, want);
    assert_eq!(out.tokens.len(), 20);
    // The dense cache holds every prompt and generated token (but the last) at every layer.
    let entries = out.prompt_tokens + 19;
    assert_eq!(out.kv_bytes(), 30 * entries * 2 * 3 * 64 * 4);
}
