//! A converted model's trade-off curve on the corpus's held-out rows: every routed layer's
//! threshold moved by one scalar δ in logit space ([`RouterKind::shifted`]), and for each δ
//! the held-out compute fraction, skip, and worst and mean perplexity ratio against the
//! original.
//!
//! ```text
//! cargo run --release --example tradeoff -- --model out/smollm2-mod [--shifts -0.4 0 0.4]
//! ```
//! Each conversion calibrates its thresholds on training rows, so two conversions land at
//! slightly different held-out compute; their curves compare them at matched compute.
//! δ > 0 raises every threshold (fewer tokens kept). Top-k models have no threshold and are
//! refused.
//!
//! [`RouterKind::shifted`]: modification::mixture_of_depths::RouterKind::shifted

mod support;

use anyhow::Result;
use clap::Parser;
use modification::conversion::{evaluate_sources, original_perplexity, summarize_held_out};
use modification::mixture_of_depths::RouterKind;
use modification::{Checkpoint, Llama, ModModel};

#[derive(Parser, Debug)]
struct Args {
    /// A converted model folder (threshold-p).
    #[arg(long)]
    model: String,
    /// The original model it was converted from.
    #[arg(long, default_value = "assets/model/SmolLM2-135M-Instruct.Q4_1.gguf")]
    original: String,
    /// Corpus root (the held-out rows `convert` reports on).
    #[arg(long, default_value = "assets/corpus")]
    data: std::path::PathBuf,
    /// Tokens per held-out row (as `convert --seq-len`).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Threshold shifts δ in logit space.
    #[arg(long, num_args = 1.., allow_negative_numbers = true,
          default_values_t = [-0.4, -0.2, 0.0, 0.2, 0.4])]
    shifts: Vec<f64>,
    #[command(flatten)]
    run: support::DeviceArgs,
}

fn main() -> Result<()> {
    support::park_idle_threads_for_inference();
    support::tune_malloc_for_tensors();
    support::init_logging();
    let args = Args::parse();
    modification::model::amx::set_f32_matmul_precision(args.run.matmul.precision());
    let (dtype, device) = (args.run.dtype()?, args.run.device()?);
    let converted = ModModel::load(&args.model, dtype, &device)?;
    anyhow::ensure!(
        matches!(converted.config().router, RouterKind::ThresholdP { .. }),
        "{} routes with top-k: it has no threshold to move",
        args.model
    );
    let original_ckpt = Checkpoint::load(&args.original, dtype, &device)?;
    let dense = Llama::from_checkpoint(&original_ckpt)?;
    let corpus = support::load_corpus(&args.data, &original_ckpt, args.seq_len)?;
    let original = original_perplexity(&dense, &corpus)?;

    let names: Vec<&String> = original.keys().collect();
    print!(
        "{:>7} {:>8} {:>6} {:>7} {:>7}",
        "shift", "compute", "skip", "worst", "mean"
    );
    for name in &names {
        print!(" {name:>7}");
    }
    println!();
    for &shift in &args.shifts {
        let model = converted.with_router(converted.config().router.shifted(shift))?;
        let evals = evaluate_sources(&model, &corpus, false)?;
        let r = summarize_held_out(&original, &evals)?;
        print!(
            "{shift:>+7.2} {:>8.3} {:>6.3} {:>7.3} {:>7.3}",
            r.compute_fraction, r.skip_fraction, r.worst_perplexity_ratio, r.mean_perplexity_ratio
        );
        for name in &names {
            print!(" {:>7.3}", r.sources[*name].ratio);
        }
        println!();
    }
    Ok(())
}
