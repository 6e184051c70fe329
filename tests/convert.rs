//! Conversion on the real model and corpus (few steps, short rows, inside the CI budget).

mod common;

use candle_core::{DType, Device};
use modification::checkpoint::converted::save_converted;
use modification::eval;
use modification::mixture_of_depths::RouterKind;
use modification::train::{Corpus, CorpusOptions, SourceSpec, TrainConfig, Trainer};
use modification::{Batch, Checkpoint, Error, Llama, ModConfig, ModModel, Mode};
use std::collections::BTreeMap;

fn corpus() -> &'static Corpus {
    common::small_corpus()
}

fn small_run(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 2,
        ..TrainConfig::default()
    }
}

#[test]
fn corpus_has_five_sources_with_disjoint_heldout_rows() {
    let c = corpus();
    let names: Vec<&str> = c.sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["email", "moby", "pydoc", "sotu", "zh"]);
    for s in &c.sources {
        assert_eq!(s.heldout.len(), 2);
        assert!(s.heldout.iter().all(|r| r.len() == 48));
        assert!(s.train.len() > 48);
        // Documents are separated by EOS (id 2 for SmolLM2).
        assert!(s.train.contains(&2), "{} has no EOS", s.name);
    }
    // Training batches are a pure function of (seed, step, micro): a corpus loaded afresh
    // gives the same rows; another step gives others.
    let specs = SourceSpec::folders_of(&common::root().join("assets/corpus")).unwrap();
    let opts = CorpusOptions {
        seq_len: 48,
        heldout_rows: 2,
        max_chars_per_source: 20_000,
        seed: 1,
    };
    let again = Corpus::load(&specs, &common::smollm2().tokenizer, 2, &opts).unwrap();
    assert_eq!(c.train_batch(5, 3, 0, 4), again.train_batch(5, 3, 0, 4));
    assert_ne!(c.train_batch(5, 3, 0, 4), c.train_batch(5, 4, 0, 4));
    for row in c.train_batch(5, 3, 0, 4) {
        assert!(
            c.sources.iter().all(|s| !s.heldout.contains(&row)),
            "a training row is held out"
        );
    }
}

#[test]
fn fresh_conversion_reproduces_the_original_perplexity() {
    let ckpt = common::smollm2();
    let trainer = Trainer::new(ckpt, ModConfig::default(), small_run(1)).unwrap();
    let ids = common::moby_reference_ids();
    let routed =
        eval::routed_rows_eval(trainer.model(), std::slice::from_ref(&ids), false).unwrap();
    let dense =
        eval::dense_rows_perplexity(&Llama::from_checkpoint(ckpt).unwrap(), &[ids]).unwrap();
    // Equal up to float rounding: the routed model attends through the fused kernel, the
    // dense reference through candle's composed ops.
    let gap = (routed.perplexity.nll - dense.nll).abs() / dense.nll;
    assert!(
        gap < 1e-6,
        "NLL {} against {}",
        routed.perplexity.nll,
        dense.nll
    );
    assert!((routed.perplexity.perplexity - 30.8813).abs() / 30.8813 < 1e-3);
    assert!(routed.kept_fraction.iter().all(|&(_, f)| f == 1.0));
    assert_eq!(routed.kv_fraction, 1.0);
}

#[test]
fn load_reducing_loss_falls_while_lm_loss_stays_finite() {
    let ckpt = common::smollm2();
    let cfg = ModConfig {
        alpha: 0.5,
        ..ModConfig::default()
    };
    let mut trainer = Trainer::new(ckpt, cfg, small_run(8)).unwrap();
    let mut reports = Vec::new();
    trainer
        .run(corpus(), None, 0, |r| reports.push(r.clone()))
        .unwrap();
    assert_eq!(reports.len(), 8);
    assert!(reports
        .iter()
        .all(|r| r.lm_loss.is_finite() && r.lm_loss > 0.0));
    let first = reports[0].load_loss;
    let last = reports[7].load_loss;
    assert!(last < 0.9 * first, "load-reducing loss {first} -> {last}");
    assert!(reports[7].mean_kept() < 1.0, "no token learned to skip");
}

