//! Write any checkpoint the crate reads (GGUF file, HF folder, hub id) as a Hugging Face
//! folder: what the PyTorch peer benchmarks and the reference prototype load.
//!
//! ```text
//! cargo run --release --example export -- --model assets/model/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --out out/smollm2-hf
//! ```

mod support;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Parser;
use modification::checkpoint::export::save_hf;
use modification::Checkpoint;

#[derive(Parser, Debug)]
#[command(about = "Export a checkpoint as an HF folder (f32 safetensors)")]
struct Args {
    /// GGUF file, HF folder or hub id.
    #[arg(long, default_value = "assets/model/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    /// Output folder (only the files the crate writes are replaced).
    #[arg(long, default_value = "out/smollm2-hf")]
    out: std::path::PathBuf,
}

fn main() -> Result<()> {
    support::init_logging();
    let args = Args::parse();
    let ckpt = Checkpoint::load(&args.model, DType::F32, &Device::Cpu)?;
    save_hf(&ckpt, &args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
