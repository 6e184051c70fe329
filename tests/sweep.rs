//! The conversion report and the sweep on the real model and corpus (one or two steps,
//! short rows, inside the CI budget).

mod common;

use modification::conversion::{finish_conversion, original_perplexity, EvalOptions};
use modification::eval;
use modification::mixture_of_depths::RouterKind;
use modification::model::flops;
use modification::sweep::{self, SweepEvent, SweepSetting, CSV_COLUMNS};
use modification::train::{TrainConfig, Trainer};
use modification::{Error, Llama, ModConfig};
use std::collections::BTreeMap;

fn options() -> EvalOptions {
    EvalOptions {
        calibration_rows: 1,
        prefill_tokens: 48,
    }
}

fn small(mut s: SweepSetting) -> SweepSetting {
    s.train.batch_size = 2;
    s
}

fn threshold() -> RouterKind {
    RouterKind::ThresholdP {
        p: 0.5,
        per_layer: BTreeMap::new(),
    }
}

#[test]
fn a_conversion_that_trained_nothing_reports_the_original() {
    let (ckpt, corpus) = (common::smollm2(), common::small_corpus());
    let dense = Llama::from_checkpoint(ckpt).unwrap();
    let original = original_perplexity(&dense, corpus).unwrap();
    // Fresh gates are sigmoid(2) = 0.88 ≥ p = 0.5: every token passes every routed layer.
    let train = TrainConfig {
        steps: 1,
        batch_size: 2,
        ..TrainConfig::default()
    };
    let trainer = Trainer::new(ckpt, ModConfig::default(), train).unwrap();
    // The converted tensors are data, not part of the training graph: a model built from
    // them in memory runs the inference kernels, as one loaded from disk does.
    let tensors = trainer.converted_tensors().unwrap();
    assert_eq!(tensors.len(), 30, "15 routers, weight and bias each");
    assert!(tensors.values().all(|t| !t.track_op()));
    let r = finish_conversion(&trainer, corpus, &dense, &original, &options(), None, 0.0).unwrap();
    assert_eq!(r.sources.len(), 5);
    for (source, (name, s)) in corpus.sources.iter().zip(&r.sources) {
        assert_eq!(&source.name, name);
        let direct = eval::dense_rows_perplexity(&dense, &source.heldout).unwrap();
        assert_eq!(s.original, direct.perplexity, "{name}");
        // Up to float rounding: the converted model attends through the fused kernel, the
        // original through candle's composed ops.
        assert!((s.ratio - 1.0).abs() < 1e-5, "{name}: {}", s.ratio);
        assert_eq!((s.skip, s.kv), (0.0, 1.0), "{name}");
    }
    assert!((r.worst_perplexity_ratio - 1.0).abs() < 1e-5);
    assert_eq!(r.skip_fraction, 0.0);
    // Routers add their own FLOPs (2·d per token and routed layer) to the dense model's.
    assert!(r.compute_fraction > 1.0 && r.compute_fraction < 1.001);
    assert_eq!(
        r.kept_per_layer.keys().copied().collect::<Vec<_>>(),
        (1..30).step_by(2).collect::<Vec<_>>()
    );
    assert_eq!((r.steps, r.tokens_trained), (0, 0));
    assert_eq!(r.prefill.tokens, 48);
    assert!(r.calibration.is_none() && r.causal.is_empty());

    let mut missing = original.clone();
    missing.remove("zh");
    let err = finish_conversion(&trainer, corpus, &dense, &missing, &options(), None, 0.0);
    assert!(matches!(err, Err(Error::InvalidArgument(m)) if m.contains("zh")));
}

#[test]
fn top_k_at_the_matching_capacity_spends_the_target_compute() {
    let (ckpt, corpus) = (common::smollm2(), common::small_corpus());
    let mut setting =
        SweepSetting::default_recipe("top-k", RouterKind::TopK { capacity: 1.0 }, 0.9, 1);
    let capacity = sweep::matching_capacity(&ckpt.config, &setting.mod_config, 48, 0.9);
    assert!(capacity > 0.8 && capacity < 0.9, "{capacity}");
    setting.mod_config.router = RouterKind::TopK { capacity };
    let trainer = Trainer::new(ckpt, setting.mod_config, setting.train).unwrap();
    let measured = eval::routed_rows_eval(trainer.model(), &corpus.sources[1].heldout, false)
        .unwrap()
        .compute_fraction;
    // Top-k keeps ceil(C·48) tokens per row: up to one token per row and layer above the
    // capacity, which adds at most that token's share of the routed layers' FLOPs.
    let cfg = &ckpt.config;
    let t = 48;
    let layer = flops::layer_flops(cfg, t, t, t * (t + 1) / 2);
    let layers = cfg.num_hidden_layers as f64 * layer;
    let one_token = layers / (layers + flops::lm_head_flops(cfg, t)) / t as f64;
    assert_eq!(corpus.sources[1].heldout[0].len(), t);
    assert!(
        measured > 0.9 - 0.005 && measured < 0.9 + one_token + 0.005,
        "{measured} (capacity {capacity}, one token {one_token:.4})"
    );
}

