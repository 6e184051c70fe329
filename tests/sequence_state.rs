//! Padding and the KV cache's sequence state: every batch layout the API accepts gives each
//! row what it gets alone, and every one it cannot compute right is a typed error.

mod common;
#[path = "common/tiny.rs"]
mod tiny;

use candle_core::{DType, Device, IndexOp, Tensor};
use modification::generate::decode_batch;
use modification::mixture_of_depths::{KvPolicy, RouterKind};
use modification::model::kv_cache::KvCache;
use modification::{Batch, Error, ModConfig, ModModel, Mode};

fn routed(kv: KvPolicy, router: RouterKind) -> ModModel {
    let cfg = ModConfig {
        router,
        kv_policy: kv,
        sink_tokens: 1,
        ..tiny::config_all_layers()
    };
    tiny::mod_model(tiny::llama(3), cfg, 3.0, 0.0)
}

fn models() -> Vec<ModModel> {
    vec![
        routed(KvPolicy::Skip, threshold(0.5)),
        routed(KvPolicy::Keep, threshold(0.5)),
        routed(KvPolicy::Skip, RouterKind::TopK { capacity: 0.5 }),
        ModModel::dense(tiny::llama(3)).unwrap(),
    ]
}

/// Rows of 6 and 3 tokens in a (2, 9) batch: right padding plus three columns no row uses.
fn padded_with_extra_columns(rows: &[Vec<u32>]) -> Batch {
    let t = 9;
    let mut ids = Vec::new();
    let mut valid = Vec::new();
    for row in rows {
        ids.extend(
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(0, t - row.len())),
        );
        valid.extend((0..t).map(|i| u8::from(i < row.len())));
    }
    let ids = Tensor::from_vec(ids, (rows.len(), t), &Device::Cpu).unwrap();
    let valid = Tensor::from_vec(valid, (rows.len(), t), &Device::Cpu).unwrap();
    Batch::from_tensors(&ids, &valid, 64).unwrap()
}

#[test]
fn extra_padding_columns_give_each_row_what_it_gets_alone() {
    let rows = vec![tiny::ids(6, 31), tiny::ids(3, 32)];
    let batch = padded_with_extra_columns(&rows);
    assert_eq!((batch.seq_len(), batch.lengths()), (9, &[6usize, 3][..]));
    for model in models() {
        let name = format!("{:?}", model.config().router);
        let alone = |row: &[u32]| Batch::single(row, 64, &Device::Cpu).unwrap();
        // Dense reference path.
        let dense = model.base().forward(&batch).unwrap();
        for mode in [Mode::Inference, Mode::Training] {
            let out = model.forward(&batch, mode).unwrap();
            let causal = model.forward_causal(&batch, mode).unwrap();
            let mut cache = model.new_cache(2).unwrap();
            let cached = model.forward_cached(&batch, &mut cache).unwrap();
            assert_eq!(cache.next_positions(), &[6, 3]);
            for (r, row) in rows.iter().enumerate() {
                let n = row.len();
                let want = model
                    .forward(&alone(row), mode)
                    .unwrap()
                    .logits
                    .i(0)
                    .unwrap();
                let got = out.logits.i((r, ..n)).unwrap();
                assert!(
                    common::max_diff(&got, &want) < 1e-4,
                    "{name} {mode:?} row {r}"
                );
                let want_c = model.forward_causal(&alone(row), mode).unwrap().logits;
                let want_c = want_c.i(0).unwrap();
                let got = causal.logits.i((r, ..n)).unwrap();
                assert!(
                    common::max_diff(&got, &want_c) < 1e-4,
                    "{name} causal row {r}"
                );
                let got = cached.logits.i((r, ..n)).unwrap();
                assert!(
                    common::max_diff(&got, &want_c) < 1e-4,
                    "{name} cached row {r}"
                );
                let want = model.base().forward(&alone(row)).unwrap().i(0).unwrap();
                let got = dense.i((r, ..n)).unwrap();
                assert!(common::max_diff(&got, &want) < 1e-4, "dense row {r}");
            }
            // Padding is never counted: 9 real tokens, not 18.
            assert!(out.stats.iter().all(|s| s.valid == 9 && s.kept <= 9));
        }
    }
}

