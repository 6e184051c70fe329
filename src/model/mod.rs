//! The LLaMA decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.
//!
//! Every module computes on an explicit set of tokens given by their hidden states and
//! their ORIGINAL position ids, so that a routed layer can run the same code on the tokens
//! its router kept (RoPE at the original positions, causal mask over original positions).

pub mod amx;
pub mod attention;
mod awake_pool;
pub mod batch;
pub mod block;
pub mod flops;
pub mod fused;
mod gemv;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod mlp;
#[cfg(feature = "cuda")]
mod nvrtc;
mod on_pool;
pub mod ops;
mod outer_product;
pub mod prefix_attention;
pub mod prefix_softmax;
mod qgemv;
pub mod recomputed_attention;
pub mod rope;
pub mod token_losses;
mod vector_math;

pub use attention::{attention_mask, Attention, Visible};
pub use batch::Batch;
pub use block::Block;
/// Rows up to which a product takes the decode path (matrix-vector kernels, quantized
/// blocks where the model has them).
pub(crate) use gemv::MAX_ROWS as DECODE_ROWS;
pub use linear::Projection;
pub use llama::Llama;
pub use lora::LoraConfig;
pub use mlp::Mlp;
pub(crate) use on_pool::on_pool;
pub use rope::{RopeAt, RotaryEmbedding};
