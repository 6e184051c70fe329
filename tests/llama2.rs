//! LLaMA-2 for real: the SentencePiece vocabulary of a LLaMA GGUF against the ids of
//! llama-tokenizer-js@1.2.2 (which match LLaMA's own tokenizer), and a LLaMA-2-shaped
//! checkpoint (MHA, untied `lm_head`, θ = 10000, sharded safetensors and GGUF) against
//! HF transformers.

mod common;
#[path = "common/llama2.rs"]
mod llama2;
#[path = "common/tiny.rs"]
mod tiny;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{DType, Device, IndexOp, Tensor};
use modification::checkpoint::converted::save_converted;
use modification::checkpoint::export::save_hf;
use modification::checkpoint::sentencepiece::merges_by_score;
use modification::checkpoint::tokenizer;
use modification::train::{Corpus, CorpusOptions, SourceSpec, TrainConfig, Trainer};
use modification::{Batch, Checkpoint, Error, Llama, ModConfig, ModModel, Mode};
use std::io::Cursor;

/// Reads `metadata` back as GGUF content, as a file holding only it would be read.
fn gguf_content(metadata: &[(String, Value)]) -> gguf_file::Content {
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut bytes = Cursor::new(Vec::new());
    gguf_file::write(&mut bytes, &meta, &[]).unwrap();
    bytes.set_position(0);
    gguf_file::Content::read(&mut bytes).unwrap()
}

fn llama_tokenizer() -> tokenizers::Tokenizer {
    tokenizer::from_gguf(&gguf_content(&llama2::tokenizer_metadata())).unwrap()
}

#[test]
fn merges_from_scores_are_llamas_merges() {
    let r = llama2::reference();
    let merges = merges_by_score(
        &r.tokens,
        &llama2::scores(&r.tokens),
        &llama2::token_types(&r.tokens)
            .into_iter()
            .map(i64::from)
            .collect::<Vec<_>>(),
    );
    assert_eq!(merges.len(), 61249);
    assert_eq!(merges, r.merges);
}

#[test]
fn sentencepiece_gguf_tokenizer_gives_llama_ids() {
    let tok = llama_tokenizer();
    let r = llama2::reference();
    assert_eq!(r.cases.len(), 12);
    for case in &r.cases {
        let ids = tok
            .encode(case.text.as_str(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids, case.ids, "ids of {:?}", case.text);
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            case.text,
            "decode of {:?}",
            case.text
        );
    }
    // The empty text is BOS alone; without special tokens it is nothing.
    assert_eq!(tok.encode("", true).unwrap().get_ids(), &[1]);
    assert!(tok.encode("", false).unwrap().get_ids().is_empty());
    // Special pieces in the text are matched whole, and decode skips them.
    let ids = tok
        .encode("<s>grabbed</s>", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.decode(&ids, true).unwrap().trim(), "grabbed");
}

#[test]
fn gguf_tokenizer_models_other_than_gpt2_and_llama_are_named_errors() {
    let mut metadata = llama2::tokenizer_metadata();
    metadata[0].1 = Value::String("bert".into());
    let err = tokenizer::from_gguf(&gguf_content(&metadata)).unwrap_err();
    assert!(
        matches!(&err, Error::Tokenizer(m) if m.contains("`bert`")),
        "{err:?}"
    );
    // Scores that do not cover the vocabulary are refused, not truncated.
    let mut metadata = llama2::tokenizer_metadata();
    metadata[2].1 = Value::Array(vec![Value::F32(0.0); 10]);
    let err = tokenizer::from_gguf(&gguf_content(&metadata)).unwrap_err();
    assert!(
        matches!(&err, Error::Tokenizer(m) if m.contains("scores")),
        "{err:?}"
    );
}

/// The first 24 reference ids of the package's long test text (BOS first).
fn prompt() -> Vec<u32> {
    llama2::reference().cases[11].ids[..24].to_vec()
}

/// Logits `(T, vocab)` of the one-row prompt.
fn logits(ckpt: &Checkpoint) -> Tensor {
    let model = Llama::from_checkpoint(ckpt).unwrap();
    let batch = Batch::single(&prompt(), 128, &Device::Cpu).unwrap();
    model.forward(&batch).unwrap().i(0).unwrap()
}

/// HF transformers 5.24 (PyTorch 2.15, float32, eager attention) on the fixture's HF
/// folder, by `scripts/llama2-reference.py target/llama2-fixture/hf`: for positions 0, 7
/// and 23 of [`prompt`], the logits of tokens 0, 1, 13, 450, 29871 and 31999, and the sum
/// of the row.
const TRANSFORMERS_POSITIONS: [usize; 3] = [0, 7, 23];
const TRANSFORMERS_TOKENS: [usize; 6] = [0, 1, 13, 450, 29871, 31999];
const TRANSFORMERS_LOGITS: [[f32; 6]; 3] = [
    [
        -1.235723, 0.4138266, 0.1665589, 0.1984717, 0.994853, 0.9056378,
    ],
    [
        0.1043173, -0.4267939, -0.4001292, -0.2727746, 0.9173139, -0.1294287,
    ],
    [
        0.2539316, 0.2749821, 0.7066051, -0.1676467, -0.116551, 1.059266,
    ],
];
const TRANSFORMERS_ROW_SUMS: [f32; 3] = [-138.947, -112.0044, -66.08517];