#[test]
fn left_padding_is_refused() {
    let ids = Tensor::from_vec(vec![0u32, 5, 6, 7, 8, 9], (2, 3), &Device::Cpu).unwrap();
    let valid = Tensor::from_vec(vec![0u8, 1, 1, 1, 1, 1], (2, 3), &Device::Cpu).unwrap();
    let err = Batch::from_tensors(&ids, &valid, 64).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("left-padded")),
        "{err}"
    );
    // A hole in the middle of a row is left padding of its second part.
    let valid = Tensor::from_vec(vec![1u8, 0, 1, 1, 1, 1], (2, 3), &Device::Cpu).unwrap();
    assert!(Batch::from_tensors(&ids, &valid, 64).is_err());
    // A row of padding only, a mask value of 2, a shape mismatch, a too-long batch.
    let valid = Tensor::from_vec(vec![0u8, 0, 0, 1, 1, 1], (2, 3), &Device::Cpu).unwrap();
    assert!(Batch::from_tensors(&ids, &valid, 64).is_err());
    let valid = Tensor::from_vec(vec![1u8, 2, 1, 1, 1, 1], (2, 3), &Device::Cpu).unwrap();
    assert!(Batch::from_tensors(&ids, &valid, 64).is_err());
    let valid = Tensor::ones((3, 2), DType::U8, &Device::Cpu).unwrap();
    assert!(Batch::from_tensors(&ids, &valid, 64).is_err());
    let valid = Tensor::ones((2, 3), DType::U8, &Device::Cpu).unwrap();
    assert!(matches!(
        Batch::from_tensors(&ids, &valid, 2),
        Err(Error::SequenceTooLong { len: 3, max: 2 })
    ));
    let f = ids.to_dtype(DType::F32).unwrap();
    assert!(Batch::from_tensors(&f, &valid, 64).is_err());
}

/// Prefill 5 tokens of `tokens`, then one decode step: the cache of that state.
fn cache_after(model: &ModModel, tokens: &[u32]) -> KvCache {
    let mut cache = model.new_cache(1).unwrap();
    let prompt = Batch::single(&tokens[..5], 64, &Device::Cpu).unwrap();
    model.forward_cached(&prompt, &mut cache).unwrap();
    let step = decode_batch(&[tokens[5]], &[5], 64, &Device::Cpu).unwrap();
    model.forward_cached(&step, &mut cache).unwrap();
    cache
}

#[test]
fn a_restart_a_gap_or_an_overlap_is_refused_and_leaves_the_cache_usable() {
    let tokens = tiny::ids(12, 41);
    for model in models() {
        let mut cache = cache_after(&model, &tokens);
        assert_eq!(cache.next_positions(), &[6]);
        let before = cache.bytes();
        for (start, what) in [(0, "restart"), (8, "gap"), (4, "overlap")] {
            let batch =
                Batch::continuing(&[vec![tokens[6]]], &[start], 0, 64, &Device::Cpu).unwrap();
            let err = model.forward_cached(&batch, &mut cache).unwrap_err();
            assert!(
                matches!(err, Error::PositionMismatch { row: 0, expected: 6, got } if got == start),
                "{what}: {err}"
            );
            assert_eq!(
                (cache.next_positions(), cache.bytes()),
                (&[6usize][..], before)
            );
        }
        // The right continuation still gives the full forward's logits.
        let step = decode_batch(&[tokens[6]], &[6], 64, &Device::Cpu).unwrap();
        let got = model.forward_cached(&step, &mut cache).unwrap().logits;
        let full = Batch::single(&tokens[..7], 64, &Device::Cpu).unwrap();
        let want = model.forward_causal(&full, Mode::Inference).unwrap().logits;
        let d = common::max_diff(&got.i((0, 0)).unwrap(), &want.i((0, 6)).unwrap());
        assert!(d < 1e-4, "{d}");
    }
}

#[test]
fn decoding_past_the_context_is_sequence_too_long_before_any_compute() {
    let model = routed(KvPolicy::Skip, threshold(0.5));
    let tokens = tiny::ids(64, 42);
    let mut cache = model.new_cache(1).unwrap();
    let prompt = Batch::single(&tokens, 64, &Device::Cpu).unwrap();
    model.forward_cached(&prompt, &mut cache).unwrap();
    // A batch built against a larger limit than the model's context.
    let step = decode_batch(&[1], &[64], 128, &Device::Cpu).unwrap();
    let err = model.forward_cached(&step, &mut cache).unwrap_err();
    assert!(
        matches!(err, Error::SequenceTooLong { len: 65, max: 64 }),
        "{err}"
    );
    assert_eq!(cache.next_positions(), &[64]);
    assert!(matches!(
        decode_batch(&[1], &[64], 64, &Device::Cpu),
        Err(Error::SequenceTooLong { len: 65, max: 64 })
    ));
}

