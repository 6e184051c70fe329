//! Conversion on the real model and corpus (few steps, short rows, inside the CI budget).

mod common;

use candle_core::{DType, Device};
use modification::checkpoint::converted::save_converted;
use modification::eval;
use modification::mod_config::RouterKind;
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
fn fresh_conversion_reproduces_the_original_perplexity_exactly() {
    let ckpt = common::smollm2();
    let trainer = Trainer::new(ckpt, ModConfig::default(), small_run(1)).unwrap();
    let ids = common::moby_reference_ids();
    let routed =
        eval::routed_rows_eval(trainer.model(), std::slice::from_ref(&ids), false).unwrap();
    let dense =
        eval::dense_rows_perplexity(&Llama::from_checkpoint(ckpt).unwrap(), &[ids]).unwrap();
    assert_eq!(routed.perplexity.nll, dense.nll);
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
    first.save_state(&dir).unwrap();
    drop(first); // "killed"
    let mut resumed = Trainer::new(ckpt, cfg, small_run(4)).unwrap();
    resumed.load_state(&dir).unwrap();
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
        mismatched.load_state(&dir),
        Err(Error::Config { .. })
    ));
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint() {
    let mut ckpt: Checkpoint = common::smollm2().clone();
    let dir = common::temp_dir("nan").join("state");
    let good = Trainer::new(&ckpt, ModConfig::default(), small_run(3)).unwrap();
    good.save_state(&dir).unwrap();
    let before = std::fs::read(dir.join("state.safetensors")).unwrap();
    // Poison one weight: the forward pass turns NaN.
    let name = "model.layers.2.mlp.down_proj.weight";
    let w = &ckpt.tensors[name];
    ckpt.tensors
        .insert(name.to_string(), (w * f64::NAN).unwrap());
    let mut bad = Trainer::new(&ckpt, ModConfig::default(), small_run(3)).unwrap();
    let err = bad.run(corpus(), Some(&dir), 1, |_| {}).unwrap_err();
    assert!(
        matches!(err, Error::NonFiniteLoss { step: 1, .. }),
        "{err:?}"
    );
    assert_eq!(
        std::fs::read(dir.join("state.safetensors")).unwrap(),
        before
    );
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
