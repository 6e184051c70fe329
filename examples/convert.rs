//! Convert a pretrained LLaMA-family model into a Mixture-of-Depths model (MoDification).
//!
//! ```text
//! cargo run --release --example convert -- [--model M] [--data DIR] [--out DIR] \
//!     [--router threshold --p 0.5 | --router topk --capacity 0.5] [--layers odd|all] \
//!     [--kv skip|keep] [--train routers|lora|all] [--objective lm|kl|kl-lm] \
//!     [--target-compute F | --target-kept F | --alpha A] [--paper-recipe] \
//!     [--skip-adapter R] [--dense-baseline] \
//!     [--steps N] [--seq-len T] [--json]
//! ```
//! Evaluates the original model on each source's held-out rows, trains the routers (and
//! LoRA adapters, or the whole model) with the chosen objective plus the load-reducing
//! term, calibrates the thresholds to `--target-compute` on training rows, evaluates the
//! converted model, saves it to `--out` and prints what it saves and costs.

mod support;

use support::{ObjectiveArg, TrainArg};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use modification::conversion::{self, ConversionReport, EvalOptions};
use modification::mixture_of_depths::{GateInput, KvPolicy, LayerRule, RoutedLayers, RouterKind};
use modification::model::LoraConfig;
use modification::train::{memory, Corpus, Objective, TrainConfig, Trainable, Trainer};
use modification::{Checkpoint, Llama, ModConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RouterArg {
    Threshold,
    Topk,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LayersArg {
    Odd,
    All,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum KvArg {
    Skip,
    Keep,
}

#[derive(Parser, Debug)]
#[command(about = "Convert a pretrained LLaMA-family model into a Mixture-of-Depths model")]
struct Args {
    /// GGUF file, HF folder or hub id of the pretrained model.
    #[arg(long, default_value = "assets/model/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    /// Corpus root: every sub-folder of .txt files is one source of the mixture.
    #[arg(long, default_value = "assets/corpus")]
    data: PathBuf,
    /// Output folder of the converted model (HF layout + report.json with --json).
    #[arg(long, default_value = "out/smollm2-mod")]
    out: PathBuf,
    /// Routed layers: every other layer starting at 1, or every layer.
    #[arg(long, value_enum, default_value = "all")]
    layers: LayersArg,
    /// Selection operator: threshold-p (MoDification) or top-k (MoD baseline).
    #[arg(long, value_enum, default_value = "threshold")]
    router: RouterArg,
    /// Threshold p of threshold-p routers.
    #[arg(long, default_value_t = 0.5)]
    p: f64,
    /// Capacity C of top-k routers.
    #[arg(long, default_value_t = 0.5)]
    capacity: f64,
    /// Load-reducing coefficient α (0.1 with a compute or kept-fraction target, whose
    /// indicator decides when it pushes; 0.01, the paper's, without one).
    #[arg(long)]
    alpha: Option<f64>,
    /// Target kept fraction (mean over routed layers): the load term pushes only above it.
    #[arg(long)]
    target_kept: Option<f64>,
    /// Apply --target-kept to every layer separately (forces equal skipping, like top-k).
    #[arg(long)]
    target_per_layer: bool,
    /// Skipped-token KV policy.
    #[arg(long, value_enum, default_value = "keep")]
    kv: KvArg,
    /// What trains besides the routers: nothing, LoRA adapters (merged when saving), or
    /// every base weight.
    #[arg(long, value_enum, default_value = "lora")]
    train: TrainArg,
    /// Training objective: LM loss (the paper), KL to the original model
    /// (self-distillation), or both.
    #[arg(long, value_enum, default_value = "kl")]
    objective: ObjectiveArg,
    /// Target compute as a fraction of the dense model's FLOPs (whole model): one budget
    /// for all routed layers during training, then thresholds calibrated on training rows.
    /// Ignored with --target-kept (a kept-fraction target instead).
    #[arg(long, default_value_t = 0.93)]
    target_compute: f64,
    /// The MoDification paper's recipe instead of the default: odd layers, `Skip`, routers
    /// only, LM loss plus α·Σ F_j·G_j (α = 0.01), no compute target, no skip adapter.
    #[arg(long, conflicts_with_all = ["layers", "kv", "train", "objective", "target_compute", "target_kept", "skip_adapter"])]
    paper_recipe: bool,
    /// Fraction of the steps over which the compute budget falls from 1 to --target-compute.
    #[arg(long, default_value_t = 0.5)]
    budget_ramp: f64,
    /// Calibration rows per source (from the training split) for --target-compute.
    #[arg(long, default_value_t = 2)]
    calibration_rows: usize,
    /// LoRA rank (with --train lora).
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// LoRA scale numerator α (the adapter output is scaled by α / rank).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// LoRA learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lora_lr: f64,
    /// Also fine-tune the dense model with the same budget and report it.
    #[arg(long)]
    dense_baseline: bool,
    /// Run even when the estimated peak memory exceeds the available memory.
    #[arg(long)]
    ignore_memory_estimate: bool,
    /// Optimisation steps (80 × 4 × 256 tokens fit the 15-minute budget on 2 cores with a
    /// margin; 96 took 13.8 and 15.3 minutes in two runs).
    #[arg(long, default_value_t = 80)]
    steps: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Router learning rate.
    #[arg(long, default_value_t = 1e-3)]
    router_lr: f64,
    /// Base-model learning rate (with --train all).
    #[arg(long, default_value_t = 3e-5)]
    base_lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Final learning rate as a fraction of the peak (cosine decay; 1 = constant).
    #[arg(long, default_value_t = 1.0)]
    min_lr_ratio: f64,
    /// Micro-batches accumulated per step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[command(flatten)]
    run: support::DeviceArgs,
    /// Initial gate bias (gate weights start at zero).
    #[arg(long, default_value_t = 2.0)]
    gate_bias: f64,
    /// Gate on the layer's normalised input instead of the raw residual stream.
    #[arg(long)]
    gate_normalized: bool,
    /// Leading tokens always kept (attention sinks).
    #[arg(long, default_value_t = 1)]
    sinks: usize,
    /// Rank of each routed layer's skip adapter (a skipped token gets
    /// `x + U·silu(D·RMSNorm(x))` instead of `x`); 0 passes it through unchanged, as the
    /// paper does (and as --paper-recipe does).
    #[arg(long, default_value_t = modification::mixture_of_depths::skip_adapter::DEFAULT_RANK)]
    skip_adapter: usize,
    /// Seed of the data order.
    #[arg(long, default_value_t = 2)]
    seed: u64,
    /// Continue from the training state in --out if there is one.
    #[arg(long)]
    resume: bool,
    /// Checkpoint the training state every N steps.
    #[arg(long, default_value_t = 20)]
    checkpoint_every: usize,
    /// Tokens of the prefill timing input.
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// Also write report.json into --out.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    support::tune_malloc_for_tensors();
    support::init_logging();
    let args = Args::parse();
    let started = Instant::now();
    let (dtype, mod_config, train_config) = check_args(&args)?;
    let device = args.run.device()?;
    plan_memory(&args, dtype, &train_config, &device)?;
    let ckpt = Checkpoint::load(&args.model, dtype, &device).context("loading the model")?;
    anyhow::ensure!(
        args.prefill_tokens <= ckpt.config.max_position_embeddings,
        "--prefill-tokens {} exceeds the model's context of {}",
        args.prefill_tokens,
        ckpt.config.max_position_embeddings
    );
    // The settings are checked against the model before the corpus is read.
    let mut trainer = Trainer::new(&ckpt, mod_config.clone(), train_config.clone())?;
    let corpus = load_corpus(&args, &ckpt)?;
    let state_dir = Trainer::state_dir(&args.out);
    if args.resume {
        trainer.load_state(&state_dir, &corpus).with_context(|| {
            format!(
                "--resume: the training state in {} does not fit",
                state_dir.display()
            )
        })?;
        println!(
            "resumed from {} at step {}",
            state_dir.display(),
            trainer.step()
        );
    }

    // 1. The original model on every source's held-out rows.
    let dense = Llama::from_checkpoint(&ckpt)?;
    let original = conversion::original_perplexity(&dense, &corpus)?;

    // 2. Convert.
    let train_start = Instant::now();
    train(&args, &mut trainer, &corpus, &state_dir)?;
    let train_seconds = train_start.elapsed().as_secs_f64();

    // 3. Calibrate the operating point on training rows, save, evaluate the saved model as
    //    a user loads it, time its prefill.
    let options = EvalOptions {
        calibration_rows: args.calibration_rows,
        prefill_tokens: args.prefill_tokens,
    };
    let report = conversion::finish_conversion(
        &trainer,
        &corpus,
        &dense,
        &original,
        &options,
        Some(&args.out),
        train_seconds,
    )?;

    // 4. Optional dense baseline with the same budget.
    let dense_baseline = match args.dense_baseline {
        true => Some(dense_baseline(&ckpt, &corpus, &mod_config, &train_config)?),
        false => None,
    };
    print_report(
        &args,
        &train_config,
        &report,
        dense_baseline.as_ref(),
        started,
    );
    if args.json {
        write_json(
            &args,
            &mod_config,
            &train_config,
            &report,
            dense_baseline.as_ref(),
        )?;
    }
    Ok(())
}

/// The dtype and the settings, checked before minutes of loading and evaluation.
fn check_args(args: &Args) -> Result<(DType, ModConfig, TrainConfig)> {
    let dtype = args.run.dtype()?;
    let (mod_config, train_config) = settings(args);
    mod_config.check_fresh_values()?;
    train_config.validate()?;
    anyhow::ensure!(
        args.sinks < args.seq_len,
        "--sinks {} must be below --seq-len {}",
        args.sinks,
        args.seq_len
    );
    anyhow::ensure!(
        args.prefill_tokens >= 1,
        "--prefill-tokens must be at least 1"
    );
    let state_dir = Trainer::state_dir(&args.out);
    anyhow::ensure!(
        !args.resume || state_dir.is_dir(),
        "--resume: there is no training state in {} (run without --resume to start)",
        state_dir.display()
    );
    Ok((dtype, mod_config, train_config))
}

/// Prints the estimated peak memory from the model's config alone and refuses a run that
/// cannot fit (unless `--ignore-memory-estimate`), before anything is loaded.
fn plan_memory(
    args: &Args,
    dtype: DType,
    train_config: &TrainConfig,
    device: &Device,
) -> Result<()> {
    if !device.is_cpu() {
        // The estimate is of host memory; a GPU run's weights and activations live on the
        // device, which candle's allocator reports on its own.
        return Ok(());
    }
    let config = Checkpoint::read_config(&args.model).context("reading the model's config")?;
    let estimate = memory::conversion_memory(&config, dtype, train_config, args.seq_len);
    support::check_memory(&estimate, args.ignore_memory_estimate)
}

/// The corpus under `--data`, tokenized by the model's tokenizer.
fn load_corpus(args: &Args, ckpt: &Checkpoint) -> Result<Corpus> {
    let corpus = support::load_corpus(&args.data, ckpt, args.seq_len)?;
    println!(
        "model {} ({} layers); corpus {}: {}",
        args.model,
        ckpt.config.num_hidden_layers,
        args.data.display(),
        corpus
            .sources
            .iter()
            .map(|s| format!("{} {}k tokens", s.name, s.train.len() / 1000))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(corpus)
}

/// A layer that keeps nothing but its forced sinks has collapsed.
fn collapse_floor(args: &Args) -> f64 {
    args.sinks as f64 / args.seq_len as f64 + 1e-9
}

/// Trains to `--steps`, checkpointing into `state_dir`; a progress bar on a terminal, one
/// plain line every 10 steps otherwise.
fn train(args: &Args, trainer: &mut Trainer, corpus: &Corpus, state_dir: &Path) -> Result<()> {
    let layers = trainer
        .model()
        .routers()
        .keys()
        .copied()
        .collect::<Vec<_>>();
    let floor = collapse_floor(args);
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} {elapsed_precise} {msg}",
    )?);
    bar.set_position(trainer.step() as u64);
    trainer.run(corpus, Some(state_dir), args.checkpoint_every, |r| {
        let collapsed: Vec<String> = (r.kept_fraction.iter().zip(&layers))
            .filter(|(f, _)| **f <= floor)
            .map(|(_, j)| j.to_string())
            .collect();
        let warn = if collapsed.is_empty() {
            String::new()
        } else {
            format!(" WARNING layers {} keep nothing", collapsed.join(","))
        };
        let line = format!(
            "lm {:.3} kl {:.4} load {:.4} kept {:.3} compute {:.3} {:.0} tok/s{warn}",
            r.lm_loss,
            r.kl_loss,
            r.load_loss,
            r.mean_kept(),
            r.compute_fraction,
            r.tokens as f64 / r.seconds
        );
        bar.set_position(r.step as u64);
        if bar.is_hidden() && (r.step % 10 == 0 || r.step == 1) {
            println!("step {} {line}", r.step);
        }
        bar.set_message(line);
        tracing::debug!(?r, "step");
    })?;
    bar.finish();
    Ok(())
}

/// The dense model fine-tuned on the same tokens (every parameter, no router): what
/// `--train all` must be compared with, since it also adapts the model to the corpus.
fn dense_baseline(
    ckpt: &Checkpoint,
    corpus: &Corpus,
    mod_config: &ModConfig,
    train_config: &TrainConfig,
) -> Result<BTreeMap<String, f64>> {
    let cfg = ModConfig {
        routed_layers: RoutedLayers::Rule(LayerRule::None),
        ..mod_config.clone()
    };
    let tcfg = TrainConfig {
        trainable: Trainable::All,
        ..train_config.clone()
    };
    let mut t = Trainer::new(ckpt, cfg, tcfg)?;
    t.run(corpus, None, 0, |_| {})?;
    Ok(conversion::evaluate_sources(t.model(), corpus, false)?
        .into_iter()
        .map(|(name, e)| (name, e.perplexity.perplexity))
        .collect())
}

/// Prints the per-source table and the summary.
fn print_report(
    args: &Args,
    train_config: &TrainConfig,
    r: &ConversionReport,
    dense_baseline: Option<&BTreeMap<String, f64>>,
    started: Instant,
) {
    if let Some(c) = &r.calibration {
        println!(
            "calibrated on training rows: compute {:.3} (target {}, reachable {:.3}..{:.3}, setting {:+.3})",
            c.compute_fraction, c.target, c.reachable.0, c.reachable.1, c.setting
        );
    }
    let baseline_header = if dense_baseline.is_some() {
        "  dense-ft"
    } else {
        ""
    };
    println!(
        "\n{:<8} {:>10} {:>10} {:>7} {:>6} {:>9}{baseline_header}",
        "source", "original", "converted", "ratio", "skip", "compute"
    );
    for (name, s) in &r.sources {
        let base = dense_baseline
            .map(|b| format!("  {:>8.3}", b[name]))
            .unwrap_or_default();
        println!(
            "{name:<8} {:>10.3} {:>10.3} {:>7.3} {:>6.3} {:>9.3}{base}",
            s.original, s.converted, s.ratio, s.skip, s.compute
        );
    }
    println!("\nkept fraction per routed layer (held-out mean):");
    let kept: Vec<String> = (r.kept_per_layer.iter())
        .map(|(j, f)| format!("L{j} {f:.2}"))
        .collect();
    println!("{}", kept.join("  "));
    for j in r.collapsed_layers(collapse_floor(args)) {
        println!(
            "WARNING: routed layer {j} keeps no token but the sinks on held-out text (collapsed)"
        );
    }
    if !r.causal.is_empty() {
        println!("\ntop-k decoding with its auxiliary predictor (causal, as generation runs):");
        for (name, c) in &r.causal {
            println!(
                "{name:<8} {:>10.3} ratio {:>6.3} skip {:>6.3}",
                c.converted, c.ratio, c.skip
            );
        }
    }
    // Under the LM loss, training the base also fits it to the corpus; under the KL alone
    // the target stays the original's own distribution.
    let fits_corpus = !matches!(train_config.objective, Objective::Kl);
    if matches!(train_config.trainable, Trainable::All) && fits_corpus {
        println!(
            "NOTE: --train all with an LM loss also adapts the model to the corpus; compare \
             with --dense-baseline"
        );
    }
    println!(
        "\nheld-out: skip {:.3}  worst perplexity ratio {:.3}  mean {:.3}  compute {:.3} of dense  KV cache {:.3}",
        r.skip_fraction, r.worst_perplexity_ratio, r.mean_perplexity_ratio, r.compute_fraction, r.kv_fraction
    );
    println!(
        "prefill input ({} tokens): compute {:.3}  prefill time ratio {:.3}  KV cache ratio {:.3}",
        r.prefill.tokens, r.prefill.compute_fraction, r.prefill.time_ratio, r.prefill.kv_fraction
    );
    println!(
        "trained {} steps in {:.0}s; total {:.0}s; saved to {}",
        r.steps,
        r.train_seconds,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
}

/// Writes `report.json` into `--out`: the settings and the report.
fn write_json(
    args: &Args,
    mod_config: &ModConfig,
    train_config: &TrainConfig,
    report: &ConversionReport,
    dense_baseline: Option<&BTreeMap<String, f64>>,
) -> Result<()> {
    let json = serde_json::json!({
        "model": args.model,
        "mod": mod_config,
        "train": train_config,
        "report": report,
        "collapsed_layers": report.collapsed_layers(collapse_floor(args)),
        "perplexity_dense_finetuned": dense_baseline,
    });
    let text = serde_json::to_string_pretty(&json)?;
    modification::fsutil::write_files_atomically(&args.out, |staging| {
        let path = staging.join("report.json");
        std::fs::write(&path, &text).map_err(|source| modification::Error::Io { path, source })
    })?;
    println!("report: {}", args.out.join("report.json").display());
    Ok(())
}

/// The conversion and training settings the arguments describe.
fn settings(args: &Args) -> (ModConfig, TrainConfig) {
    let target_compute =
        (!args.paper_recipe && args.target_kept.is_none()).then_some(args.target_compute);
    let (layers, kv, train, objective) = if args.paper_recipe {
        (
            LayersArg::Odd,
            KvArg::Skip,
            TrainArg::Routers,
            ObjectiveArg::Lm,
        )
    } else {
        (args.layers, args.kv, args.train, args.objective)
    };
    let mod_config = ModConfig {
        routed_layers: RoutedLayers::Rule(match layers {
            LayersArg::Odd => LayerRule::Odd,
            LayersArg::All => LayerRule::All,
        }),
        router: match args.router {
            RouterArg::Threshold => RouterKind::ThresholdP {
                p: args.p,
                per_layer: BTreeMap::new(),
            },
            RouterArg::Topk => RouterKind::TopK {
                capacity: args.capacity,
            },
        },
        kv_policy: match kv {
            KvArg::Skip => KvPolicy::Skip,
            KvArg::Keep => KvPolicy::Keep,
        },
        gate_input: if args.gate_normalized {
            GateInput::Normalized
        } else {
            GateInput::Residual
        },
        gate_init_bias: args.gate_bias,
        alpha: args
            .alpha
            .unwrap_or(if target_compute.is_some() || args.target_kept.is_some() {
                0.1
            } else {
                0.01
            }),
        sink_tokens: args.sinks,
        skip_adapter_rank: if args.paper_recipe {
            0
        } else {
            args.skip_adapter
        },
        ..ModConfig::default()
    };
    let train_config = TrainConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        router_lr: args.router_lr,
        base_lr: args.base_lr,
        warmup_steps: args.warmup,
        min_lr_ratio: args.min_lr_ratio,
        grad_accum: args.grad_accum,
        seed: args.seed,
        trainable: train.into(),
        lora: LoraConfig {
            rank: args.lora_rank,
            alpha: args.lora_alpha,
        },
        lora_lr: args.lora_lr,
        objective: objective.into(),
        target_compute,
        budget_ramp: args.budget_ramp,
        target_kept: args.target_kept,
        target_per_layer: args.target_per_layer,
        matmul_precision: args.run.matmul.precision(),
        ..TrainConfig::default()
    };

    (mod_config, train_config)
}
