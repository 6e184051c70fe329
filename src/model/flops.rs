//! FLOP accounting of a LLaMA layer (a multiply-add counts 2 FLOPs). Norms, RoPE, softmax
//! and residual adds are O(T·d) and left out.

use crate::config::LlamaConfig;

/// FLOPs of one decoder layer that computes `queries` query tokens over `kv_tokens`
/// key/value tokens and `pairs` (query, key) scores, summed over the batch.
///
/// q and o projections `4·d²` per query, k and v projections `4·d·d_kv` per key/value
/// token, scores and weighted values `4·d` per pair, SwiGLU `6·d·d_ffn` per query.
pub fn layer_flops(cfg: &LlamaConfig, queries: usize, kv_tokens: usize, pairs: usize) -> f64 {
    let d = cfg.hidden_size as f64;
    let d_kv = (cfg.num_kv_heads() * cfg.head_dim()) as f64;
    let f = cfg.intermediate_size as f64;
    4.0 * d * d * queries as f64
        + 4.0 * d * d_kv * kv_tokens as f64
        + 4.0 * d * pairs as f64
        + 6.0 * d * f * queries as f64
}

/// FLOPs of the final projection to the vocabulary for `tokens` tokens: `2·d·V` each.
pub fn lm_head_flops(cfg: &LlamaConfig, tokens: usize) -> f64 {
    2.0 * cfg.hidden_size as f64 * cfg.vocab_size as f64 * tokens as f64
}

/// FLOPs of a router gate for `tokens` tokens: `2·d` each.
pub fn router_flops(cfg: &LlamaConfig, tokens: usize) -> f64 {
    2.0 * cfg.hidden_size as f64 * tokens as f64
}