#[test]
fn chunked_prefill_equals_one_prefill() {
    let tokens = tiny::ids(13, 43);
    for model in models() {
        let full = Batch::single(&tokens, 64, &Device::Cpu).unwrap();
        let want = model.forward_causal(&full, Mode::Inference).unwrap().logits;
        let got = tiny::logits_in_chunks(&model, &tokens, &[(0, 4), (4, 5), (5, 13)]);
        let d = common::max_diff(&got, &want.i(0).unwrap());
        assert!(d < 1e-4, "{:?}: {d}", model.config().router);
    }
}

#[test]
fn reset_and_truncate_reuse_a_cache() {
    let tokens = tiny::ids(12, 44);
    let other = tiny::ids(12, 45);
    for model in models() {
        let name = format!("{:?} {:?}", model.config().router, model.config().kv_policy);
        // Reset: another prompt from position 0, as on a fresh cache.
        let mut cache = cache_after(&model, &tokens);
        cache.reset();
        assert!(cache.is_empty() && cache.bytes() == 0);
        let prompt = Batch::single(&other[..7], 64, &Device::Cpu).unwrap();
        let got = model.forward_cached(&prompt, &mut cache).unwrap().logits;
        let mut fresh = model.new_cache(1).unwrap();
        let want = model.forward_cached(&prompt, &mut fresh).unwrap().logits;
        assert_eq!(common::max_diff(&got, &want), 0.0, "{name}");
        assert_eq!(cache.bytes(), fresh.bytes());

        // Truncate to a shared prefix of 3 tokens, then continue with other tokens.
        let mut cache = cache_after(&model, &tokens);
        cache.truncate(3).unwrap();
        assert_eq!(cache.next_positions(), &[3]);
        let branch: Vec<u32> = tokens[..3].iter().chain(&other[3..8]).copied().collect();
        let rest = Batch::continuing(&[branch[3..].to_vec()], &[3], 0, 64, &Device::Cpu).unwrap();
        let got = model.forward_cached(&rest, &mut cache).unwrap().logits;
        let full = Batch::single(&branch, 64, &Device::Cpu).unwrap();
        let want = model.forward_causal(&full, Mode::Inference).unwrap().logits;
        let d = common::max_diff(&got.i(0).unwrap(), &want.i((0, 3..)).unwrap());
        assert!(d < 1e-4, "{name}: {d}");
    }
}

#[test]
fn kv_cache_bad_indices_are_errors_not_panics() {
    assert!(KvCache::new(0, 1).is_err());
    assert!(KvCache::new(2, 0).is_err());
    let model = routed(KvPolicy::Skip, threshold(0.5));
    let mut cache = model.new_cache(1).unwrap();
    let prompt = Batch::single(&tiny::ids(3, 48), 64, &Device::Cpu).unwrap();
    model.forward_cached(&prompt, &mut cache).unwrap();
    assert!(cache.len(3, 0).is_err() && cache.len(0, 1).is_err());
    assert!(cache
        .layer_keys(3, &Device::Cpu, DType::F32, 2, 16)
        .is_err());
    let keys = cache
        .layer_keys(0, &Device::Cpu, DType::F32, 2, 16)
        .unwrap()
        .unwrap();
    // Layer 0 keeps its sink and whatever passes p; the cache holds exactly those.
    let n = cache.len(0, 0).unwrap();
    assert!((1..=3).contains(&n));
    assert_eq!((keys.k.dims(), keys.lengths), (&[1, 2, n, 16][..], vec![n]));
    assert!(cache.check_continues(&[0, 0]).is_err());
    assert!(cache.check_continues(&[3]).is_ok());
}

#[test]
fn a_refused_decode_step_leaves_the_cache_as_it_was() {
    // A token id outside the vocabulary is refused before any compute, and the cache
    // continues as before. (A failure half-way through the layers restores the cache
    // from a snapshot: `kv_cache`'s unit test.)
    let model = routed(KvPolicy::Skip, threshold(0.5));
    let tokens = tiny::ids(8, 49);
    let mut cache = cache_after(&model, &tokens);
    let before = (cache.bytes(), cache.next_positions().to_vec());
    let bad = decode_batch(&[500], &[6], 64, &Device::Cpu).unwrap();
    assert!(model.forward_cached(&bad, &mut cache).is_err());
    assert_eq!((cache.bytes(), cache.next_positions().to_vec()), before);
    let good = decode_batch(&[tokens[6]], &[6], 64, &Device::Cpu).unwrap();
    let got = model.forward_cached(&good, &mut cache).unwrap().logits;
    let full = Batch::single(&tokens[..7], 64, &Device::Cpu).unwrap();
    let want = model.forward_causal(&full, Mode::Inference).unwrap().logits;
    assert!(common::max_diff(&got.i((0, 0)).unwrap(), &want.i((0, 6)).unwrap()) < 1e-4);
}

