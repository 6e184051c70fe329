//! Speed and peak memory of one conversion training step (4 × 256 tokens by default):
//! the workload of the PyTorch peer in `benches/peers/pytorch.py`.
//!
//! ```text
//! cargo run --release --example bench_train -- --train routers --objective lm
//! cargo run --release --example bench_train -- --train all --objective lm
//! cargo run --release --example bench_train -- --train lora --objective kl   # convert's default
//! ```
//! Prints tokens/s (median of `--reps` steps after one warm-up step), the process's peak
//! resident memory and, with `--peak-tflops`, the model FLOPs utilisation (6 · parameters
//! FLOPs a token for full-parameter training, Kaplan et al. 2020). Run one setting per
//! process: the peak is per process.
//!
//! `--random-weights` takes the config and tokenizer from a folder holding only
//! `config.json` and `tokenizer.json` and draws the weights: the speed of a model that
//! cannot travel (`scripts/gpu-check`).

mod support;

use support::{ObjectiveArg, TrainArg};

use anyhow::Result;
use clap::Parser;
use modification::mixture_of_depths::{KvPolicy, LayerRule, RoutedLayers};
use modification::train::TrainConfig;
use modification::train::Trainer;
use modification::{Checkpoint, ModConfig};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "assets/model/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    /// Draw the weights instead of loading them (--model: a folder with config.json and
    /// tokenizer.json).
    #[arg(long)]
    random_weights: bool,
    /// The device's peak dense FLOP/s for --dtype, in TFLOP/s, to report MFU.
    #[arg(long)]
    peak_tflops: Option<f64>,
    #[arg(long, default_value = "assets/corpus")]
    data: std::path::PathBuf,
    /// What trains.
    #[arg(long, value_enum, default_value = "routers")]
    train: TrainArg,
    /// The objective.
    #[arg(long, value_enum, default_value = "lm")]
    objective: ObjectiveArg,
    /// Rows per step.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also time one step's phases apart (forward, LM loss, backward), each waited for on
    /// the device: where a GPU step's time goes.
    #[arg(long)]
    phases: bool,
    #[command(flatten)]
    run: support::DeviceArgs,
}

/// Peak resident memory of this process, bytes (Linux; 0 elsewhere).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    (status.lines())
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() -> Result<()> {
    support::tune_malloc_for_tensors();
    support::init_logging();
    let args = Args::parse();
    anyhow::ensure!(args.reps >= 1, "--reps must be at least 1");
    let (dtype, device) = (args.run.dtype()?, args.run.device()?);
    let ckpt = match args.random_weights {
        true => support::random_checkpoint(std::path::Path::new(&args.model), dtype, &device)?,
        false => Checkpoint::load(&args.model, dtype, &device)?,
    };
    let corpus = support::load_corpus(&args.data, &ckpt, args.seq_len)?;
    let mod_config = ModConfig {
        routed_layers: RoutedLayers::Rule(LayerRule::All),
        kv_policy: KvPolicy::Keep,
        ..ModConfig::default()
    };
    let train_config = TrainConfig {
        steps: args.reps + 1,
        batch_size: args.batch_size,
        trainable: args.train.into(),
        objective: args.objective.into(),
        matmul_precision: args.run.matmul.precision(),
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&ckpt, mod_config, train_config)?;
    let mut rates = Vec::new();
    for step in 0..=args.reps {
        let r = trainer.train_step(&corpus)?;
        if step > 0 {
            rates.push(r.tokens as f64 / r.seconds);
        }
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    let rate = rates[rates.len() / 2];
    let name = format!("train {:?} {:?} tok/s", args.train, args.objective).to_lowercase();
    println!("{:<30} {:>12}", "products", args.run.matmul.describe());
    println!("{name:<30} {:>12.1}", rate);
    if let Some(peak) = args.peak_tflops {
        let params = modification::train::memory::parameter_count(&ckpt.config) as f64;
        let mfu = rate * 6.0 * params / (peak * 1e12);
        println!("{:<30} {:>12.3}", "MFU (6 x params a token)", mfu);
    }
    if args.phases {
        for (name, seconds) in phases(&trainer, &corpus, &ckpt)? {
            println!("{:<30} {:>12.4}", format!("phase {name} s"), seconds);
        }
    }
    println!(
        "{:<30} {:>12.2}",
        "peak resident GB",
        peak_rss() as f64 / (1u64 << 30) as f64
    );
    Ok(())
}

/// Seconds of one micro-batch's forward (to the last hidden states), LM loss (chunked
/// `lm_head` and NLL) and backward, each ended by a device synchronisation; the LM
/// objective alone (no load term, no teacher).
fn phases(
    trainer: &Trainer,
    corpus: &modification::train::Corpus,
    ckpt: &Checkpoint,
) -> Result<Vec<(&'static str, f64)>> {
    use modification::{loss, Batch, Mode};
    use std::time::Instant;
    let cfg = trainer.config();
    let model = trainer.model();
    let device = model.base().device().clone();
    let rows = corpus.train_batch(cfg.seed, 0, 0, cfg.batch_size);
    let pad = ckpt.config.eos_token_id.unwrap_or(0);
    let batch = Batch::from_rows(&rows, pad, ckpt.config.max_position_embeddings, &device)?;
    let _precision = modification::model::amx::precision_scope(cfg.matmul_precision);
    let mut out = Vec::new();
    let mut t = Instant::now();
    let mut lap = |name, out: &mut Vec<(&'static str, f64)>| -> Result<()> {
        device.synchronize()?;
        out.push((name, t.elapsed().as_secs_f64()));
        t = Instant::now();
        Ok(())
    };
    let hidden = model.forward_hidden(&batch, Mode::Training)?;
    lap("forward", &mut out)?;
    let terms = loss::chunked_objective(
        model.base(),
        &hidden.hidden,
        None,
        batch.ids(),
        batch.valid(),
    )?;
    let lm = terms.lm_loss()?;
    lap("LM loss", &mut out)?;
    lm.backward()?;
    lap("backward", &mut out)?;
    Ok(out)
}
