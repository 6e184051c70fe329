//! Prefill and decode speed and KV-cache memory of a converted model against the original,
//! same binary, same input, interleaved repetitions; prints a table.
//!
//! ```text
//! cargo run --release --example bench_generate -- --model out/smollm2-mod
//! ```

mod support;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Parser;
use modification::generate::decode_batch;
use modification::train::{Corpus, CorpusOptions, SourceSpec};
use modification::{Batch, Checkpoint, Llama, ModModel};
use std::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// The converted model folder.
    #[arg(long, default_value = "out/smollm2-mod")]
    model: String,
    /// Corpus root the prompt is drawn from (held-out rows).
    #[arg(long, default_value = "assets/corpus")]
    data: std::path::PathBuf,
    /// Prompt lengths to prefill.
    #[arg(long, num_args = 1.., default_values_t = [512usize, 2048])]
    prefill: Vec<usize>,
    /// Decode steps timed after a 512-token prompt.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Repetitions (median reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    support::tune_malloc_for_tensors();
    support::init_logging();
    let args = Args::parse();
    anyhow::ensure!(args.reps >= 1, "--reps must be at least 1");
    anyhow::ensure!(args.decode_steps >= 1, "--decode-steps must be at least 1");
    anyhow::ensure!(
        args.prefill.iter().all(|&n| n >= 1),
        "every --prefill length must be at least 1"
    );
    let dev = Device::Cpu;
    let ckpt = Checkpoint::load(&args.model, DType::F32, &dev)?;
    let converted =
        ModModel::from_checkpoint(&ckpt).context("--model must be a converted model")?;
    let original = ModModel::dense(Llama::from_checkpoint(&ckpt)?)?;
    let max = ckpt.config.max_position_embeddings;
    const DECODE_PROMPT: usize = 512;
    let longest = (args.prefill.iter().copied())
        .chain([DECODE_PROMPT + args.decode_steps])
        .max()
        .unwrap_or(DECODE_PROMPT);
    anyhow::ensure!(
        longest <= max,
        "--prefill and 512 + --decode-steps must fit the context of {max} tokens"
    );
    let specs = SourceSpec::folders_of(&args.data)?;
    let opts = CorpusOptions {
        seq_len: 256,
        heldout_rows: longest.div_ceil(256),
        ..CorpusOptions::default()
    };
    let corpus = Corpus::load(
        &specs,
        &ckpt.tokenizer,
        ckpt.config.eos_token_id.unwrap_or(0),
        &opts,
    )?;
    let text: Vec<u32> = corpus
        .sources
        .iter()
        .find(|s| s.name == "moby")
        .unwrap_or(&corpus.sources[0])
        .heldout
        .concat();
    anyhow::ensure!(
        text.len() >= longest,
        "the held-out text has {} tokens; {longest} are needed",
        text.len()
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "measure", "original", "converted", "ratio"
    );
    for &n in &args.prefill {
        let batch = Batch::single(&text[..n], max, &dev)?;
        let (mut to, mut tc) = (Vec::new(), Vec::new());
        let (mut bo, mut bc) = (0, 0);
        for rep in 0..args.reps + 1 {
            for m in [rep % 2 == 0, rep % 2 == 1] {
                let model = if m { &original } else { &converted };
                let mut cache = model.new_cache(1)?;
                let t = Instant::now();
                model.forward_cached_last(&batch, &mut cache)?;
                let s = t.elapsed().as_secs_f64();
                if rep > 0 {
                    if m {
                        to.push(s)
                    } else {
                        tc.push(s)
                    }
                }
                if m {
                    bo = cache.bytes()
                } else {
                    bc = cache.bytes()
                }
            }
        }
        let (o, c) = (n as f64 / median(to), n as f64 / median(tc));
        println!(
            "{:<28} {:>12.1} {:>12.1} {:>8.3}",
            format!("prefill {n} tokens/s"),
            o,
            c,
            c / o
        );
        println!(
            "{:<28} {:>12} {:>12} {:>8.3}",
            format!("KV cache bytes at {n}"),
            bo,
            bc,
            bc as f64 / bo as f64
        );
    }
    let prompt = &text[..DECODE_PROMPT];
    let mut rates = [Vec::new(), Vec::new()];
    for rep in 0..args.reps {
        for m in [rep % 2 == 0, rep % 2 == 1] {
            let model = if m { &original } else { &converted };
            let mut cache = model.new_cache(1)?;
            model.forward_cached_last(&Batch::single(prompt, max, &dev)?, &mut cache)?;
            let t = Instant::now();
            for i in 0..args.decode_steps {
                let tok = text[prompt.len() + i];
                let step = decode_batch(&[tok], cache.next_positions(), max, &dev)?;
                model.forward_cached(&step, &mut cache)?;
            }
            rates[usize::from(!m)].push(args.decode_steps as f64 / t.elapsed().as_secs_f64());
        }
    }
    let (o, c) = (median(rates[0].clone()), median(rates[1].clone()));
    println!(
        "{:<28} {:>12.1} {:>12.1} {:>8.3}",
        "decode tokens/s (after 512)",
        o,
        c,
        c / o
    );
    Ok(())
}
