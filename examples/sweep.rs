//! The trade-off of a conversion, swept: converts the model under each setting of a list
//! with one token budget and seed, evaluates every conversion on the same held-out rows and
//! writes `sweep.csv`, `sweep.md` and `sweep.png` (perplexity ratio against compute,
//! threshold-p and top-k as two curves) into `--out`.
//!
//! ```text
//! cargo run --release --example sweep -- [--model M] [--data DIR] [--out out/sweep] \
//!     [--steps 48] [--only NAME,NAME] [--list]
//! ```
//! The default list (`--list` prints it): threshold-p and top-k at compute targets 0.97,
//! 0.93 and 0.89, the paper's recipe, and the default recipe with KV `Skip`. Run again
//! after an interruption and it resumes at the next unfinished setting.

mod support;

use anyhow::{Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use modification::conversion::EvalOptions;
use modification::sweep::{self, SweepEvent, SweepFiles, SweepSetting};
use modification::train::memory;
use modification::Checkpoint;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Convert under a list of settings and plot perplexity against compute")]
struct Args {
    /// GGUF file, HF folder or hub id of the pretrained model.
    #[arg(long, default_value = "assets/model/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    /// Corpus root: every sub-folder of .txt files is one source of the mixture.
    #[arg(long, default_value = "assets/corpus")]
    data: PathBuf,
    /// Folder of the sweep's files (and of finished settings, for resuming).
    #[arg(long, default_value = "out/sweep")]
    out: PathBuf,
    /// Optimisation steps of every setting (48 × 4 × 256 tokens keeps the default list of
    /// eight under 90 minutes on 2 cores).
    #[arg(long, default_value_t = 48)]
    steps: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Seed of the data order, the same for every setting.
    #[arg(long, default_value_t = 2)]
    seed: u64,
    /// Run only these settings of the default list (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Print the settings and exit.
    #[arg(long)]
    list: bool,
    /// Calibration rows per source (from the training split).
    #[arg(long, default_value_t = 2)]
    calibration_rows: usize,
    /// Tokens of the prefill timing input.
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// Run even when the estimated peak memory exceeds the available memory.
    #[arg(long)]
    ignore_memory_estimate: bool,
    #[command(flatten)]
    run: support::DeviceArgs,
}

fn main() -> Result<()> {
    support::tune_malloc_for_tensors();
    support::init_logging();
    let args = Args::parse();
    let started = Instant::now();
    let (dtype, device) = (args.run.dtype()?, args.run.device()?);
    let config = Checkpoint::read_config(&args.model).context("reading the model's config")?;
    let settings = settings(&args, &config)?;
    if args.list {
        for s in &settings {
            println!("{}", s.name);
        }
        return Ok(());
    }
    if device.is_cpu() {
        plan_memory(&args, &config, dtype, &settings)?;
    }
    let ckpt = Checkpoint::load(&args.model, dtype, &device).context("loading the model")?;
    let corpus = support::load_corpus(&args.data, &ckpt, args.seq_len)?;
    let options = EvalOptions {
        calibration_rows: args.calibration_rows,
        prefill_tokens: args.prefill_tokens,
    };

    let mut bar: Option<ProgressBar> = None;
    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} {msg}")?;
    let rows = sweep::run_sweep(
        &ckpt,
        &corpus,
        &settings,
        &args.out,
        &options,
        |event| match event {
            SweepEvent::Original(ppl) => {
                let list: Vec<String> = ppl.iter().map(|(s, p)| format!("{s} {p:.2}")).collect();
                println!("original perplexity: {}", list.join(", "));
            }
            SweepEvent::Resumed(row) => println!("{}: finished earlier, kept", row.setting.name),
            SweepEvent::Started {
                index,
                total,
                setting,
            } => {
                println!("[{}/{total}] {}", index + 1, setting.name);
                let b = ProgressBar::new(setting.train.steps as u64);
                b.set_style(style.clone());
                bar = Some(b);
            }
            SweepEvent::Step(r) => {
                let line = format!(
                    "lm {:.3} kl {:.4} kept {:.3} compute {:.3} {:.0} tok/s",
                    r.lm_loss,
                    r.kl_loss,
                    r.mean_kept(),
                    r.compute_fraction,
                    r.tokens as f64 / r.seconds
                );
                if let Some(b) = &bar {
                    b.set_position(r.step as u64);
                    if b.is_hidden() && (r.step % 10 == 0 || r.step == 1) {
                        println!("  step {} {line}", r.step);
                    }
                    b.set_message(line);
                }
            }
            SweepEvent::Finished(row) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                let r = &row.report;
                println!(
                    "  compute {:.3}  KV {:.3}  worst ×{:.3}  mean ×{:.3}  prefill time {:.2}  ({:.0} s)",
                    r.compute_fraction,
                    r.kv_fraction,
                    r.worst_perplexity_ratio,
                    r.mean_perplexity_ratio,
                    r.prefill.time_ratio,
                    row.wall_seconds
                );
            }
        },
    )?;

    let files = SweepFiles {
        dir: args.out.clone(),
    };
    let original = rows.first().map(|r| {
        (r.report.sources.iter())
            .map(|(n, s)| (n.clone(), s.original))
            .collect()
    });
    println!(
        "\n{}",
        sweep::markdown_table(&original.unwrap_or_default(), &rows)
    );
    println!(
        "{} settings in {:.1} min; wrote {}, {} and {}",
        rows.len(),
        started.elapsed().as_secs_f64() / 60.0,
        files.csv().display(),
        files.markdown().display(),
        files.png().display()
    );
    Ok(())
}

/// The default list under this run's budget, narrowed by `--only`.
fn settings(args: &Args, config: &modification::LlamaConfig) -> Result<Vec<SweepSetting>> {
    let mut all = sweep::default_settings(config, args.seq_len, args.steps);
    for s in &mut all {
        s.train.batch_size = args.batch_size;
        s.train.seed = args.seed;
        s.train.matmul_precision = args.run.matmul.precision();
    }
    if args.only.is_empty() {
        return Ok(all);
    }
    let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    for name in &args.only {
        anyhow::ensure!(
            names.contains(&name.as_str()),
            "--only {name}: not a setting of the list ({})",
            names.join(", ")
        );
    }
    all.retain(|s| args.only.contains(&s.name));
    Ok(all)
}

/// Refuses a sweep whose largest setting cannot fit in memory (unless
/// `--ignore-memory-estimate`), before anything is loaded.
fn plan_memory(
    args: &Args,
    config: &modification::LlamaConfig,
    dtype: candle_core::DType,
    settings: &[SweepSetting],
) -> Result<()> {
    let largest = (settings.iter())
        .map(|s| memory::conversion_memory(config, dtype, &s.train, args.seq_len))
        .max_by(|a, b| a.total().total_cmp(&b.total()))
        .context("no settings")?;
    support::check_memory(&largest, args.ignore_memory_estimate)
}
