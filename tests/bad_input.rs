//! Bad input gives the typed error that names it, never a panic or an untyped candle error.
//!
//! Malformed checkpoints are built in temporary folders: a tiny LLaMA HF folder (hidden 8,
//! 2 heads, 1 layer, vocab 16) for the safetensors and config cases, tiny GGUF files for the
//! GGUF metadata and tensor-type cases, and truncated copies of the real SmolLM2 GGUF.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use modification::checkpoint::{export, gguf};
use modification::{eval, Batch, Checkpoint, Error, Llama, LlamaConfig};
use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Instant;

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// A tiny but valid LLaMA config: hidden 8, 2 heads (head width 4), 1 layer, vocab 16.
fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 8,
        intermediate_size: 16,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: Some(2),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 32,
        vocab_size: 16,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        architectures: vec!["LlamaForCausalLM".to_string()],
        model_type: "llama".to_string(),
        rope_scaling: None,
        attention_bias: false,
        head_dim: None,
    }
}

/// Every tensor `cfg` implies, with small distinct values.
fn tiny_tensors(cfg: &LlamaConfig) -> HashMap<String, Tensor> {
    cfg.tensor_shapes()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|j| ((i * 31 + j) % 17) as f32 * 0.01).collect();
            (name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap())
        })
        .collect()
}

/// A word-level tokenizer over the 16 ids of the tiny vocabulary.
fn tiny_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..16u32)
        .map(|i| (format!("w{i}"), serde_json::Value::from(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    })
    .to_string()
}