#[test]
fn llama2_shaped_checkpoint_is_the_same_model_in_every_format_and_in_transformers() {
    let fx = llama2::fixture();
    let from_hf = Checkpoint::load(fx.hf.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let from_gguf = Checkpoint::load(fx.gguf.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    for ckpt in [&from_hf, &from_gguf] {
        let c = &ckpt.config;
        assert_eq!(
            c.num_kv_heads(),
            c.num_attention_heads,
            "multi-head attention"
        );
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.vocab_size, 32_000);
        assert_eq!(c.bos_token_id, Some(1));
    }
    assert_eq!(from_hf.config, from_gguf.config);
    // The tokenizer.json of the folder and the GGUF metadata tokenize alike.
    let text = &llama2::reference().cases[11].text;
    for ckpt in [&from_hf, &from_gguf] {
        let ids = ckpt.tokenizer.encode(text.as_str(), true).unwrap();
        assert_eq!(ids.get_ids(), &llama2::reference().cases[11].ids[..]);
    }

    let a = logits(&from_hf);
    let b = logits(&from_gguf);
    assert_eq!(common::max_diff(&a, &b), 0.0, "sharded safetensors vs GGUF");
    let rows: Vec<Vec<f32>> = a.to_vec2().unwrap();
    for (i, &pos) in TRANSFORMERS_POSITIONS.iter().enumerate() {
        let sum: f32 = rows[pos].iter().sum();
        let rel = (sum - TRANSFORMERS_ROW_SUMS[i]).abs() / TRANSFORMERS_ROW_SUMS[i].abs().max(1.0);
        assert!(
            rel < 1e-4,
            "row sum at {pos}: {sum} vs {}",
            TRANSFORMERS_ROW_SUMS[i]
        );
        for (j, &tok) in TRANSFORMERS_TOKENS.iter().enumerate() {
            let want = TRANSFORMERS_LOGITS[i][j];
            let got = rows[pos][tok];
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "logit of {tok} at {pos}: {got} vs transformers {want}"
            );
        }
    }
}