#[test]
fn saved_model_loads_back_with_identical_logits() {
    let ckpt = common::smollm2();
    let cfg = ModConfig {
        alpha: 0.5,
        ..ModConfig::default()
    };
    let mut trainer = Trainer::new(ckpt, cfg, small_run(3)).unwrap();
    trainer.run(corpus(), None, 0, |_| {}).unwrap();
    let dir = common::temp_dir("saved-model").join("converted");
    save_converted(
        &dir,
        ckpt,
        &trainer.trained_tensors(),
        trainer.model().config(),
    )
    .unwrap();
    let loaded = ModModel::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), trainer.model().config());
    let batch = Batch::from_rows(&corpus().sources[1].heldout, 0, 8192, &Device::Cpu).unwrap();
    let a = trainer.model().forward(&batch, Mode::Inference).unwrap();
    let b = loaded.forward(&batch, Mode::Inference).unwrap();
    assert_eq!(common::max_diff(&a.logits, &b.logits), 0.0);
    let kept_a: Vec<usize> = a.stats.iter().map(|s| s.kept).collect();
    let kept_b: Vec<usize> = b.stats.iter().map(|s| s.kept).collect();
    assert_eq!(kept_a, kept_b);
    // A dense checkpoint is not a converted model.
    let err = ModModel::from_checkpoint(ckpt).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let ckpt = common::smollm2();
    let cfg = ModConfig {
        alpha: 0.2,
        ..ModConfig::default()
    };
    let mut straight = Trainer::new(ckpt, cfg.clone(), small_run(4)).unwrap();
    straight.run(corpus(), None, 0, |_| {}).unwrap();

    let dir = common::temp_dir("resume").join("state");
    let mut first = Trainer::new(ckpt, cfg.clone(), small_run(4)).unwrap();
    for _ in 0..2 {
        first.train_step(corpus()).unwrap();
    }
    first.save_state(&dir, corpus()).unwrap();
    drop(first); // "killed"
    let mut resumed = Trainer::new(ckpt, cfg, small_run(4)).unwrap();
    resumed.load_state(&dir, corpus()).unwrap();
    assert_eq!(resumed.step(), 2);
    resumed.run(corpus(), None, 0, |_| {}).unwrap();

    let a = straight.trained_tensors();
    let b = resumed.trained_tensors();
    assert_eq!(a.len(), 30);
    for (name, t) in &a {
        assert_eq!(
            common::max_diff(t, &b[name]),
            0.0,
            "{name} differs after resume"
        );
    }
    // A state made with other settings is refused.
    let other = ModConfig {
        alpha: 0.3,
        ..ModConfig::default()
    };
    let mut mismatched = Trainer::new(ckpt, other, small_run(4)).unwrap();
    assert!(matches!(
        mismatched.load_state(&dir, corpus()),
        Err(Error::Config { .. })
    ));
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn resume_checks_its_inputs_and_may_raise_the_steps() {
    let ckpt = common::smollm2();
    let cfg = ModConfig::default();
    let dir = common::temp_dir("resume-inputs").join("state");
    let mut first = Trainer::new(ckpt, cfg.clone(), small_run(3)).unwrap();
    first.train_step(corpus()).unwrap();
    first.train_step(corpus()).unwrap();
    first.save_state(&dir, corpus()).unwrap();
    let reason = |r: modification::Result<()>| match r {
        Err(Error::Config { reason, .. }) => reason,
        other => panic!("expected a config error, got {other:?}"),
    };

    // Another --seq-len is another corpus.
    let specs = SourceSpec::folders_of(&common::root().join("assets/corpus")).unwrap();
    let opts = CorpusOptions {
        seq_len: 40,
        heldout_rows: 2,
        max_chars_per_source: 20_000,
        seed: 1,
    };
    let other_rows = Corpus::load(&specs, &ckpt.tokenizer, 2, &opts).unwrap();
    let mut t = Trainer::new(ckpt, cfg.clone(), small_run(3)).unwrap();
    assert!(reason(t.load_state(&dir, &other_rows)).contains("corpus"));
    // Other weights under the same config are another model.
    let mut other_model = ckpt.clone();
    let name = "model.embed_tokens.weight";
    let scaled = (&other_model.tensors[name] * 1.5).unwrap();
    other_model.tensors.insert(name.to_string(), scaled);
    let mut t = Trainer::new(&other_model, cfg.clone(), small_run(3)).unwrap();
    assert!(reason(t.load_state(&dir, corpus())).contains("base model"));
    // Fewer steps than already done is refused; more steps continue from step 2.
    let mut t = Trainer::new(ckpt, cfg.clone(), small_run(1)).unwrap();
    assert!(reason(t.load_state(&dir, corpus())).contains("step 2"));
    let mut longer = Trainer::new(ckpt, cfg, small_run(5)).unwrap();
    longer.load_state(&dir, corpus()).unwrap();
    assert_eq!(longer.step(), 2);
    let mut steps = Vec::new();
    longer
        .run(corpus(), None, 0, |r| steps.push(r.step))
        .unwrap();
    assert_eq!(steps, [3, 4, 5]);
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint() {
    let mut ckpt: Checkpoint = common::smollm2().clone();
    let cfg = small_run(3);
    // Poison the embedding of a token that step 2's rows hold and step 1's do not: step 1
    // trains and is checkpointed, step 2's loss turns NaN.
    let step1: Vec<u32> = corpus()
        .train_batch(cfg.seed, 0, 0, cfg.batch_size)
        .concat();
    let step2: Vec<u32> = corpus()
        .train_batch(cfg.seed, 1, 0, cfg.batch_size)
        .concat();
    let poison = *step2.iter().find(|t| !step1.contains(t)).unwrap();
    let name = "model.embed_tokens.weight";
    // Untie lm_head first, so that only the poisoned token's input embedding is NaN.
    ckpt.config.tie_word_embeddings = false;
    let e = ckpt.tensors[name].clone();
    ckpt.tensors.insert("lm_head.weight".to_string(), e.clone());
    let row = (e.narrow(0, poison as usize, 1).unwrap() * f64::NAN).unwrap();
    let poisoned = e
        .slice_assign(
            &[poison as usize..poison as usize + 1, 0..e.dim(1).unwrap()],
            &row,
        )
        .unwrap();
    ckpt.tensors.insert(name.to_string(), poisoned);

    let dir = common::temp_dir("nan").join("state");
    let mut bad = Trainer::new(&ckpt, ModConfig::default(), cfg.clone()).unwrap();
    let mut done = Vec::new();
    let err = bad
        .run(corpus(), Some(&dir), 1, |r| done.push(r.step))
        .unwrap_err();
    assert!(
        matches!(err, Error::NonFiniteLoss { step: 2, .. }),
        "{err:?}"
    );
    assert_eq!(done, [1]);
    // The checkpoint on disk is step 1's, intact and finite: a resumed trainer holds
    // exactly the weights the run had after step 1.
    let mut resumed = Trainer::new(&ckpt, ModConfig::default(), cfg).unwrap();
    resumed.load_state(&dir, corpus()).unwrap();
    assert_eq!(resumed.step(), 1);
    let after_step1 = bad.trained_tensors();
    for (name, t) in resumed.trained_tensors() {
        assert_eq!(common::max_diff(&t, &after_step1[&name]), 0.0, "{name}");
        let sum = t.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(sum.is_finite(), "{name}");
    }
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn bad_conversion_inputs_are_typed_errors() {
    let ckpt = common::smollm2();
    for p in [0.0, 1.0, 1.5] {
        let cfg = ModConfig {
            router: RouterKind::ThresholdP {
                p,
                per_layer: BTreeMap::new(),
            },
            ..ModConfig::default()
        };
        assert!(
            matches!(
                Trainer::new(ckpt, cfg, small_run(1)),
                Err(Error::Config { .. })
            ),
            "p = {p}"
        );
    }
    let cfg = ModConfig {
        router: RouterKind::TopK { capacity: 0.0 },
        ..ModConfig::default()
    };
    assert!(matches!(
        Trainer::new(ckpt, cfg, small_run(1)),
        Err(Error::Config { .. })
    ));
    let bad_target = TrainConfig {
        target_kept: Some(1.5),
        ..small_run(1)
    };
    assert!(matches!(
        Trainer::new(ckpt, ModConfig::default(), bad_target),
        Err(Error::InvalidArgument(_))
    ));

    // An empty source is named in the error.
    let root = common::temp_dir("empty-source");
    std::fs::create_dir_all(root.join("good")).unwrap();
    std::fs::write(root.join("good/a.txt"), "word ".repeat(2000)).unwrap();
    std::fs::create_dir_all(root.join("hollow")).unwrap();
    std::fs::write(root.join("hollow/LICENSE"), "not text").unwrap();
    let specs = SourceSpec::folders_of(&root).unwrap();
    let opts = CorpusOptions {
        seq_len: 32,
        heldout_rows: 1,
        ..CorpusOptions::default()
    };
    let err = Corpus::load(&specs, &ckpt.tokenizer, 2, &opts).unwrap_err();
    assert!(
        matches!(&err, Error::Data { source_name, .. } if source_name == "hollow"),
        "{err:?}"
    );
    // A missing source folder too.
    let missing = vec![SourceSpec {
        name: "gone".into(),
        dir: root.join("gone"),
        weight: 1.0,
    }];
    let err = Corpus::load(&missing, &ckpt.tokenizer, 2, &opts).unwrap_err();
    assert!(
        matches!(&err, Error::Data { source_name, .. } if source_name == "gone"),
        "{err:?}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
