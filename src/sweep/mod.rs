//! The trade-off of a conversion, swept: a list of settings (threshold-p at several compute
//! targets, top-k at the same targets, the paper's recipe, KV `Skip` against `Keep`), each
//! converted under the same token budget and seed and evaluated on the same held-out rows,
//! written as `sweep.csv`, `sweep.md` and (with the `plot` feature) `sweep.png`.
//!
//! Every finished setting is kept in `settings/<name>.json` under the sweep's folder, so
//! that a sweep that is interrupted resumes at the next unfinished setting.

#[cfg(feature = "plot")]
mod plot;
mod table;

#[cfg(feature = "plot")]
pub use plot::plot_sweep;
pub use table::{markdown_table, write_csv, CSV_COLUMNS};

use crate::conversion::{finish_conversion, original_perplexity, ConversionReport, EvalOptions};
use crate::error::{Error, Result};
use crate::fsutil::write_files_atomically;
use crate::mixture_of_depths::{KvPolicy, LayerRule, ModConfig, RoutedLayers, RouterKind};
use crate::model::flops::layer_flops;
use crate::model::{Llama, LoraConfig};
use crate::train::{Corpus, Objective, StepReport, TrainConfig, Trainable, Trainer};
use crate::{Checkpoint, LlamaConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One conversion of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSetting {
    /// Unique name, also the file name of its result: ASCII letters, digits, `.`, `-`,
    /// `_` and `@`.
    pub name: String,
    /// Settings joined by one line in the plot share a curve name (`threshold-p`,
    /// `top-k`); `None` plots the setting as a single labelled point.
    pub curve: Option<String>,
    /// The conversion settings.
    pub mod_config: ModConfig,
    /// The training settings (steps, seed and batch are the sweep's budget).
    pub train: TrainConfig,
}

impl SweepSetting {
    /// The default recipe of `convert` (every layer routed, KV `Keep`, rank-16 skip
    /// adapters, routers plus rank-8 LoRA, KL to the original plus the compute-budget load
    /// term with α 0.1, thresholds or capacity calibrated to `target_compute`) with
    /// `router` as the selection operator.
    pub fn default_recipe(
        name: impl Into<String>,
        router: RouterKind,
        target_compute: f64,
        steps: usize,
    ) -> Self {
        let mod_config = ModConfig {
            routed_layers: RoutedLayers::Rule(LayerRule::All),
            router,
            kv_policy: KvPolicy::Keep,
            alpha: 0.1,
            skip_adapter_rank: crate::mixture_of_depths::skip_adapter::DEFAULT_RANK,
            ..ModConfig::default()
        };
        let train = TrainConfig {
            steps,
            trainable: Trainable::Lora,
            lora: LoraConfig::default(),
            objective: Objective::Kl,
            target_compute: Some(target_compute),
            ..TrainConfig::default()
        };
        Self {
            name: name.into(),
            curve: None,
            mod_config,
            train,
        }
    }

    /// The MoDification paper's recipe: odd layers routed by threshold-p (p 0.5), KV
    /// `Skip`, routers only, LM loss plus α·Σ F_j·G_j with α 0.01, no compute target: the
    /// MoDification paper's starting values ([`ModConfig::default`]).
    pub fn paper_recipe(steps: usize) -> Self {
        Self {
            name: "paper-recipe".to_string(),
            curve: None,
            mod_config: ModConfig::default(),
            train: TrainConfig {
                steps,
                ..TrainConfig::default()
            },
        }
    }
}

/// The default list: threshold-p and top-k (capacity trained at the value that matches the
/// target on rows of `seq_len` tokens, then calibrated) at compute targets 0.97, 0.93 and
/// 0.89 of the dense model; the paper's recipe; the default recipe at 0.93 with KV `Skip`.
/// Eight conversions of `steps` steps each.
pub fn default_settings(model: &LlamaConfig, seq_len: usize, steps: usize) -> Vec<SweepSetting> {
    let mut settings = Vec::new();
    for target in [0.97, 0.93, 0.89] {
        let router = RouterKind::ThresholdP {
            p: 0.5,
            per_layer: BTreeMap::new(),
        };
        settings.push(SweepSetting {
            curve: Some("threshold-p".to_string()),
            ..SweepSetting::default_recipe(format!("threshold-p@{target}"), router, target, steps)
        });
    }
    for target in [0.97, 0.93, 0.89] {
        let name = format!("top-k@{target}");
        let mut setting =
            SweepSetting::default_recipe(name, RouterKind::TopK { capacity: 1.0 }, target, steps);
        let capacity = matching_capacity(model, &setting.mod_config, seq_len, target);
        setting.mod_config.router = RouterKind::TopK { capacity };
        settings.push(SweepSetting {
            curve: Some("top-k".to_string()),
            ..setting
        });
    }
    settings.push(SweepSetting::paper_recipe(steps));
    let router = RouterKind::ThresholdP {
        p: 0.5,
        per_layer: BTreeMap::new(),
    };
    let mut kv_skip = SweepSetting::default_recipe("threshold-p@0.93-kv-skip", router, 0.93, steps);
    kv_skip.mod_config.kv_policy = KvPolicy::Skip;
    settings.push(kv_skip);
    settings
}

/// The top-k capacity C whose compute, with every layer routed by `mod_config` on rows of
/// `seq_len` tokens, is `target` of the dense model's. Per routed layer and row, the
/// router and (under `Keep`) every token's K/V projections cost `F` whatever C is; the rest
/// of the layer costs `C·V` on the kept tokens, and the skip adapter `(1 − C)·A` on the
/// skipped ones, so C = (target·dense − lm_head − L·(F + A)) / (L·(V − A)), within
/// [0.05, 1]. Calibration refines it on measured compute.
pub fn matching_capacity(
    model: &LlamaConfig,
    mod_config: &ModConfig,
    seq_len: usize,
    target: f64,
) -> f64 {
    use crate::model::flops::{lm_head_flops, router_flops};
    let t = seq_len.max(1);
    let n = model.num_hidden_layers as f64;
    let dense_layer = layer_flops(model, t, t, t * (t + 1) / 2);
    let lm_head = lm_head_flops(model, t);
    let d = model.hidden_size as f64;
    let key_values = match mod_config.kv_policy {
        KvPolicy::Keep => 4.0 * d * (model.num_kv_heads() * model.head_dim()) as f64 * t as f64,
        KvPolicy::Skip => 0.0,
    };
    let adapter = 4.0 * d * mod_config.skip_adapter_rank as f64 * t as f64;
    let fixed = router_flops(model, t) + adapter + key_values;
    let variable = dense_layer - key_values - adapter;
    let budget = target * (n * dense_layer + lm_head) - lm_head - n * fixed;
    (budget / (n * variable)).clamp(0.05, 1.0)
}

/// One finished setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    /// What was run.
    pub setting: SweepSetting,
    /// What it measured.
    pub report: ConversionReport,
    /// Wall time of the setting (training, calibration, evaluation), seconds.
    pub wall_seconds: f64,
}