#[test]
fn llama2_shaped_checkpoint_converts_saves_and_reloads() {
    let fx = llama2::fixture();
    let ckpt = Checkpoint::load(fx.gguf.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();

    // The exported HF folder of the GGUF reloads as the same model.
    let dir = common::temp_dir("llama2-export");
    save_hf(&ckpt, &dir.join("hf")).unwrap();
    let exported =
        Checkpoint::load(dir.join("hf").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(exported.config, ckpt.config);
    assert_eq!(common::max_diff(&logits(&exported), &logits(&ckpt)), 0.0);

    // A few conversion steps on the real corpus, tokenized with the LLaMA vocabulary.
    let specs = SourceSpec::folders_of(&common::root().join("assets/corpus")).unwrap();
    let opts = CorpusOptions {
        seq_len: 32,
        heldout_rows: 1,
        max_chars_per_source: 5_000,
        seed: 1,
    };
    let corpus = Corpus::load(&specs, &ckpt.tokenizer, 2, &opts).unwrap();
    let mod_config = ModConfig {
        alpha: 0.5,
        ..ModConfig::default()
    };
    let train = TrainConfig {
        steps: 2,
        batch_size: 2,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&ckpt, mod_config, train).unwrap();
    trainer.run(&corpus, None, 0, |_| {}).unwrap();
    let out = dir.join("converted");
    save_converted(
        &out,
        &ckpt,
        &trainer.trained_tensors(),
        trainer.model().config(),
    )
    .unwrap();
    let loaded = ModModel::load(out.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), trainer.model().config());
    // Routed layers exist on a 2-layer model (layer 1 under the default odd-layer rule).
    assert!(!loaded.config().routed_layer_indices(2).unwrap().is_empty());
    let batch = Batch::from_rows(&corpus.sources[0].heldout, 0, 4096, &Device::Cpu).unwrap();
    let a = trainer.model().forward(&batch, Mode::Inference).unwrap();
    let b = loaded.forward(&batch, Mode::Inference).unwrap();
    assert_eq!(common::max_diff(&a.logits, &b.logits), 0.0);

    // Generation gives the prompt LLaMA's BOS, as the tokenizer's template says.
    let sampling = modification::generate::SamplingConfig {
        max_new_tokens: 3,
        ..Default::default()
    };
    let generation = modification::generate::generate(
        &loaded,
        &loaded_tokenizer(&out),
        "grabbed",
        &sampling,
        |_| {},
    )
    .unwrap();
    assert_eq!(generation.prompt_tokens, 4, "BOS + ▁gra bb ed");
    assert_eq!(generation.tokens.len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn loaded_tokenizer(dir: &std::path::Path) -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
}

#[test]
fn a_sharded_index_naming_a_missing_shard_is_an_error_naming_the_file() {
    let fx = llama2::fixture();
    let dir = common::temp_dir("llama2-missing-shard");
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
    ] {
        std::fs::copy(fx.hf.join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(
        fx.hf.join("model-00001-of-00002.safetensors"),
        dir.join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    let err = Checkpoint::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path.ends_with("model-00002-of-00002.safetensors")),
        "{err:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// LLaMA-2-7B's `config.json` (meta-llama/Llama-2-7b-hf), values only: no weights.
fn llama2_7b() -> modification::LlamaConfig {
    modification::LlamaConfig::from_json_str(
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
            "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2}"#,
    )
    .unwrap()
}

#[test]
fn memory_plan_of_llama2_7b_matches_the_readme_arithmetic() {
    use modification::train::memory::{
        check_fits, conversion_memory, lora_parameter_count, parameter_count,
    };
    use modification::train::{Objective, Trainable};
    let cfg = llama2_7b();
    // LLaMA-2-7B's published parameter count.
    assert_eq!(parameter_count(&cfg), 6_738_415_616);
    // r · (in + out) over q, k, v, o, gate, up, down: 8 · 78 080 per layer, 32 layers.
    assert_eq!(lora_parameter_count(&cfg, 8), 19_988_480);

    // The README's arithmetic for the default recipe (LoRA r = 8, KL) in bf16:
    // 13.48 GB weights + 0.08 trained + 0.24 moments and gradients + 0.2 process
    // + activations 1.45 × 27.97 MB per token at T = 256 (layers 26.30, logits 1.66),
    // 1.45 × 26.66 MB per token at T = 128.
    let train = |trainable, batch_size| TrainConfig {
        trainable,
        objective: Objective::Kl,
        batch_size,
        ..TrainConfig::default()
    };
    let readme = [(4, 256, 55.5e9), (1, 256, 24.4e9), (1, 128, 18.9e9)];
    for (batch, seq_len, want) in readme {
        let got = conversion_memory(&cfg, DType::BF16, &train(Trainable::Lora, batch), seq_len);
        let rel = (got.total() - want).abs() / want;
        assert!(
            rel < 0.10,
            "{batch} x {seq_len}: estimate {got} vs README {want:e}"
        );
    }
    // On 24 GB, 4 × 256 and 1 × 256 are refused, 1 × 128 fits; full-parameter needs f32
    // master copies, moments and gradients (18 bytes a parameter more than LoRA).
    let available = 24e9;
    for batch in [4, 1] {
        let plan = conversion_memory(&cfg, DType::BF16, &train(Trainable::Lora, batch), 256);
        let err = check_fits(&plan, available).unwrap_err();
        assert!(
            matches!(err, Error::InsufficientMemory { needed, available: a, .. }
                if needed == plan.total() && a == available),
            "{err:?}"
        );
    }
    let small = conversion_memory(&cfg, DType::BF16, &train(Trainable::Lora, 1), 128);
    check_fits(&small, available).unwrap();
    let full = conversion_memory(&cfg, DType::BF16, &train(Trainable::All, 1), 256);
    assert!(full.total() > 130e9, "{full}");
    assert!(check_fits(&full, available).is_err());
}

#[test]
fn memory_plan_of_smollm2_in_f32_bounds_the_measured_peaks() {
    use modification::train::memory::conversion_memory;
    use modification::train::{Objective, Trainable};
    // Peak resident memory of whole `convert --steps 1` runs (4 × 256 tokens, f32, the
    // fused CPU kernels, `/usr/bin/time`'s KiB in bytes), measured 2026-12-01: router-only
    // under the LM loss (every layer with `Keep`, and the paper's odd layers with `Skip`,
    // planned alike), full-parameter and LoRA under the KL. The plan must not fall below
    // any.
    let path = common::gguf_path();
    let cfg = Checkpoint::read_config(path.to_str().unwrap()).unwrap();
    let measured = [
        (Trainable::Routers, Objective::Lm, 3.42e9),
        (Trainable::Routers, Objective::Lm, 3.88e9),
        (Trainable::All, Objective::Kl, 5.41e9),
        (Trainable::Lora, Objective::Kl, 5.62e9),
    ];
    for (trainable, objective, peak) in measured {
        let train = TrainConfig {
            trainable,
            objective,
            batch_size: 4,
            ..TrainConfig::default()
        };
        let plan = conversion_memory(&cfg, DType::F32, &train, 256).total();
        assert!(
            plan >= peak && plan < 1.35 * peak,
            "{trainable:?} {objective:?}: planned {plan:e} against {peak:e} measured"
        );
    }
}
