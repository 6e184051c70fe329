//! The dense model against an independent reference: HF transformers 5.24 / PyTorch 2.15
//! loading the same GGUF in float32 (values from the foundation issue).

mod common;

use candle_core::{DType, Device};
use modification::checkpoint::export;
use modification::text;
use modification::{eval, generate, Checkpoint, Llama};

const REF_FIRST_IDS: [u32; 8] = [105, 511, 451, 314, 441, 1355, 2455, 30];
const REF_NLL: f64 = 3.430149;
const REF_PPL: f64 = 30.8813;

fn assert_matches_reference(ppl: eval::Perplexity) {
    assert_eq!(ppl.tokens, 256);
    let rel = (ppl.perplexity - REF_PPL).abs() / REF_PPL;
    assert!(
        rel < 1e-3,
        "perplexity {} vs reference {REF_PPL} (rel {rel})",
        ppl.perplexity
    );
    assert!(
        (ppl.nll - REF_NLL).abs() < 1e-3 * REF_NLL,
        "nll {} vs {REF_NLL}",
        ppl.nll
    );
}

#[test]
fn gguf_tokenizer_matches_hf_ids() {
    let ids = common::moby_reference_ids();
    assert_eq!(&ids[..8], &REF_FIRST_IDS);
    assert_eq!(ids.len(), 256);
}

#[test]
fn gguf_perplexity_matches_transformers() {
    let ckpt = common::smollm2();
    assert_eq!(ckpt.config.num_hidden_layers, 30);
    assert_eq!(ckpt.config.hidden_size, 576);
    assert_eq!(ckpt.config.num_kv_heads(), 3);
    assert!(ckpt.config.tie_word_embeddings);
    assert_eq!(ckpt.config.rope_theta, 100_000.0);
    let model = Llama::from_checkpoint(ckpt).unwrap();
    assert_matches_reference(eval::perplexity(&model, &common::moby_reference_ids()).unwrap());
}

#[test]
fn exported_hf_folder_reloads_with_same_perplexity_and_tokens() {
    let dir = common::temp_dir("export").join("smollm2-hf");
    export::save_hf(common::smollm2(), &dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.join(f).is_file(), "{f} not written");
    }
    let reloaded = Checkpoint::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(reloaded.config, common::smollm2().config);
    // The exported tokenizer.json gives the reference ids too.
    let ids = text::encode(&reloaded.tokenizer, &common::moby_reference_text()).unwrap();
    assert_eq!(&ids[..8], &REF_FIRST_IDS);
    let model = Llama::from_checkpoint(&reloaded).unwrap();
    assert_matches_reference(eval::perplexity(&model, &common::moby_reference_ids()).unwrap());
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn greedy_continuation_matches_transformers() {
    let ckpt = common::smollm2();
    let model = Llama::from_checkpoint(ckpt).unwrap();
    let prompt = text::encode(
        &ckpt.tokenizer,
        "Once upon a time, there was a little girl named",
    )
    .unwrap();
    let new = generate::greedy(&model, &prompt, 20, None).unwrap();
    assert_eq!(new.len(), 20);
    let text = text::decode(&ckpt.tokenizer, &new).unwrap();
    assert_eq!(
        text,
        " Emma who loved to play in the sun. She would often go to the beach and play with her"
    );
}

/// Perplexity of `ids` computed the way generation runs: one token at a time through the
/// KV cache, each step a one-row product (where quantized blocks are used).
fn decode_perplexity(model: &Llama, ids: &[u32]) -> f64 {
    use candle_core::{Device, IndexOp};
    use candle_nn::ops::log_softmax;
    let model = modification::ModModel::dense(model.clone()).unwrap();
    let mut cache = model.new_cache(1).unwrap();
    let first = modification::Batch::single(&ids[..1], 8192, &Device::Cpu).unwrap();
    let mut logits = model.forward_cached(&first, &mut cache).unwrap().logits;
    let mut nll = 0.0;
    for &next in &ids[1..] {
        let lp = log_softmax(&logits.i((0, 0)).unwrap(), 0).unwrap();
        nll -= lp.i(next as usize).unwrap().to_scalar::<f32>().unwrap() as f64;
        let step =
            generate::decode_batch(&[next], cache.next_positions(), 8192, &Device::Cpu).unwrap();
        logits = model.forward_cached(&step, &mut cache).unwrap().logits;
    }
    (nll / (ids.len() - 1) as f64).exp()
}

/// Quantized decode with the file's own Q4_1 blocks (and its Q8_0 output matrix) against
/// the f32 model (which holds exactly the dequantized blocks), both decoding the reference
/// text token by token. The blocks multiply f32 activations directly, so the only
/// difference is the order of the float sums: far inside the 0.5% the issue asks.
#[test]
fn quantized_q4_1_decode_stays_within_half_a_percent_of_the_f32_model() {
    let dense = Llama::from_checkpoint(common::smollm2()).unwrap();
    let ids = &common::moby_reference_ids()[..128];
    let blocks = modification::checkpoint::gguf::load_blocks(&common::gguf_path()).unwrap();
    assert_eq!(blocks.len(), 30 * 7 + 1);
    let mut q4 = dense.clone();
    assert_eq!(q4.use_blocks(&blocks).unwrap(), 30 * 7 + 1);
    let f32_ppl = decode_perplexity(&dense, ids);
    let q4_ppl = decode_perplexity(&q4, ids);
    let rel = (q4_ppl - f32_ppl).abs() / f32_ppl;
    assert!(
        rel < 0.005,
        "Q4_1 blocks: perplexity {q4_ppl} vs f32 {f32_ppl} (rel {rel})"
    );
    // Prefill (many rows) runs on the dense weights: the full forward is the f32 model's,
    // also when the rows leave a short last vocabulary chunk (131 = 128 + 3 rows).
    for n in [128, 131] {
        let ids = &common::moby_reference_ids()[..n];
        let full = eval::perplexity(&q4, ids).unwrap().perplexity;
        assert_eq!(
            full,
            eval::perplexity(&dense, ids).unwrap().perplexity,
            "{n}"
        );
    }
}

#[test]
fn quantizing_the_dequantized_weights_reproduces_the_files_blocks() {
    use candle_core::quantized::GgmlDType;
    let dense = Llama::from_checkpoint(common::smollm2()).unwrap();
    let ids = &common::moby_reference_ids()[..24];
    let blocks = modification::checkpoint::gguf::load_blocks(&common::gguf_path()).unwrap();
    let mut from_file = dense.clone();
    from_file.use_blocks(&blocks).unwrap();
    // Q4_1 projections and a Q8_0 lm_head, as the file stores them: the same blocks, so the
    // same decode to the last bit (q/k rows un-permuted block-row by block-row right).
    let mut requantized = dense.clone();
    requantized.quantize(GgmlDType::Q4_1).unwrap();
    let (a, b) = (
        decode_perplexity(&requantized, ids),
        decode_perplexity(&from_file, ids),
    );
    assert_eq!(a, b);
    // And the blocks are used: decoding through them differs from the f32 model.
    assert_ne!(a, decode_perplexity(&dense, ids));
}