/// Progress of [`run_sweep`], for a progress bar or a log.
#[derive(Debug)]
pub enum SweepEvent<'a> {
    /// The original model was evaluated: perplexity by source.
    Original(&'a BTreeMap<String, f64>),
    /// A setting finished by an earlier run was found and is not run again.
    Resumed(&'a SweepRow),
    /// Setting `index` (0-based) of `total` starts.
    Started {
        /// Its place in the list.
        index: usize,
        /// Settings in the list.
        total: usize,
        /// The setting.
        setting: &'a SweepSetting,
    },
    /// One optimisation step of the running setting.
    Step(&'a StepReport),
    /// A setting finished; its row and the tables are written.
    Finished(&'a SweepRow),
}

/// The files a sweep writes under its folder.
#[derive(Debug, Clone)]
pub struct SweepFiles {
    /// The folder.
    pub dir: PathBuf,
}

impl SweepFiles {
    /// `sweep.csv`.
    pub fn csv(&self) -> PathBuf {
        self.dir.join("sweep.csv")
    }
    /// `sweep.md`.
    pub fn markdown(&self) -> PathBuf {
        self.dir.join("sweep.md")
    }
    /// `sweep.png`.
    pub fn png(&self) -> PathBuf {
        self.dir.join("sweep.png")
    }
    /// `settings/<name>.json`: one finished setting.
    pub fn row(&self, name: &str) -> PathBuf {
        self.dir.join("settings").join(format!("{name}.json"))
    }
}

/// Runs `settings` on `ckpt` and `corpus`, in order, writing under `dir` (see
/// [`SweepFiles`]). A setting whose `settings/<name>.json` holds a finished row for the same
/// setting is not run again (resume); one whose file holds another setting is run and the
/// file replaced. After every setting it trains, the row and the tables (CSV, Markdown,
/// and the PNG plot with the `plot` feature, 960 × 600 pixels) are written atomically;
/// a run that trains nothing rewrites the tables once. Returns the rows in the order of
/// `settings`.
///
/// Errors: [`Error::InvalidArgument`] for no settings, a repeated name or a name that is not
/// a plain file name; those of [`Trainer::new`] (invalid settings), training,
/// [`finish_conversion`] and writing.
pub fn run_sweep(
    ckpt: &Checkpoint,
    corpus: &Corpus,
    settings: &[SweepSetting],
    dir: &Path,
    options: &EvalOptions,
    mut on_event: impl FnMut(SweepEvent),
) -> Result<Vec<SweepRow>> {
    check_names(settings)?;
    let files = SweepFiles {
        dir: dir.to_path_buf(),
    };
    let dense = Llama::from_checkpoint(ckpt)?;
    let original = original_perplexity(&dense, corpus)?;
    on_event(SweepEvent::Original(&original));
    let mut rows: Vec<SweepRow> = Vec::new();
    let mut trained_any = false;
    for (index, setting) in settings.iter().enumerate() {
        if let Some(row) = finished_row(&files, setting) {
            on_event(SweepEvent::Resumed(&row));
            rows.push(row);
            continue;
        }
        on_event(SweepEvent::Started {
            index,
            total: settings.len(),
            setting,
        });
        let started = Instant::now();
        let mut trainer = Trainer::new(ckpt, setting.mod_config.clone(), setting.train.clone())?;
        trainer.run(corpus, None, 0, |r| on_event(SweepEvent::Step(r)))?;
        let train_seconds = started.elapsed().as_secs_f64();
        let report = finish_conversion(
            &trainer,
            corpus,
            &dense,
            &original,
            options,
            None,
            train_seconds,
        )?;
        let row = SweepRow {
            setting: setting.clone(),
            report,
            wall_seconds: started.elapsed().as_secs_f64(),
        };
        write_row(&files, &row)?;
        rows.push(row);
        write_tables(&files, &original, &rows)?;
        if let Some(row) = rows.last() {
            on_event(SweepEvent::Finished(row));
        }
        trained_any = true;
    }
    if !trained_any {
        // Every setting was finished earlier: the tables may predate this build's format.
        write_tables(&files, &original, &rows)?;
    }
    Ok(rows)
}

fn check_names(settings: &[SweepSetting]) -> Result<()> {
    if settings.is_empty() {
        return Err(Error::InvalidArgument(
            "the sweep has no settings".to_string(),
        ));
    }
    let mut seen = HashSet::new();
    for s in settings {
        let plain = (s.name.chars()).all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c));
        if s.name.is_empty() || s.name.starts_with('.') || !plain {
            return Err(Error::InvalidArgument(format!(
                "sweep setting name {:?} is not a plain file name (letters, digits, . - _ @)",
                s.name
            )));
        }
        if !seen.insert(&s.name) {
            return Err(Error::InvalidArgument(format!(
                "sweep setting name {:?} appears twice",
                s.name
            )));
        }
    }
    Ok(())
}

/// The row an earlier run finished for `setting`, if its file exists, parses and holds
/// the same setting.
fn finished_row(files: &SweepFiles, setting: &SweepSetting) -> Option<SweepRow> {
    let text = std::fs::read_to_string(files.row(&setting.name)).ok()?;
    let row: SweepRow = serde_json::from_str(&text).ok()?;
    (row.setting == *setting).then_some(row)
}

fn write_row(files: &SweepFiles, row: &SweepRow) -> Result<()> {
    let text = serde_json::to_string_pretty(row)?;
    let name = format!("{}.json", row.setting.name);
    write_files_atomically(&files.dir.join("settings"), |staging| {
        let path = staging.join(&name);
        std::fs::write(&path, &text).map_err(|source| Error::Io { path, source })
    })
}

fn write_tables(
    files: &SweepFiles,
    original: &BTreeMap<String, f64>,
    rows: &[SweepRow],
) -> Result<()> {
    let markdown = markdown_table(original, rows);
    write_files_atomically(&files.dir, |staging| {
        write_csv(&staging.join("sweep.csv"), original, rows)?;
        let path = staging.join("sweep.md");
        std::fs::write(&path, &markdown).map_err(|source| Error::Io { path, source })?;
        #[cfg(feature = "plot")]
        plot_sweep(&staging.join("sweep.png"), rows, (960, 600))?;
        Ok(())
    })
}
