//! A tiny random LLaMA (2 layers, d = 64) for fast, exact routing tests.
#![allow(dead_code)]

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use modification::mixture_of_depths::{LayerRule, RoutedLayers};
use modification::{Batch, Llama, LlamaConfig, ModConfig, ModModel};
use std::collections::HashMap;

pub fn config(layers: usize) -> LlamaConfig {
    LlamaConfig::from_json_str(&format!(
        r#"{{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": {layers},
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 101,
            "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false}}"#
    ))
    .unwrap()
}

/// Deterministic pseudo-random values in [-scale, scale] (a fixed LCG, no global RNG).
pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Random weights for every tensor of `cfg` (norm weights near 1).
pub fn weights(cfg: &LlamaConfig) -> HashMap<String, Tensor> {
    cfg.tensor_shapes()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let v = if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
                values(n, i as u64, 0.2)
                    .into_iter()
                    .map(|x| 1.0 + x)
                    .collect()
            } else {
                values(n, i as u64 + 1000, 0.15)
            };
            (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        })
        .collect()
}

pub fn llama(layers: usize) -> Llama {
    llama_on(layers, &Device::Cpu)
}

/// The tiny model with its weights on `device`.
pub fn llama_on(layers: usize, device: &Device) -> Llama {
    let cfg = config(layers);
    Llama::load(
        VarBuilder::from_tensors(weights(&cfg), DType::F32, device),
        &cfg,
    )
    .unwrap()
}

/// Router tensors for `layers`: weight `w_scale · random`, bias `bias`.
pub fn router_tensors(layers: &[usize], w_scale: f32, bias: f32) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    for &j in layers {
        m.insert(
            format!("model.layers.{j}.router.weight"),
            Tensor::from_vec(values(64, 77 + j as u64, w_scale), (1, 64), &Device::Cpu).unwrap(),
        );
        m.insert(
            format!("model.layers.{j}.router.bias"),
            Tensor::from_vec(vec![bias], 1, &Device::Cpu).unwrap(),
        );
    }
    m
}

/// A MoD model over `llama` with the given config and fixed router tensors.
pub fn mod_model(llama: Llama, cfg: ModConfig, w_scale: f32, bias: f32) -> ModModel {
    let n = llama.config().num_hidden_layers;
    let layers = cfg.routed_layer_indices(n).unwrap();
    let device = llama.device().clone();
    let vb = VarBuilder::from_tensors(router_tensors(&layers, w_scale, bias), DType::F32, &device);
    ModModel::new(llama, cfg, vb).unwrap()
}

pub fn config_all_layers() -> ModConfig {
    ModConfig {
        routed_layers: RoutedLayers::Rule(LayerRule::All),
        ..ModConfig::default()
    }
}

pub fn config_all_layers_no_sink() -> ModConfig {
    ModConfig {
        sink_tokens: 0,
        ..config_all_layers()
    }
}

/// Deterministic token ids in the tiny vocabulary.
pub fn ids(n: usize, seed: u64) -> Vec<u32> {
    values(n, seed, 1.0)
        .iter()
        .map(|v| ((v + 1.0) * 50.0) as u32 % 101)
        .collect()
}

/// The logits `(T, vocab)` of `tokens` fed to `model` through its KV cache in the chunks
/// `(start, end)` (a prefill, then more prefills or decode steps).
pub fn logits_in_chunks(model: &ModModel, tokens: &[u32], chunks: &[(usize, usize)]) -> Tensor {
    let mut cache = model.new_cache(1).unwrap();
    let mut got = Vec::new();
    for &(start, end) in chunks {
        let chunk = Batch::continuing(
            &[tokens[start..end].to_vec()],
            cache.next_positions(),
            0,
            64,
            &Device::Cpu,
        )
        .unwrap();
        let out = model.forward_cached(&chunk, &mut cache).unwrap();
        got.push(out.logits.i(0).unwrap());
    }
    Tensor::cat(&got, 0).unwrap()
}