#[test]
fn a_two_setting_sweep_writes_its_table_and_plot_and_resumes() {
    let (ckpt, corpus) = (common::smollm2(), common::small_corpus());
    let dir = common::temp_dir("sweep");
    let mut settings = vec![
        small(SweepSetting::paper_recipe(1)),
        small(SweepSetting {
            curve: Some("threshold-p".to_string()),
            ..SweepSetting::default_recipe("threshold-p@0.9", threshold(), 0.9, 1)
        }),
    ];
    let mut started = Vec::new();
    let rows = sweep::run_sweep(ckpt, corpus, &settings, &dir, &options(), |e| {
        if let SweepEvent::Started { setting, .. } = e {
            started.push(setting.name.clone());
        }
    })
    .unwrap();
    assert_eq!(started, ["paper-recipe", "threshold-p@0.9"]);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].report.tokens_trained, 2 * 48);
    assert!(
        (rows[1]
            .report
            .calibration
            .as_ref()
            .unwrap()
            .compute_fraction
            - 0.9)
            .abs()
            < 0.01
    );

    // The CSV: the columns, the original model's row from an independent evaluation, and
    // one row per setting with the report's values.
    let mut reader = csv::Reader::from_path(dir.join("sweep.csv")).unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let names = ["email", "moby", "pydoc", "sotu", "zh"];
    let mut expected: Vec<String> = CSV_COLUMNS.iter().map(|c| c.to_string()).collect();
    expected.extend(names.map(|n| format!("ppl_{n}")));
    expected.extend(names.map(|n| format!("ratio_{n}")));
    assert_eq!(header, expected);
    let records: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(records.len(), 3);
    let column = |rec: &csv::StringRecord, name: &str| -> String {
        rec[header.iter().position(|h| h == name).unwrap()].to_string()
    };
    let dense = Llama::from_checkpoint(ckpt).unwrap();
    for s in &corpus.sources {
        let direct = eval::dense_rows_perplexity(&dense, &s.heldout).unwrap();
        let ppl: f64 = column(&records[0], &format!("ppl_{}", s.name))
            .parse()
            .unwrap();
        assert!((ppl - direct.perplexity).abs() < 1e-4, "{}", s.name);
    }
    for (rec, row) in records[1..].iter().zip(&rows) {
        let r = &row.report;
        assert_eq!(column(rec, "setting"), row.setting.name);
        assert_eq!(
            column(rec, "compute_fraction"),
            format!("{:.4}", r.compute_fraction)
        );
        assert_eq!(
            column(rec, "worst_ratio"),
            format!("{:.4}", r.worst_perplexity_ratio)
        );
        assert_eq!(column(rec, "steps"), "1");
        for n in names {
            let ppl: f64 = column(rec, &format!("ppl_{n}")).parse().unwrap();
            let ratio: f64 = column(rec, &format!("ratio_{n}")).parse().unwrap();
            assert!((ppl / r.sources[n].original - ratio).abs() < 1e-3, "{n}");
        }
    }
    assert_eq!(column(&records[1], "kv_policy"), "Skip");
    assert_eq!(column(&records[2], "router"), "threshold-p");
    assert_eq!(column(&records[2], "target_compute"), "0.9");

    // The Markdown table: a header, a rule, the original and one line per setting.
    let md = std::fs::read_to_string(dir.join("sweep.md")).unwrap();
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines.len(), 5);
    assert!(lines[3].starts_with("| paper-recipe | threshold-p | odd, `Skip` |"));
    assert!(lines[4].starts_with("| threshold-p@0.9 |"));

    // The plot decodes to the stated size.
    let decoder = png::Decoder::new(std::fs::File::open(dir.join("sweep.png")).unwrap());
    let info = decoder.read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (960, 600));

    // Which settings a run resumes and which it trains.
    let run_logged = |settings: &[SweepSetting]| {
        let mut events = Vec::new();
        let rows = sweep::run_sweep(ckpt, corpus, settings, &dir, &options(), |e| match e {
            SweepEvent::Resumed(row) => events.push(format!("resumed {}", row.setting.name)),
            SweepEvent::Started { setting, .. } => events.push(format!("started {}", setting.name)),
            _ => {}
        })
        .unwrap();
        (rows, events)
    };

    // Run again: both settings are finished and none is trained again.
    let (again, events) = run_logged(&settings);
    assert_eq!(events, ["resumed paper-recipe", "resumed threshold-p@0.9"]);
    assert_eq!(again, rows);

    // A setting that changed under the same name runs again; the other is kept.
    settings[0].train.seed = 7;
    let (third, events) = run_logged(&settings);
    assert_eq!(events, ["started paper-recipe", "resumed threshold-p@0.9"]);
    assert_eq!(third[0].setting.train.seed, 7);
    assert_eq!(third[1], rows[1]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_sweep_refuses_bad_setting_lists_before_any_work() {
    let (ckpt, corpus) = (common::smollm2(), common::small_corpus());
    let dir = common::temp_dir("sweep-bad");
    let one = SweepSetting::paper_recipe(1);
    let mut renamed = one.clone();
    renamed.name = "../escape".to_string();
    for (settings, says) in [
        (vec![], "no settings"),
        (vec![one.clone(), one.clone()], "appears twice"),
        (vec![renamed], "not a plain file name"),
    ] {
        let err = sweep::run_sweep(ckpt, corpus, &settings, &dir, &options(), |_| {});
        assert!(
            matches!(&err, Err(Error::InvalidArgument(m)) if m.contains(says)),
            "{err:?}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing written"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_plot_refuses_a_size_too_small_to_draw() {
    let path = common::temp_dir("plot").join("tiny.png");
    let err = sweep::plot_sweep(&path, &[], (100, 100));
    assert!(matches!(err, Err(Error::InvalidArgument(m)) if m.contains("100×100")));
    assert!(!path.exists());
}