/// Writes a tiny, loadable HF folder (`config.json`, `model.safetensors`,
/// `tokenizer.json`) at `dir` and returns `dir`.
fn write_tiny_hf(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = tiny_config();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(&tiny_tensors(&cfg), dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    dir.to_path_buf()
}

fn load(path: &Path) -> modification::Result<Checkpoint> {
    Checkpoint::load(path.to_str().unwrap(), DType::F32, &Device::Cpu)
}

/// The error of a load that must fail; panics with what was loaded otherwise.
fn load_err(path: &Path) -> Error {
    match load(path) {
        Ok(ckpt) => panic!("{} loaded although malformed: {ckpt:?}", path.display()),
        Err(e) => e,
    }
}

/// The tiny config as JSON, edited by `edit`, written to `dir/config.json`.
fn write_config_json(
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) {
    let mut json = serde_json::to_value(tiny_config()).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
}

/// A GGUF file at `path` with `metadata` and one F32 tensor `token_embd.weight` (16, 8).
fn write_tiny_gguf(path: &Path, metadata: &[(&str, &Value)]) {
    let t = Tensor::zeros((16, 8), DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, metadata, &[("token_embd.weight", &q)]).unwrap();
}

/// The llama.cpp name of every tensor of the tiny config (the inverse of
/// [`gguf::hf_name`]), with its tiny value.
fn tiny_gguf_tensors() -> Vec<(String, Tensor)> {
    let leaves = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ];
    let mut out: Vec<(String, Tensor)> = tiny_tensors(&tiny_config())
        .into_iter()
        .map(|(hf, t)| {
            let gguf = match hf.as_str() {
                "model.embed_tokens.weight" => "token_embd.weight".to_string(),
                "model.norm.weight" => "output_norm.weight".to_string(),
                "lm_head.weight" => "output.weight".to_string(),
                _ => {
                    let leaf = hf.strip_prefix("model.layers.0.").unwrap();
                    let (_, g) = leaves.iter().find(|(h, _)| *h == leaf).unwrap();
                    format!("blk.0.{g}")
                }
            };
            assert_eq!(gguf::hf_name(&gguf).as_deref(), Some(hf.as_str()));
            (gguf, t)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A GGUF file of the tiny LLaMA config (F32 tensors, a 16-token byte-level BPE
/// vocabulary) holding `tensors` (llama.cpp names).
fn write_tiny_llama_gguf(path: &Path, tensors: &[(String, Tensor)]) {
    let cfg = tiny_config();
    let s = |v: &str| Value::String(v.to_string());
    let u = |v: usize| Value::U32(v as u32);
    let tokens = Value::Array((0..16).map(|i| s(&format!("t{i}"))).collect());
    let metadata = [
        ("general.architecture", s("llama")),
        ("llama.embedding_length", u(cfg.hidden_size)),
        ("llama.feed_forward_length", u(cfg.intermediate_size)),
        ("llama.block_count", u(cfg.num_hidden_layers)),
        ("llama.attention.head_count", u(cfg.num_attention_heads)),
        ("llama.attention.head_count_kv", u(cfg.num_kv_heads())),
        ("llama.context_length", u(cfg.max_position_embeddings)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("gpt2")),
        ("tokenizer.ggml.tokens", tokens),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let qs: Vec<(&str, QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let qs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (*n, q)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &metadata, &qs).unwrap();
}

/// The entries of a folder, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The contents of every file of a folder, by name.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    entries(dir)
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(dir.join(&name)).unwrap();
            (name, bytes)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// 0. The fixture itself is good input
// ---------------------------------------------------------------------------------------

#[test]
fn tiny_hf_folder_loads_when_intact() {
    let dir = write_tiny_hf(&common::temp_dir("bad-intact").join("tiny"));
    let ckpt = load(&dir).unwrap();
    assert_eq!(ckpt.config, tiny_config());
    assert_eq!(ckpt.tensors.len(), tiny_config().tensor_shapes().len());
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

// ---------------------------------------------------------------------------------------
// 1. Missing files
// ---------------------------------------------------------------------------------------

#[test]
fn missing_gguf_file_is_io_not_found() {
    let root = common::temp_dir("bad-missing-gguf");
    let path = root.join("no-such-model.Q4_1.gguf");
    let err = load(&path).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path: p, source } if p == &path && source.kind() == ErrorKind::NotFound),
        "{err:?}"
    );
    assert!(err.to_string().contains("no-such-model.Q4_1.gguf"), "{err}");
    // The GGUF reader itself says the same.
    let err = gguf::load(&path, DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path: p, source } if p == &path && source.kind() == ErrorKind::NotFound),
        "{err:?}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn hf_folder_without_config_json_is_io_not_found() {
    let dir = write_tiny_hf(&common::temp_dir("bad-no-config").join("tiny"));
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_err(&dir);
    let expected = dir.join("config.json");
    assert!(
        matches!(&err, Error::Io { path, source } if path == &expected && source.kind() == ErrorKind::NotFound),
        "{err:?}"
    );
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn hf_folder_without_weights_or_tokenizer_is_io_not_found() {
    let dir = write_tiny_hf(&common::temp_dir("bad-no-weights").join("tiny"));
    for file in ["model.safetensors", "tokenizer.json"] {
        let saved = std::fs::read(dir.join(file)).unwrap();
        std::fs::remove_file(dir.join(file)).unwrap();
        let err = load_err(&dir);
        let expected = dir.join(file);
        assert!(
            matches!(&err, Error::Io { path, source } if path == &expected && source.kind() == ErrorKind::NotFound),
            "{file}: {err:?}"
        );
        std::fs::write(dir.join(file), saved).unwrap();
    }
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

// ---------------------------------------------------------------------------------------
// 2. Bad config.json
// ---------------------------------------------------------------------------------------

#[test]
fn config_json_that_is_not_json_is_config_error_naming_the_file() {
    let dir = write_tiny_hf(&common::temp_dir("bad-config-syntax").join("tiny"));
    std::fs::write(dir.join("config.json"), "{ \"hidden_size\": 8, oops").unwrap();
    let err = load_err(&dir);
    let expected = dir.join("config.json");
    assert!(
        matches!(&err, Error::Config { path: Some(p), .. } if p == &expected),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&expected.display().to_string()),
        "{err}"
    );
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn config_json_without_hidden_size_is_config_error_naming_field_and_file() {
    let dir = write_tiny_hf(&common::temp_dir("bad-config-incomplete").join("tiny"));
    write_config_json(&dir, |c| {
        c.remove("hidden_size");
    });
    let err = load_err(&dir);
    let expected = dir.join("config.json");
    assert!(
        matches!(&err, Error::Config { path: Some(p), reason } if p == &expected && reason.contains("hidden_size")),
        "{err:?}"
    );
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn config_json_with_hidden_size_not_divisible_by_heads_is_config_error() {
    let dir = write_tiny_hf(&common::temp_dir("bad-config-inconsistent").join("tiny"));
    write_config_json(&dir, |c| {
        c.insert("hidden_size".into(), 10.into());
        c.insert("num_attention_heads".into(), 4.into());
        c.insert("num_key_value_heads".into(), 4.into());
    });
    let err = load_err(&dir);
    let expected = dir.join("config.json");
    assert!(
        matches!(&err, Error::Config { path: Some(p), reason }
            if p == &expected && reason.contains("hidden_size 10") && reason.contains("num_attention_heads 4")),
        "{err:?}"
    );
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

// ---------------------------------------------------------------------------------------
// 3. Unsupported architectures
// ---------------------------------------------------------------------------------------

#[test]
fn gpt2_config_json_is_unsupported_architecture() {
    let dir = write_tiny_hf(&common::temp_dir("bad-arch-hf").join("tiny"));
    // A LLaMA-shaped config that says it is something else.
    write_config_json(&dir, |c| {
        c.insert("model_type".into(), "gpt2".into());
    });
    let err = load_err(&dir);
    assert!(
        matches!(&err, Error::UnsupportedArchitecture(a) if a == "gpt2"),
        "{err:?}"
    );
    // A real GPT-2 config.json (field names of its own, no `hidden_size`): the architecture
    // is what is wrong, not a missing field.
    std::fs::write(
        dir.join("config.json"),
        r#"{"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12,
            "n_positions": 1024, "vocab_size": 50257, "layer_norm_epsilon": 1e-05}"#,
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(
        matches!(&err, Error::UnsupportedArchitecture(a) if a == "gpt2"),
        "{err:?}"
    );
    assert!(err.to_string().contains("gpt2"), "{err}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn gguf_with_gpt2_architecture_is_unsupported_architecture() {
    let root = common::temp_dir("bad-arch-gguf");
    let path = root.join("gpt2.gguf");
    write_tiny_gguf(
        &path,
        &[
            ("general.architecture", &Value::String("gpt2".to_string())),
            ("gpt2.context_length", &Value::U32(1024)),
            ("gpt2.embedding_length", &Value::U32(8)),
        ],
    );
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::UnsupportedArchitecture(a) if a == "gpt2"),
        "{err:?}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

// ---------------------------------------------------------------------------------------
// 4-5. Missing tensor, wrong shape
// ---------------------------------------------------------------------------------------

#[test]
fn safetensors_without_a_tensor_is_missing_tensor_naming_it() {
    let dir = write_tiny_hf(&common::temp_dir("bad-missing-tensor").join("tiny"));
    let name = "model.layers.0.mlp.up_proj.weight";
    let mut tensors = tiny_tensors(&tiny_config());
    assert!(tensors.remove(name).is_some());
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(
        matches!(&err, Error::MissingTensor { name: n } if n == name),
        "{err:?}"
    );
    assert!(err.to_string().contains(name), "{err}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn safetensors_with_a_wrong_shape_is_shape_mismatch_naming_both_shapes() {
    let dir = write_tiny_hf(&common::temp_dir("bad-shape").join("tiny"));
    let name = "model.layers.0.self_attn.k_proj.weight";
    let mut tensors = tiny_tensors(&tiny_config());
    tensors.insert(
        name.to_string(),
        Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(
        matches!(&err, Error::ShapeMismatch { name: n, expected, found }
            if n == name && expected == &[8, 8] && found == &[4, 8]),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(name) && msg.contains("[8, 8]") && msg.contains("[4, 8]"),
        "{msg}"
    );
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn tiny_llama_gguf_loads_when_intact() {
    let root = common::temp_dir("bad-gguf-intact");
    let path = root.join("tiny.gguf");
    write_tiny_llama_gguf(&path, &tiny_gguf_tensors());
    let ckpt = load(&path).unwrap();
    let mut cfg = tiny_config();
    cfg.bos_token_id = None;
    cfg.eos_token_id = None;
    // Stored as an f32 in GGUF and read back as its shortest decimal, as config.json has it.
    cfg.rms_norm_eps = 1e-5;
    assert_eq!(ckpt.config, cfg);
    assert_eq!(ckpt.tensors.len(), cfg.tensor_shapes().len());
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn gguf_without_a_llama_key_is_config_error_naming_key_and_file() {
    let root = common::temp_dir("bad-gguf-key");
    let path = root.join("tiny.gguf");
    write_tiny_llama_gguf(&path, &tiny_gguf_tensors());
    // Rename the key in place (same length, so every offset stays valid).
    let mut bytes = std::fs::read(&path).unwrap();
    let key = b"llama.block_count";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at..at + key.len()].copy_from_slice(b"llama.bl0ck_count");
    std::fs::write(&path, &bytes).unwrap();
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::Config { path: Some(p), reason } if p == &path && reason.contains("llama.block_count")),
        "{err:?}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn gguf_without_a_tensor_is_missing_tensor_naming_it() {
    let root = common::temp_dir("bad-gguf-missing-tensor");
    let path = root.join("tiny.gguf");
    let mut tensors = tiny_gguf_tensors();
    tensors.retain(|(n, _)| n != "blk.0.ffn_up.weight");
    write_tiny_llama_gguf(&path, &tensors);
    let err = load_err(&path);
    assert!(
        matches!(&err, Error::MissingTensor { name } if name == "model.layers.0.mlp.up_proj.weight"),
        "{err:?}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn gguf_with_wrong_shapes_is_shape_mismatch_naming_both_shapes() {
    let root = common::temp_dir("bad-gguf-shape");
    let path = root.join("tiny.gguf");
    // Shapes of every kind: rows not a multiple of the heads' RoPE pairs (q, k, which GGUF
    // loading un-permutes), a 1-D projection, a 2-D norm, a transposed matrix.
    let cases: [(&str, &str, Vec<usize>, Vec<usize>); 5] = [
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            vec![3, 8],
            vec![8, 8],
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
            vec![64],
            vec![8, 8],
        ),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            vec![4, 16],
            vec![8, 8],
        ),
        (
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
            vec![2, 4],
            vec![8],
        ),
        (
            "blk.0.ffn_up.weight",
            "model.layers.0.mlp.up_proj.weight",
            vec![8, 16],
            vec![16, 8],
        ),
    ];
    for (gguf_name, hf_name, found_shape, expected_shape) in cases {
        let mut tensors = tiny_gguf_tensors();
        let slot = tensors.iter_mut().find(|(n, _)| n == gguf_name).unwrap();
        slot.1 = Tensor::zeros(found_shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
        write_tiny_llama_gguf(&path, &tensors);
        let err = load_err(&path);
        assert!(
            matches!(&err, Error::ShapeMismatch { name, expected, found }
                if name == hf_name && expected == &expected_shape && found == &found_shape),
            "{gguf_name} {found_shape:?}: {err:?}"
        );
    }
    std::fs::remove_dir_all(root).unwrap();
}

// ---------------------------------------------------------------------------------------
// 6. Truncated files
// ---------------------------------------------------------------------------------------

#[test]
fn truncated_safetensors_is_checkpoint_error_naming_the_file() {
    let dir = write_tiny_hf(&common::temp_dir("bad-trunc-st").join("tiny"));
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Empty, inside the length prefix, inside the JSON header, half (inside the data),
    // one byte short.
    for len in [0, 4, 8 + header_len / 2, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let err = load_err(&dir);
        assert!(
            matches!(&err, Error::Checkpoint { path: p, .. } if p == &path),
            "cut at {len}: {err:?}"
        );
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn sharded_folder_with_a_missing_shard_or_bad_index_is_typed() {
    let dir = write_tiny_hf(&common::temp_dir("bad-shards").join("tiny"));
    let index = dir.join("model.safetensors.index.json");
    let weight_map: serde_json::Map<String, serde_json::Value> = tiny_config()
        .tensor_shapes()
        .into_iter()
        .map(|(name, _)| {
            let shard = if name.contains("layers") {
                "model-00002-of-00002.safetensors"
            } else {
                "model.safetensors"
            };
            (name, shard.into())
        })
        .collect();
    std::fs::write(
        &index,
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let err = load_err(&dir);
    let shard = dir.join("model-00002-of-00002.safetensors");
    assert!(
        matches!(&err, Error::Io { path, source } if path == &shard && source.kind() == ErrorKind::NotFound),
        "{err:?}"
    );

    for bad in [
        "not json",
        r#"{"metadata": {}}"#,
        r#"{"weight_map": {"a": 3}}"#,
    ] {
        std::fs::write(&index, bad).unwrap();
        let err = load_err(&dir);
        assert!(
            matches!(&err, Error::Checkpoint { path, .. } if path == &index),
            "{bad}: {err:?}"
        );
    }
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn truncated_real_gguf_is_checkpoint_error_naming_the_file() {
    let root = common::temp_dir("bad-trunc-gguf");
    let bytes = std::fs::read(common::gguf_path()).unwrap();
    let cuts = [
        ("empty", 0),
        ("header", 16),
        ("1mib", 1 << 20),
        ("half", bytes.len() / 2),
        ("last-byte", bytes.len() - 1),
    ];
    for (tag, len) in cuts {
        let path = root.join(format!("smollm2-{tag}.gguf"));
        std::fs::write(&path, &bytes[..len]).unwrap();
        let t = Instant::now();
        let err = load_err(&path);
        eprintln!("truncated GGUF ({tag}, {len} bytes): {:?}", t.elapsed());
        assert!(
            matches!(&err, Error::Checkpoint { path: p, .. } if p == &path),
            "{tag}: {err:?}"
        );
        assert!(
            err.to_string().contains(&format!("smollm2-{tag}.gguf")),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }
    std::fs::remove_dir_all(root).unwrap();
}

// ---------------------------------------------------------------------------------------
// 7. Unsupported GGUF tensor type
// ---------------------------------------------------------------------------------------

#[test]
fn gguf_tensor_of_unknown_type_is_unsupported_tensor_type() {
    let root = common::temp_dir("bad-tensor-type");
    let path = root.join("unknown-type.gguf");
    write_tiny_gguf(
        &path,
        &[("general.architecture", &Value::String("llama".to_string()))],
    );
    // Tensor info: name (u64 length + bytes), n_dims u32, dims u64 each, ggml type u32.
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in GGUF");
    let type_at = at + name.len() + 4 + 2 * 8;
    assert_eq!(
        u32::from_le_bytes(bytes[type_at..type_at + 4].try_into().unwrap()),
        0, // GGML_TYPE_F32
        "not the type field"
    );
    bytes[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();

    let err = load_err(&path);
    assert!(
        matches!(&err, Error::UnsupportedTensorType { path: p, reason } if p == &path && reason.contains("99")),
        "{err:?}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

// ---------------------------------------------------------------------------------------
// 8. Sequences longer than the context
// ---------------------------------------------------------------------------------------

#[test]
fn perplexity_beyond_the_context_is_sequence_too_long_before_any_compute() {
    let ckpt = common::smollm2();
    assert_eq!(ckpt.config.max_position_embeddings, 8192);
    let model = Llama::from_checkpoint(ckpt).unwrap();
    let ids = vec![1u32; 8193];
    let t = Instant::now();
    let err = eval::perplexity(&model, &ids).unwrap_err();
    let elapsed = t.elapsed();
    eprintln!("perplexity on 8193 ids refused in {elapsed:?}");
    assert!(
        matches!(
            err,
            Error::SequenceTooLong {
                len: 8193,
                max: 8192
            }
        ),
        "{err:?}"
    );
    // A forward pass over 8193 tokens through 30 layers would take far longer than this.
    assert!(
        elapsed.as_secs_f64() < 1.0,
        "refusal took {elapsed:?}: computed first?"
    );
}

#[test]
fn batch_with_a_row_beyond_the_context_is_sequence_too_long() {
    let rows = vec![vec![1u32; 4], vec![2u32; 10], vec![3u32; 7]];
    let err = Batch::from_rows(&rows, 0, 8, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, Error::SequenceTooLong { len: 10, max: 8 }),
        "{err:?}"
    );
    // Exactly the context is fine.
    let batch = Batch::from_rows(&rows, 0, 10, &Device::Cpu).unwrap();
    assert_eq!(batch.seq_len(), 10);
}

// ---------------------------------------------------------------------------------------
// 9. Hub ids that cannot be fetched
// ---------------------------------------------------------------------------------------

#[test]
fn unfetchable_hub_id_is_hub_error_naming_the_repo() {
    let repo = "no-such-owner/no-such-model";
    assert!(!Path::new(repo).exists());
    let t = Instant::now();
    let err = Checkpoint::load(repo, DType::F32, &Device::Cpu).unwrap_err();
    eprintln!("hub id refused in {:?}: {err}", t.elapsed());
    assert!(
        matches!(&err, Error::Hub { repo: r, .. } if r == repo),
        "{err:?}"
    );
    assert!(err.to_string().contains(repo), "{err}");
}

// ---------------------------------------------------------------------------------------
// 10. Export atomicity
// ---------------------------------------------------------------------------------------

#[test]
fn export_over_a_previous_export_leaves_a_complete_folder() {
    let root = common::temp_dir("bad-export-over");
    let src = write_tiny_hf(&root.join("src"));
    let mut ckpt = load(&src).unwrap();
    let out = root.join("out").join("model");
    export::save_hf(&ckpt, &out).unwrap();
    assert_eq!(
        entries(&out),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );

    // A second, different export into the same folder replaces the first completely.
    let name = "model.norm.weight";
    let doubled = (ckpt.tensors[name].clone() * 2.0).unwrap();
    ckpt.tensors.insert(name.to_string(), doubled.clone());
    ckpt.extra_config.insert(
        export::MOD_SECTION.to_string(),
        serde_json::json!({"p": 0.5}),
    );
    export::save_hf(&ckpt, &out).unwrap();
    assert_eq!(
        entries(&out),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    assert_eq!(
        entries(out.parent().unwrap()),
        ["model"],
        "leftover staging or old folder"
    );
    let reloaded = load(&out).unwrap();
    assert_eq!(reloaded.config, ckpt.config);
    assert_eq!(reloaded.extra_config, ckpt.extra_config);
    let diff = (&reloaded.tensors[name] - &doubled)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn failed_export_leaves_the_previous_folder_unchanged_and_no_staging() {
    let root = common::temp_dir("bad-export-fail");
    let src = write_tiny_hf(&root.join("src"));
    let ckpt = load(&src).unwrap();
    let out = root.join("out").join("model");
    export::save_hf(&ckpt, &out).unwrap();
    let before = snapshot(&out);

    let err = modification::fsutil::write_files_atomically(&out, |staging| {
        std::fs::write(staging.join("config.json"), "{ half written").unwrap();
        std::fs::write(staging.join("model.safetensors"), b"partial").unwrap();
        Err(Error::InvalidArgument(
            "simulated failure mid-export".to_string(),
        ))
    })
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("simulated")),
        "{err:?}"
    );
    assert_eq!(snapshot(&out), before, "previous export changed");
    assert_eq!(
        entries(out.parent().unwrap()),
        ["model"],
        "staging folder left behind"
    );
    load(&out).unwrap();

    // The same with no previous folder: nothing at all is left.
    let fresh = root.join("out").join("fresh");
    let err = modification::fsutil::write_files_atomically(&fresh, |_| {
        Err(Error::InvalidArgument("simulated failure".to_string()))
    })
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(!fresh.exists());
    assert_eq!(entries(out.parent().unwrap()), ["model"]);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn export_keeps_unrelated_files_and_removes_stale_staging() {
    let root = common::temp_dir("bad-export-keep");
    let src = write_tiny_hf(&root.join("src"));
    let ckpt = load(&src).unwrap();
    let out = root.join("out");
    std::fs::create_dir_all(out.join("trainer-state")).unwrap();
    std::fs::write(out.join("NOTES.md"), "mine").unwrap();
    std::fs::write(out.join("trainer-state").join("state.json"), "{}").unwrap();
    // Staging left by a run that died (no process has this id: pids stay below 2^22).
    let stale = out.join(".modification-staging-4194305");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"partial").unwrap();
    export::save_hf(&ckpt, &out).unwrap();
    assert_eq!(
        entries(&out),
        [
            "NOTES.md",
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "trainer-state"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(out.join("NOTES.md")).unwrap(),
        "mine"
    );
    assert!(out.join("trainer-state").join("state.json").is_file());
    load(&out).unwrap();
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn atomic_writes_change_nothing_when_a_target_is_a_folder() {
    use modification::fsutil::{write_dir_atomically, write_files_atomically};
    let root = common::temp_dir("fsutil-in-the-way");
    let dir = root.join("out");
    std::fs::create_dir_all(dir.join("m").join("sub")).unwrap();
    for name in ["a", "b"] {
        std::fs::write(dir.join(name), "old").unwrap();
    }
    let err = write_files_atomically(&dir, |staging| {
        for name in ["a", "b", "m"] {
            std::fs::write(staging.join(name), "new").unwrap();
        }
        Ok(())
    })
    .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    for name in ["a", "b"] {
        assert_eq!(std::fs::read_to_string(dir.join(name)).unwrap(), "old");
    }
    assert_eq!(entries(&dir), ["a", "b", "m"]);

    // A run killed between moving a folder aside and putting its replacement in place:
    // the next write beside it puts the original back.
    let state = root.join("state");
    let aside = root.join(".modification-staging-4194305-0-state.old");
    std::fs::create_dir_all(&aside).unwrap();
    std::fs::write(aside.join("trainer.json"), "{}").unwrap();
    write_dir_atomically(&root.join("other"), |staging| {
        std::fs::write(staging.join("x"), "x").map_err(|e| Error::Io {
            path: staging.join("x"),
            source: e,
        })
    })
    .unwrap();
    assert!(state.join("trainer.json").is_file());
    assert_eq!(entries(&root), ["other", "out", "state"]);
    std::fs::remove_dir_all(root).unwrap();
}

// 11. Token ids outside the vocabulary, and a mistyped local path that is no hub id.

#[test]
fn token_id_outside_the_vocabulary_is_invalid_argument() {
    let model = modification::Llama::from_checkpoint(common::smollm2()).unwrap();
    let err = modification::eval::perplexity(&model, &[1, 49152, 3]).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(msg) if msg.contains("49152")),
        "got {err:?}"
    );
}

#[test]
fn missing_two_part_local_path_is_io_not_found_not_a_hub_id() {
    let err = Checkpoint::load("assets/missing.gguf", DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "got {err:?}"
    );
}

// 12. Architecture features this crate does not implement are refused, not ignored.

#[test]
fn config_with_rope_scaling_or_attention_bias_is_refused() {
    let base = r#""hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 16"#;
    for extra in [
        r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
        r#""attention_bias": true"#,
        r#""head_dim": 8"#,
    ] {
        let err = LlamaConfig::from_json_str(&format!("{{{base}, {extra}}}")).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{extra}: {err:?}");
    }
    let ok = LlamaConfig::from_json_str(&format!(
        "{{{base}, \"rope_scaling\": null, \"head_dim\": 4}}"
    ));
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn nested_rope_parameters_reach_the_rotary_table() {
    let base = r#""hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 16, "max_position_embeddings": 128"#;
    let nested = LlamaConfig::from_json_str(&format!(
        r#"{{{base}, "rope_parameters": {{"rope_type": "default", "rope_theta": 500000.0}}}}"#
    ))
    .unwrap();
    assert_eq!(nested.rope_theta, 500_000.0);
    let flat = LlamaConfig::from_json_str(&format!("{{{base}}}")).unwrap();
    assert_eq!(flat.rope_theta, 10_000.0);
    // The model built from it rotates with θ = 500000, not 10000: compare the cosine of
    // the slowest pair at position 100 with cos(100 · θ^(-2/4)).
    let cos_at_100 = |cfg: &LlamaConfig| -> f32 {
        let vb = candle_nn::VarBuilder::from_tensors(tiny_tensors(cfg), DType::F32, &Device::Cpu);
        let model = modification::Llama::load(vb, cfg).unwrap();
        let pos = Tensor::new(&[[100u32]], &Device::Cpu).unwrap();
        let rope = model.rope().at(&pos, DType::F32).unwrap();
        rope.cos.flatten_all().unwrap().to_vec1::<f32>().unwrap()[1]
    };
    let expect = |theta: f64| (100.0 * theta.powf(-2.0 / 4.0)).cos() as f32;
    assert!((cos_at_100(&nested) - expect(500_000.0)).abs() < 1e-5);
    assert!((cos_at_100(&flat) - expect(10_000.0)).abs() < 1e-5);
    assert!((expect(500_000.0) - expect(10_000.0)).abs() > 0.1);
    // Other rope types and contradictions are refused.
    for extra in [
        r#""rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}"#,
        r#""rope_parameters": {"rope_theta": "big"}"#,
        r#""rope_theta": 10000.0, "rope_parameters": {"rope_theta": 500000.0}"#,
        r#""rope_parameters": 5"#,
        r#""rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5e5}}"#,
        r#""rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}"#,
    ] {
        let err = LlamaConfig::from_json_str(&format!("{{{base}, {extra}}}")).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{extra}: {err:?}");
    }
    let default_scaling = LlamaConfig::from_json_str(&format!(
        r#"{{{base}, "rope_scaling": {{"rope_type": "default"}}}}"#
    ));
    assert!(default_scaling.is_ok(), "{default_scaling:?}");
}

/// The promise of this suite, over the whole public API: zero sizes and out-of-range
/// indices are typed errors, never panics.
#[test]
fn public_constructors_refuse_zero_sizes_and_out_of_range_indices() {
    use modification::mixture_of_depths::{ModConfig, RouterKind};
    use modification::model::{kv_cache::KvCache, LoraConfig, RotaryEmbedding};
    use modification::routing::{selection, Dispatch, Router, Selection};
    use modification::train::{Corpus, CorpusOptions, TrainConfig};
    let cpu = Device::Cpu;
    let is_err = |what: &str, r: Result<(), Error>| assert!(r.is_err(), "{what} was accepted");

    // Batches.
    is_err("no rows", Batch::from_rows(&[], 0, 8, &cpu).map(drop));
    is_err(
        "an empty row",
        Batch::from_rows(&[vec![]], 0, 8, &cpu).map(drop),
    );
    is_err(
        "zero context",
        Batch::from_rows(&[vec![1]], 0, 0, &cpu).map(drop),
    );
    is_err(
        "starts/rows",
        Batch::continuing(&[vec![1]], &[], 0, 8, &cpu).map(drop),
    );
    is_err(
        "start past context",
        Batch::continuing(&[vec![1]], &[8], 0, 8, &cpu).map(drop),
    );
    let empty = Tensor::zeros((0, 0), DType::U32, &cpu).unwrap();
    is_err(
        "empty tensors",
        Batch::from_tensors(&empty, &empty, 8).map(drop),
    );

    // The KV cache and the routing primitives.
    is_err("cache of no layers", KvCache::new(0, 1).map(drop));
    is_err("cache of no rows", KvCache::new(1, 0).map(drop));
    is_err("kept past T", Selection::new(vec![vec![0, 3]], 3).map(drop));
    is_err(
        "kept unordered",
        Selection::new(vec![vec![1, 1]], 3).map(drop),
    );
    let none = Selection::new(vec![vec![]], 3).unwrap();
    assert!(Dispatch::new(&none, &cpu, DType::F32).unwrap().is_none());
    is_err(
        "p = 0",
        selection::threshold_p(&[0.5], &[1], 1, 0.0, &[0]).map(drop),
    );
    is_err(
        "no gates",
        selection::threshold_p(&[], &[1], 1, 0.5, &[0]).map(drop),
    );
    is_err(
        "length > T",
        selection::threshold_p(&[0.5], &[2], 1, 0.5, &[0]).map(drop),
    );
    is_err(
        "sinks/rows",
        selection::threshold_p(&[0.5], &[1], 1, 0.5, &[]).map(drop),
    );
    is_err(
        "capacity 0",
        selection::top_k(&[0.5], &[1], 1, 0.0, &[0]).map(drop),
    );
    is_err(
        "no logits",
        selection::top_k(&[], &[1], 1, 0.5, &[0]).map(drop),
    );
    let w = Tensor::zeros((2, 4), DType::F32, &cpu).unwrap();
    let b = Tensor::zeros(1, DType::F32, &cpu).unwrap();
    is_err(
        "router weight (2, 4)",
        Router::from_tensors(w, b.clone()).map(drop),
    );
    let w0 = Tensor::zeros((1, 0), DType::F32, &cpu).unwrap();
    is_err("router of width 0", Router::from_tensors(w0, b).map(drop));

    // Model pieces and configs.
    is_err(
        "RoPE head 0",
        RotaryEmbedding::new(0, 8, 1e4, &cpu).map(drop),
    );
    is_err(
        "RoPE odd head",
        RotaryEmbedding::new(3, 8, 1e4, &cpu).map(drop),
    );
    is_err(
        "RoPE no positions",
        RotaryEmbedding::new(4, 0, 1e4, &cpu).map(drop),
    );
    is_err(
        "LoRA rank 0",
        LoraConfig {
            rank: 0,
            alpha: 1.0,
        }
        .validate(8),
    );
    is_err(
        "LoRA rank > d",
        LoraConfig {
            rank: 9,
            alpha: 1.0,
        }
        .validate(8),
    );
    let mut cfg = tiny_config();
    cfg.num_hidden_layers = 0;
    is_err("zero layers", cfg.validate());
    let top_k = ModConfig {
        router: RouterKind::TopK { capacity: 0.0 },
        ..ModConfig::default()
    };
    is_err("capacity 0 config", top_k.validate(4));
    let zero_steps = TrainConfig {
        steps: 0,
        ..TrainConfig::default()
    };
    is_err("zero steps", zero_steps.validate());
    let dir = common::temp_dir("bad-ctor");
    let tok = load(&write_tiny_hf(&dir)).unwrap().tokenizer;
    std::fs::remove_dir_all(&dir).unwrap();
    let opts = CorpusOptions::default();
    is_err(
        "no corpus sources",
        Corpus::load(&[], &tok, 2, &opts).map(drop),
    );

    // Model entry points on a tiny model.
    let vb = candle_nn::VarBuilder::from_tensors(tiny_tensors(&tiny_config()), DType::F32, &cpu);
    let model = Llama::load(vb, &tiny_config()).unwrap();
    is_err(
        "perplexity of 1 token",
        eval::perplexity(&model, &[1]).map(drop),
    );
    is_err(
        "rows of 1 token",
        eval::dense_rows_perplexity(&model, &[vec![1]]).map(drop),
    );
    is_err(
        "greedy, empty prompt",
        modification::generate::greedy(&model, &[], 2, None).map(drop),
    );
    let routed = modification::ModModel::dense(model).unwrap();
    is_err("cache of 0 rows", routed.new_cache(0).map(drop));
    let rows: Vec<Vec<u32>> = vec![];
    is_err(
        "no prompts",
        modification::generate::greedy_batch(&routed, &rows, 2).map(drop),
    );
    is_err(
        "calibration without rows",
        modification::calibrate::calibrate_compute(&routed, &rows, 0.9).map(drop),
    );
    let mut cache = routed.new_cache(1).unwrap();
    let two_rows = Batch::from_rows(&[vec![1], vec![2]], 0, 32, &cpu).unwrap();
    is_err(
        "batch/cache rows",
        routed.forward_cached(&two_rows, &mut cache).map(drop),
    );
}
