//! Perplexity of a model on text files.
//!
//! ```text
//! cargo run --release --example evaluate -- --model assets/model/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --text assets/corpus/moby/data.txt [--max-tokens 256] [--json]
//! ```
//! Each file is tokenized without BOS; its first `--max-tokens` tokens are scored (mean
//! NLL over the N - 1 predicted tokens). `--model` is a GGUF file, an HF folder or a hub id.
//! A converted (Mixture-of-Depths) folder is evaluated with its routers, deciding per
//! token as generation does, and also reports its skip, compute and KV-cache fractions
//! (long contexts too: attention runs in query chunks, so memory grows with T, not T²);
//! `--routing-map FILE` writes which tokens each routed layer kept for the first text's
//! first `--routing-map-tokens` tokens (an HTML heat map for `.html`, else a text table).

mod support;

use anyhow::Result;
use clap::Parser;
use modification::checkpoint::Checkpoint;
use modification::text;
use modification::{eval, Llama};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "Perplexity of a LLaMA-family model on text files")]
struct Args {
    /// GGUF file, HF checkpoint folder, or hub id.
    #[arg(long, default_value = "assets/model/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    /// Text files to score (one result each).
    #[arg(long, required = true, num_args = 1..)]
    text: Vec<PathBuf>,
    /// Score the first N tokens of each file.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[command(flatten)]
    run: support::DeviceArgs,
    /// Quantized inference: the GGUF's own blocks, or weights quantized to a GGML type.
    #[arg(long, value_enum)]
    quantized: Option<support::QuantArg>,
    /// Print one JSON object per file instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the routing map of the first text (converted models): HTML for a `.html`
    /// path, a text table otherwise.
    #[arg(long)]
    routing_map: Option<PathBuf>,
    /// Tokens of the first text the routing map shows.
    #[arg(long, default_value_t = 48)]
    routing_map_tokens: usize,
}

fn main() -> Result<()> {
    support::park_idle_threads_for_inference();
    support::tune_malloc_for_tensors();
    support::init_logging();
    let args = Args::parse();
    modification::model::amx::set_f32_matmul_precision(args.run.matmul.precision());
    let ckpt = Checkpoint::load(&args.model, args.run.dtype()?, &args.run.device()?)?;
    let mut model = Llama::from_checkpoint(&ckpt)?;
    let mut routed = if ckpt.extra_config.contains_key("mod") {
        Some(modification::ModModel::from_checkpoint(&ckpt)?)
    } else {
        None
    };
    if let Some(q) = args.quantized {
        support::quantize(&mut model, q, &args.model)?;
        if let Some(m) = &mut routed {
            support::quantize(m.base_mut(), q, &args.model)?;
        }
    }
    if !args.json {
        println!(
            "{:<50} {:>8} {:>10} {:>12}",
            "text", "tokens", "nll", "perplexity"
        );
    }
    for path in &args.text {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut ids = text::encode(&ckpt.tokenizer, &text)?;
        ids.truncate(args.max_tokens);
        let (ppl, fractions) = match &routed {
            None => (eval::perplexity(&model, &ids)?, None),
            Some(m) => {
                let r = eval::routed_rows_eval(m, std::slice::from_ref(&ids), true)?;
                let fractions = (r.skip_fraction(), r.compute_fraction, r.kv_fraction);
                (r.perplexity, Some(fractions))
            }
        };
        if let (Some((skip, compute, kv)), false) = (fractions, args.json) {
            println!(
                "routed: skip fraction {skip:.3}, compute {compute:.3} of dense, \
                 KV cache {kv:.3} of dense"
            );
        }
        if args.json {
            let obj = serde_json::json!({
                "text": path.display().to_string(),
                "perplexity": ppl.perplexity,
                "nll": ppl.nll,
                "tokens": ppl.tokens,
                "skip_fraction": fractions.map(|f| f.0),
                "compute_fraction": fractions.map(|f| f.1),
                "kv_fraction": fractions.map(|f| f.2),
            });
            println!("{obj}");
        } else {
            println!(
                "{:<50} {:>8} {:>10.6} {:>12.4}",
                path.display().to_string(),
                ppl.tokens,
                ppl.nll,
                ppl.perplexity
            );
        }
    }
    if let Some(out) = &args.routing_map {
        let m = routed
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("--routing-map needs a converted model"))?;
        let first = args
            .text
            .first()
            .ok_or_else(|| anyhow::anyhow!("no --text"))?;
        let text = std::fs::read_to_string(first)?;
        write_routing_map(m, &ckpt.tokenizer, &text, args.routing_map_tokens, out)?;
    }
    Ok(())
}

/// The routing map of the first `n` tokens of `text`, written atomically to `out`.
fn write_routing_map(
    model: &modification::ModModel,
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
    n: usize,
    out: &std::path::Path,
) -> Result<()> {
    let mut ids = text::encode(tokenizer, text)?;
    ids.truncate(n);
    anyhow::ensure!(!ids.is_empty(), "the text has no tokens");
    let batch = modification::Batch::single(&ids, ids.len(), model.base().device())?;
    let output = model.forward(&batch, modification::Mode::Inference)?;
    let tokens = (ids.iter())
        .map(|&id| text::decode(tokenizer, &[id]))
        .collect::<modification::Result<Vec<_>>>()?;
    let map = modification::routing::RoutingMap::from_stats(&output.stats, 0, tokens)?;
    let html = out.extension().is_some_and(|e| e == "html");
    let body = if html { map.to_html() } else { map.to_text() };
    let name = out
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("--routing-map {} names no file", out.display()))?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    modification::fsutil::write_files_atomically(dir, |staging| {
        let path = staging.join(name);
        std::fs::write(&path, &body).map_err(|source| modification::Error::Io { path, source })
    })?;
    println!(
        "routing map of {} tokens written to {}",
        ids.len(),
        out.display()
    );
    Ok(())
}