#[test]
fn a_cloned_cache_continues_independently() {
    // The cache writes decode steps into its buffers in place: a clone must own its own.
    let tokens = tiny::ids(12, 46);
    let other = tiny::ids(12, 47);
    for model in models() {
        let mut a = cache_after(&model, &tokens);
        let mut b = a.clone();
        let step = |cache: &mut KvCache, tok: u32| {
            let batch = decode_batch(&[tok], cache.next_positions(), 64, &Device::Cpu).unwrap();
            model
                .forward_cached(&batch, cache)
                .unwrap()
                .logits
                .i((0, 0))
                .unwrap()
        };
        // Interleave the two continuations so that any shared buffer would be overwritten.
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        for i in 6..9 {
            got_a.push(step(&mut a, tokens[i]));
            got_b.push(step(&mut b, other[i]));
        }
        for (seq, got) in [(&tokens, got_a), (&other, got_b)] {
            let full: Vec<u32> = tokens[..6].iter().chain(&seq[6..9]).copied().collect();
            let batch = Batch::single(&full, 64, &Device::Cpu).unwrap();
            let want = model
                .forward_causal(&batch, Mode::Inference)
                .unwrap()
                .logits;
            let got = Tensor::stack(&got, 0).unwrap();
            let d = common::max_diff(&got, &want.i((0, 6..9)).unwrap());
            assert!(d < 1e-4, "{:?}: {d}", model.config().router);
        }
    }
}

fn threshold(p: f64) -> RouterKind {
    RouterKind::ThresholdP {
        p,
        per_layer: Default::default(),
    }
}

/// A tiny model with a context long enough for several attention chunks.
fn long_context_llama() -> modification::Llama {
    let mut cfg = tiny::config(3);
    cfg.max_position_embeddings = 1024;
    let vb = candle_nn::VarBuilder::from_tensors(tiny::weights(&cfg), DType::F32, &Device::Cpu);
    modification::Llama::load(vb, &cfg).unwrap()
}

#[test]
fn long_prompts_attend_in_chunks_and_match_unchunked_references() {
    // 600 tokens: three query chunks. The dense model through the layer function must
    // equal `Llama::forward`, which attends all queries at once.
    let tokens = tiny::ids(600, 50);
    let base = long_context_llama();
    let full = Batch::single(&tokens, 1024, &Device::Cpu).unwrap();
    let dense = ModModel::dense(base.clone()).unwrap();
    let got = dense.forward(&full, Mode::Inference).unwrap().logits;
    let want = base.forward(&full).unwrap();
    assert!(common::max_diff(&got, &want) < 1e-4);
    for kv in [KvPolicy::Skip, KvPolicy::Keep] {
        let cfg = ModConfig {
            kv_policy: kv,
            sink_tokens: 1,
            ..tiny::config_all_layers()
        };
        let model = tiny::mod_model(base.clone(), cfg, 3.0, 0.0);
        let out = model.forward_causal(&full, Mode::Inference).unwrap();
        // Causality across chunks: a 300-token prompt (its last chunk partly filled)
        // gives the first 300 rows; a decode step after 599 tokens gives the last row.
        let head = Batch::single(&tokens[..300], 1024, &Device::Cpu).unwrap();
        let head = model.forward_causal(&head, Mode::Inference).unwrap().logits;
        let d = common::max_diff(&head, &out.logits.i((.., ..300)).unwrap());
        assert!(d < 1e-4, "{kv:?} head: {d}");
        let mut cache = model.new_cache(1).unwrap();
        let prompt = Batch::single(&tokens[..599], 1024, &Device::Cpu).unwrap();
        model.forward_cached(&prompt, &mut cache).unwrap();
        let step = decode_batch(&[tokens[599]], &[599], 1024, &Device::Cpu).unwrap();
        let last = model.forward_cached(&step, &mut cache).unwrap().logits;
        let d = common::max_diff(&last.i((0, 0)).unwrap(), &out.logits.i((0, 599)).unwrap());
        assert!(d < 1e-4, "{kv:?} last: {d}");
        // Training computes the same forward value through the same chunks.
        let train = model.forward_causal(&full, Mode::Training).unwrap().logits;
        assert!(
            common::max_diff(&train, &out.logits) < 1e-4,
            "{kv:?} training"
        );
    }
}
