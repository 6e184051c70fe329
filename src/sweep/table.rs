//! A sweep's rows as a CSV file and a Markdown table: the original model first, then one row
//! per setting.

use super::SweepRow;
use crate::error::{Error, Result};
use crate::mixture_of_depths::{KvPolicy, LayerRule, RoutedLayers, RouterKind};
use crate::train::{Objective, Trainable};
use std::collections::BTreeMap;
use std::path::Path;

/// The CSV's columns before the per-source ones (`ppl_<source>`, then `ratio_<source>`, in
/// the sources' order). Fractions are of the dense model's; ratios are converted /
/// original; `prefill_time_ratio` is a wall-time ratio on one long input, whose compute
/// fraction (the pass decides causally, as generation does) is `prefill_compute_fraction`.
pub const CSV_COLUMNS: [&str; 18] = [
    "setting",
    "curve",
    "router",
    "routed_layers",
    "kv_policy",
    "trained",
    "objective",
    "target_compute",
    "steps",
    "tokens_trained",
    "compute_fraction",
    "kv_fraction",
    "skip_fraction",
    "prefill_time_ratio",
    "prefill_compute_fraction",
    "worst_ratio",
    "mean_ratio",
    "wall_seconds",
];

/// Writes `rows` as CSV to `path` (not atomically: the sweep writes into a staging folder),
/// headed by [`CSV_COLUMNS`] and the per-source columns of `original` (perplexity of the
/// original model by source), whose own row comes first with the setting name `original`.
///
/// Errors: [`Error::Io`] when the file cannot be written.
pub fn write_csv(path: &Path, original: &BTreeMap<String, f64>, rows: &[SweepRow]) -> Result<()> {
    let io = |e: csv::Error| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = CSV_COLUMNS.iter().map(|c| c.to_string()).collect();
    header.extend(original.keys().map(|s| format!("ppl_{s}")));
    header.extend(original.keys().map(|s| format!("ratio_{s}")));
    w.write_record(&header).map_err(io)?;

    // The dense model: nothing routed, trained or skipped; every ratio 1.
    let dense: [&str; 18] = [
        "original", "", "dense", "none", "", "", "", "", "0", "0", "1", "1", "0", "1", "1", "1",
        "1", "0",
    ];
    let mut first: Vec<String> = dense.map(String::from).to_vec();
    first.extend(original.values().map(|p| format!("{p:.4}")));
    first.extend(original.values().map(|_| "1".to_string()));
    w.write_record(&first).map_err(io)?;

    for row in rows {
        let (s, r) = (&row.setting, &row.report);
        let mut record = vec![
            s.name.clone(),
            s.curve.clone().unwrap_or_default(),
            router_name(&s.mod_config.router).to_string(),
            layers_name(&s.mod_config.routed_layers),
            kv_name(s.mod_config.kv_policy).to_string(),
            trained_name(s.train.trainable).to_string(),
            objective_name(s.train.objective).to_string(),
            s.train
                .target_compute
                .map(|t| t.to_string())
                .unwrap_or_default(),
            r.steps.to_string(),
            r.tokens_trained.to_string(),
            format!("{:.4}", r.compute_fraction),
            format!("{:.4}", r.kv_fraction),
            format!("{:.4}", r.skip_fraction),
            format!("{:.4}", r.prefill.time_ratio),
            format!("{:.4}", r.prefill.compute_fraction),
            format!("{:.4}", r.worst_perplexity_ratio),
            format!("{:.4}", r.mean_perplexity_ratio),
            format!("{:.1}", row.wall_seconds),
        ];
        let source = |name: &String| r.sources.get(name);
        record.extend(
            original
                .keys()
                .map(|n| source(n).map_or(String::new(), |s| format!("{:.4}", s.converted))),
        );
        record.extend(
            (original.keys())
                .map(|n| source(n).map_or(String::new(), |s| format!("{:.4}", s.ratio))),
        );
        w.write_record(&record).map_err(io)?;
    }
    let bytes = w.into_inner().map_err(|e| io(e.into_error().into()))?;
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `rows` as a Markdown table: one line per setting (the original model first) with the
/// held-out compute fraction, KV-cache ratio, skipped fraction, prefill time ratio (and
/// the prefill's own compute fraction), worst and mean perplexity ratio, perplexity per
/// source (sources of `original`), tokens trained and wall time.
pub fn markdown_table(original: &BTreeMap<String, f64>, rows: &[SweepRow]) -> String {
    let sources: Vec<&String> = original.keys().collect();
    let mut out = String::from(
        "| setting | router | routed, KV | trained, objective | compute | KV cache | skip | prefill time (compute) | worst | mean |",
    );
    for s in &sources {
        out += &format!(" {s} |");
    }
    out += " tokens | wall |\n|---|---|---|---|---|---|---|---|---|---|";
    out += &"---|".repeat(sources.len() + 2);
    out += "\n| original | dense | – | – | 1 | 1 | 0 | 1 (1) | 1 | 1 |";
    for s in &sources {
        out += &format!(" {:.2} |", original[*s]);
    }
    out += " – | – |\n";
    for row in rows {
        let (s, r) = (&row.setting, &row.report);
        out += &format!(
            "| {} | {} | {}, `{}` | {}, {} | {:.3} | {:.3} | {:.3} | {:.2} ({:.3}) | {:.2} | {:.2} |",
            s.name,
            router_name(&s.mod_config.router),
            layers_name(&s.mod_config.routed_layers),
            kv_name(s.mod_config.kv_policy),
            trained_name(s.train.trainable),
            objective_name(s.train.objective),
            r.compute_fraction,
            r.kv_fraction,
            r.skip_fraction,
            r.prefill.time_ratio,
            r.prefill.compute_fraction,
            r.worst_perplexity_ratio,
            r.mean_perplexity_ratio,
        );
        for name in &sources {
            match r.sources.get(*name) {
                Some(x) => out += &format!(" {:.2} |", x.converted),
                None => out += " – |",
            }
        }
        out += &format!(
            " {}k | {:.0} s |\n",
            r.tokens_trained / 1000,
            row.wall_seconds
        );
    }
    out
}

fn router_name(router: &RouterKind) -> &'static str {
    match router {
        RouterKind::ThresholdP { .. } => "threshold-p",
        RouterKind::TopK { .. } => "top-k",
    }
}

fn layers_name(layers: &RoutedLayers) -> String {
    match layers {
        RoutedLayers::Rule(LayerRule::All) => "all".to_string(),
        RoutedLayers::Rule(LayerRule::Odd) => "odd".to_string(),
        RoutedLayers::Rule(LayerRule::None) => "none".to_string(),
        RoutedLayers::List(v) => (v.iter().map(|j| j.to_string()))
            .collect::<Vec<_>>()
            .join(";"),
    }
}

fn kv_name(kv: KvPolicy) -> &'static str {
    match kv {
        KvPolicy::Keep => "Keep",
        KvPolicy::Skip => "Skip",
    }
}

fn trained_name(t: Trainable) -> &'static str {
    match t {
        Trainable::Routers => "routers",
        Trainable::Lora => "routers + LoRA",
        Trainable::All => "all weights",
    }
}

fn objective_name(o: Objective) -> &'static str {
    match o {
        Objective::Lm => "LM",
        Objective::Kl => "KL",
        Objective::KlLm => "KL + LM",
    }
}
