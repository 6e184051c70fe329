//! Prefill and decode speed and KV-cache memory of a model, and of a converted model
//! against its dense original (same binary, same input, interleaved repetitions); prints
//! a table. The same workloads as the peer scripts in `benches/peers/`.
//!
//! ```text
//! cargo run --release --example bench_generate -- --model out/smollm2-mod \
//!     [--prefill 128 512 2048] [--decode-steps 32] [--reps 3]
//! ```
//! A dense model (GGUF file, HF folder) gets the original column only.
//!
//! `--random-weights` takes the config and tokenizer from a folder holding only
//! `config.json` and `tokenizer.json` and draws the weights (dense column only): the speed
//! of a model that cannot travel (`scripts/gpu-check`).

mod support;

use anyhow::Result;
use clap::Parser;
use modification::generate::decode_batch;
use modification::train::{Corpus, CorpusOptions, SourceSpec};
use modification::{Batch, Checkpoint, Llama, ModModel};
use std::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// A converted model folder, or a dense model.
    #[arg(long, default_value = "out/smollm2-mod")]
    model: String,
    /// Draw the weights instead of loading them (--model: a folder with config.json and
    /// tokenizer.json).
    #[arg(long)]
    random_weights: bool,
    /// Corpus root the text is drawn from (Moby Dick's held-out rows).
    #[arg(long, default_value = "assets/corpus")]
    data: std::path::PathBuf,
    /// Prompt lengths to prefill.
    #[arg(long, num_args = 1.., default_values_t = [128usize, 512, 2048])]
    prefill: Vec<usize>,
    /// Greedy decode steps timed after a 512-token prompt.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Repetitions (median reported; one more warms up).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[command(flatten)]
    run: support::DeviceArgs,
    /// Quantized inference: the GGUF's own blocks, or weights quantized to a GGML type.
    #[arg(long, value_enum)]
    quantized: Option<support::QuantArg>,
}

/// Tokens the decode measurement is prompted with.
const DECODE_PROMPT: usize = 512;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Seconds to prefill `prompt` (logits at its last token) and the KV-cache bytes after.
fn prefill(model: &ModModel, prompt: &[u32], max: usize) -> Result<(f64, usize)> {
    let device = model.base().device();
    let batch = Batch::single(prompt, max, device)?;
    let mut cache = model.new_cache(1)?;
    device.synchronize()?;
    let t = Instant::now();
    model.forward_cached_last(&batch, &mut cache)?;
    // A GPU queues its work: the time is the device's once it has finished.
    device.synchronize()?;
    Ok((t.elapsed().as_secs_f64(), cache.bytes()))
}

/// Tokens per second of `steps` greedy decode steps after prefilling `prompt`.
fn decode(model: &ModModel, prompt: &[u32], steps: usize, max: usize) -> Result<f64> {
    let device = model.base().device();
    let mut cache = model.new_cache(1)?;
    let batch = Batch::single(prompt, max, device)?;
    let mut logits = model.forward_cached_last(&batch, &mut cache)?.logits;
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..steps {
        let next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        let step = decode_batch(&[next], cache.next_positions(), max, device)?;
        logits = model.forward_cached(&step, &mut cache)?.logits;
    }
    device.synchronize()?;
    Ok(steps as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    support::park_idle_threads_for_inference();
    support::tune_malloc_for_tensors();
    support::init_logging();
    let args = Args::parse();
    modification::model::amx::set_f32_matmul_precision(args.run.matmul.precision());
    anyhow::ensure!(args.reps >= 1, "--reps must be at least 1");
    anyhow::ensure!(args.decode_steps >= 1, "--decode-steps must be at least 1");
    anyhow::ensure!(
        args.prefill.iter().all(|&n| n >= 1),
        "every --prefill length must be at least 1"
    );
    let (dtype, device) = (args.run.dtype()?, args.run.device()?);
    let ckpt = match args.random_weights {
        true => support::random_checkpoint(std::path::Path::new(&args.model), dtype, &device)?,
        false => Checkpoint::load(&args.model, dtype, &device)?,
    };
    let max = ckpt.config.max_position_embeddings;
    let longest = args.prefill.iter().copied().max().unwrap_or(0);
    anyhow::ensure!(
        longest.max(DECODE_PROMPT + args.decode_steps) <= max,
        "--prefill and {DECODE_PROMPT} + --decode-steps must fit the context of {max} tokens"
    );
    let mut models = vec![ModModel::dense(Llama::from_checkpoint(&ckpt)?)?];
    if ckpt.extra_config.contains_key("mod") {
        models.push(ModModel::from_checkpoint(&ckpt)?);
    }
    if let Some(q) = args.quantized {
        for m in &mut models {
            support::quantize(m.base_mut(), q, &args.model)?;
        }
    }
    let specs = SourceSpec::folders_of(&args.data)?;
    let opts = CorpusOptions {
        seq_len: 256,
        heldout_rows: longest.max(DECODE_PROMPT).div_ceil(256),
        ..CorpusOptions::default()
    };
    let eos = ckpt.config.eos_token_id.unwrap_or(0);
    let corpus = Corpus::load(&specs, &ckpt.tokenizer, eos, &opts)?;
    let source = (corpus.sources.iter().find(|s| s.name == "moby")).unwrap_or(&corpus.sources[0]);
    let text: Vec<u32> = source.heldout.concat();
    anyhow::ensure!(
        text.len() >= longest.max(DECODE_PROMPT),
        "the held-out text has {} tokens; {} are needed",
        text.len(),
        longest.max(DECODE_PROMPT)
    );

    println!("{:<30} {:>12}", "products", args.run.matmul.describe());
    println!(
        "{:<30} {:>12} {:>12} {:>8}",
        "measure", "original", "converted", "ratio"
    );
    let row = |name: String, values: &[f64], digits: usize| {
        let cells: Vec<String> = values.iter().map(|v| format!("{v:>12.digits$}")).collect();
        let ratio = match values {
            [o, c] => format!("{:>8.3}", c / o),
            _ => format!("{:>8}", "-"),
        };
        let converted = cells.get(1).cloned().unwrap_or(format!("{:>12}", "-"));
        println!("{name:<30} {} {converted} {ratio}", cells[0]);
    };
    for &n in &args.prefill {
        let mut seconds = vec![Vec::new(); models.len()];
        let mut bytes = vec![0; models.len()];
        for rep in 0..=args.reps {
            // Alternate the order so that neither model always runs on warmer caches.
            for i in 0..models.len() {
                let m = (i + rep) % models.len();
                let (s, b) = prefill(&models[m], &text[..n], max)?;
                if rep > 0 {
                    seconds[m].push(s);
                }
                bytes[m] = b;
            }
        }
        let rates: Vec<f64> = seconds.into_iter().map(|s| n as f64 / median(s)).collect();
        row(format!("prefill {n} tokens/s"), &rates, 1);
        let bytes: Vec<f64> = bytes.iter().map(|&b| b as f64).collect();
        row(format!("KV cache bytes at {n}"), &bytes, 0);
    }
    let prompt = &text[..DECODE_PROMPT];
    let mut rates = vec![Vec::new(); models.len()];
    for rep in 0..=args.reps {
        for i in 0..models.len() {
            let m = (i + rep) % models.len();
            let r = decode(&models[m], prompt, args.decode_steps, max)?;
            if rep > 0 {
                rates[m].push(r);
            }
        }
    }
    let rates: Vec<f64> = rates.into_iter().map(median).collect();
    row(
        format!("decode tokens/s (after {DECODE_PROMPT})"),
        &rates,
        1,
    );
    Ok(())
}
