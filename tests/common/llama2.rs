//! A LLaMA-2-shaped checkpoint made by the tests: small dimensions, LLaMA-2's structure
//! (multi-head attention with as many KV heads as heads, an untied `lm_head`, RoPE θ =
//! 10000, BOS added by the tokenizer, LLaMA's 32000-piece SentencePiece vocabulary), written
//! twice with the same weights: an HF folder sharded into two safetensors files with
//! `model.safetensors.index.json`, and a GGUF with llama.cpp's names, q/k row permutation
//! and `tokenizer.ggml.model = "llama"` metadata.
//!
//! The vocabulary, merges and test ids come from the npm package llama-tokenizer-js@1.2.2
//! (fetched by `scripts/fetch-assets` into `assets/llama-tokenizer/reference.json`).
#![allow(dead_code)]

use crate::common::root;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use modification::LlamaConfig;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The reference tokenizer data of llama-tokenizer-js.
#[derive(serde::Deserialize)]
pub struct Reference {
    /// The 32000 pieces by id.
    pub tokens: Vec<String>,
    /// The merges of LLaMA's `tokenizer.json`, highest priority first.
    pub merges: Vec<(String, String)>,
    /// The package's test strings with the ids (BOS first) LLaMA's tokenizer gives.
    pub cases: Vec<Case>,
}

/// One test string and its ids.
#[derive(serde::Deserialize)]
pub struct Case {
    pub text: String,
    pub ids: Vec<u32>,
}

pub fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let p = root().join("assets/llama-tokenizer/reference.json");
        let text = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}: run scripts/fetch-assets first", p.display()));
        serde_json::from_str(&text).expect("llama tokenizer reference")
    })
}

/// llama.cpp's token types of LLaMA's vocabulary: `<unk>` unknown (2), `<s>` / `</s>`
/// control (3), `<0x00>` … `<0xFF>` byte (6), the rest normal (1).
pub fn token_types(tokens: &[String]) -> Vec<i32> {
    (0..tokens.len())
        .map(|id| match id {
            0 => 2,
            1 | 2 => 3,
            3..=258 => 6,
            _ => 1,
        })
        .collect()
}

/// The scores of LLaMA's `tokenizer.model`, as the order of its merges shows them: they
/// fall with the id, and the runs of `▁` (added by hand to LLaMA's vocabulary) share the
/// lowest score, -1e9. Special and byte pieces score 0.
pub fn scores(tokens: &[String]) -> Vec<f32> {
    tokens
        .iter()
        .enumerate()
        .map(|(id, t)| {
            if id <= 258 {
                0.0
            } else if t.chars().count() > 1 && t.chars().all(|c| c == '\u{2581}') {
                -1e9
            } else {
                -(id as f32)
            }
        })
        .collect()
}

/// The `tokenizer.ggml.*` metadata of a LLaMA-2 GGUF for the reference vocabulary.
pub fn tokenizer_metadata() -> Vec<(String, Value)> {
    let r = reference();
    vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(r.tokens.iter().cloned().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores(&r.tokens).into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(token_types(&r.tokens).into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
    ]
}

/// Writes a GGUF holding `metadata` and `tensors` (f32) to `path`.
pub fn write_gguf(
    path: &std::path::Path,
    metadata: &[(String, Value)],
    tensors: &[(String, Tensor)],
) {
    let qs: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let qrefs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta, &qrefs).unwrap();
}

pub const CONFIG_JSON: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "hidden_size": 64,
  "intermediate_size": 176,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 4,
  "vocab_size": 32000,
  "max_position_embeddings": 128,
  "rope_theta": 10000.0,
  "rms_norm_eps": 1e-05,
  "tie_word_embeddings": false,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "torch_dtype": "float32"
}"#;

pub fn config() -> LlamaConfig {
    LlamaConfig::from_json_str(CONFIG_JSON).unwrap()
}

/// The fixture's weights by HF name: deterministic pseudo-random values (norm weights near 1).
pub fn weights() -> HashMap<String, Tensor> {
    crate::tiny::weights(&config())
}

/// llama.cpp's name of an HF tensor name.
pub fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, leaf) = rest.split_once('.').unwrap();
    let leaf = match leaf {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{leaf}")
}

/// llama.cpp's q/k row order (interleaved RoPE pairs): HF row `(h, t, j)` (head, half,
/// pair) goes to GGUF row `(h, j, t)`.
pub fn permute_rope_rows(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, 2, out / heads / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// Where the fixture lives: `target/llama2-fixture/{hf/, model.gguf}`.
pub struct Fixture {
    /// The sharded HF folder (config.json, two shards, index, tokenizer.json).
    pub hf: PathBuf,
    /// The GGUF with the same weights and the llama tokenizer metadata.
    pub gguf: PathBuf,
}

/// Writes the fixture once per test binary. `scripts/llama2-reference.py` reads the HF
/// folder it writes.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let base = root().join("target/llama2-fixture");
        let _ = std::fs::remove_dir_all(&base);
        let hf = base.join("hf");
        std::fs::create_dir_all(&hf).unwrap();
        let cfg = config();
        let weights = weights();
        let mut names: Vec<&String> = weights.keys().collect();
        names.sort();

        // GGUF: llama.cpp names, permuted q/k rows, the model and tokenizer metadata.
        let mut metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("llama.embedding_length".into(), Value::U32(64)),
            ("llama.feed_forward_length".into(), Value::U32(176)),
            ("llama.block_count".into(), Value::U32(2)),
            ("llama.attention.head_count".into(), Value::U32(4)),
            ("llama.attention.head_count_kv".into(), Value::U32(4)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Value::F32(1e-5),
            ),
            ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
            ("llama.context_length".into(), Value::U32(128)),
        ];
        metadata.extend(tokenizer_metadata());
        let gguf_tensors: Vec<(String, Tensor)> = names
            .iter()
            .map(|name| {
                let w = &weights[*name];
                let w = if name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight") {
                    permute_rope_rows(w, cfg.num_attention_heads)
                } else {
                    w.clone()
                };
                (gguf_name(name), w)
            })
            .collect();
        let gguf = base.join("model.gguf");
        write_gguf(&gguf, &metadata, &gguf_tensors);

        // HF folder: two shards (embeddings and layer 0; the rest) and their index.
        let (first, second): (Vec<&String>, Vec<&String>) = names
            .iter()
            .partition(|n| n.contains("embed_tokens") || n.starts_with("model.layers.0."));
        let mut weight_map = serde_json::Map::new();
        let mut total_size = 0usize;
        for (file, shard) in [
            ("model-00001-of-00002.safetensors", &first),
            ("model-00002-of-00002.safetensors", &second),
        ] {
            let tensors: HashMap<String, Tensor> = shard
                .iter()
                .map(|n| ((*n).clone(), weights[*n].clone()))
                .collect();
            for (n, t) in &tensors {
                weight_map.insert(n.clone(), file.into());
                total_size += t.elem_count() * 4;
            }
            candle_core::safetensors::save(&tensors, hf.join(file)).unwrap();
        }
        let index = serde_json::json!({
            "metadata": {"total_size": total_size},
            "weight_map": weight_map,
        });
        std::fs::write(
            hf.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap(),
        )
        .unwrap();
        std::fs::write(hf.join("config.json"), CONFIG_JSON).unwrap();
        let mut file = std::fs::File::open(&gguf).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        modification::checkpoint::tokenizer::from_gguf(&content)
            .unwrap()
            .save(hf.join("tokenizer.json"), true)
            .unwrap();
        Fixture { hf, gguf }
    })
}
