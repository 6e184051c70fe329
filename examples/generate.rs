//! Generate text with a converted (or original) model through the routed KV cache.
//!
//! ```text
//! cargo run --release --example generate -- --model out/smollm2-mod --prompt "Call me Ishmael." \
//!     [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--show-routing]
//! ```
//! Streams the text, then prints prefill and decode tokens/s, the KV-cache bytes (and the
//! dense model's for the same tokens), and the mean number of layers each generated token
//! used. `--show-routing` marks, per generated token, the routed layers it went through.

mod support;

use anyhow::Result;
use clap::Parser;
use modification::generate::{generate, SamplingConfig};
use modification::{Checkpoint, Llama, ModModel};
use std::io::Write;

#[derive(Parser, Debug)]
#[command(about = "Generate text with the routed KV cache")]
struct Args {
    /// Converted model folder, or an original GGUF file / HF folder / hub id.
    #[arg(long, default_value = "out/smollm2-mod")]
    model: String,
    /// The prompt (no BOS is added).
    #[arg(
        long,
        default_value = "Once upon a time, there was a little girl named"
    )]
    prompt: String,
    /// Largest number of new tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy: with the default repetition penalty of 1, the
    /// continuation transformers' greedy `generate` gives).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long)]
    top_p: Option<f64>,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Repetition penalty over the last 64 tokens (1 = none, the default).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 299_792_458)]
    seed: u64,
    /// Print which routed layers every generated token went through.
    #[arg(long)]
    show_routing: bool,
    #[command(flatten)]
    run: support::DeviceArgs,
    /// Quantized inference: the GGUF's own blocks, or weights quantized to a GGML type.
    #[arg(long, value_enum)]
    quantized: Option<support::QuantArg>,
}

fn main() -> Result<()> {
    support::park_idle_threads_for_inference();
    support::tune_malloc_for_tensors();
    support::init_logging();
    let args = Args::parse();
    modification::model::amx::set_f32_matmul_precision(args.run.matmul.precision());
    let dtype = args.run.dtype()?;
    let ckpt = Checkpoint::load(&args.model, dtype, &args.run.device()?)?;
    let mut model = if ckpt.extra_config.contains_key("mod") {
        ModModel::from_checkpoint(&ckpt)?
    } else {
        ModModel::dense(Llama::from_checkpoint(&ckpt)?)?
    };
    if let Some(q) = args.quantized {
        support::quantize(model.base_mut(), q, &args.model)?;
    }
    let cfg = SamplingConfig {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
        max_new_tokens: args.max_new_tokens,
        ..SamplingConfig::default()
    };
    print!("{}", args.prompt);
    let out = generate(&model, &ckpt.tokenizer, &args.prompt, &cfg, |t| {
        print!("{t}");
        let _ = std::io::stdout().flush();
    })?;
    println!("\n");
    let layers = ckpt.config.num_hidden_layers;
    let n_dec = out.tokens.len().saturating_sub(1).max(1);
    println!(
        "prefill {} tokens: {:.1} tokens/s; decode {} tokens: {:.1} tokens/s",
        out.prompt_tokens,
        out.prompt_tokens as f64 / out.prefill_seconds,
        out.tokens.len(),
        n_dec as f64 / out.decode_seconds.max(1e-9)
    );
    // The dense model caches every token that went through the model at every layer.
    let cached_tokens = out.prompt_tokens + out.tokens.len().saturating_sub(1);
    let kv_dim = ckpt.config.num_kv_heads() * ckpt.config.head_dim();
    let dense_bytes = layers * cached_tokens * 2 * kv_dim * dtype.size_in_bytes();
    println!(
        "KV cache: {} bytes ({:.3} of the dense model's {} bytes); policy {:?}",
        out.kv_bytes(),
        out.kv_bytes() as f64 / dense_bytes as f64,
        dense_bytes,
        model.config().kv_policy
    );
    if !out.routing.is_empty() {
        let routed = out.routing[0].len();
        let skipped: usize = out
            .routing
            .iter()
            .map(|r| r.iter().filter(|(_, k)| !k).count())
            .sum();
        println!(
            "mean layers used per generated token: {:.2} of {layers} ({routed} routed)",
            layers as f64 - skipped as f64 / out.routing.len() as f64
        );
    }
    if args.show_routing {
        println!("\nrouted layers per generated token (# = computed, . = skipped):");
        for (tok, r) in out.tokens.iter().zip(&out.routing) {
            let marks: String = r.iter().map(|(_, k)| if *k { '#' } else { '.' }).collect();
            let text = modification::text::decode(&ckpt.tokenizer, &[*tok])?;
            println!("{marks}  {text:?}");
        }
    }
    Ok(())
}
