//! The decode step on the CPU: one new token of one sequence through every layer on host
//! slices, without candle's per-op overhead.
//!
//! A decode step reads every weight once for a single token, so its time should be the
//! time to stream the weights. Through candle ops it pays about 45 small tensor ops per
//! layer (allocation, dispatch, layout checks) on top, a third of the step for SmolLM2 in
//! f32 and more with 4-bit weights. Here the router, RMSNorm, RoPE, attention over the
//! cached keys, SwiGLU and the residual adds run on host vectors; the projections run the
//! crate's own matrix-vector kernels (f32 rows, or Q4_1 / Q8_0 blocks); the cache is
//! written through its usual `append`. The mathematics, the routing decision,
//! the KV policy and the FLOP count are those of [`super::layer::sparse_layer`], which
//! every other pass runs; `tests/generate.rs` holds the two paths to the same logits.

use super::layer::layer_cost;
use super::{GateInput, GateScaling, HiddenOutput, KvPolicy, ModModel, RouterKind};
use crate::error::Result;
use crate::model::flops::router_flops;
use crate::model::gemv::dot_kernel;
use crate::model::kv_cache::KvCache;
use crate::model::{Batch, Block, Projection};
use crate::routing::{RoutingStats, Selection};
use candle_core::{CpuStorage, DType, Storage, Tensor};

impl ModModel {
    /// Whether [`decode_on_host`](Self::decode_on_host) can run `batch`: one row of one
    /// token, f32 weights on the CPU, and projections the host kernels can multiply by (no
    /// unmerged adapter; dense f32 or Q4_1 / Q8_0 blocks).
    pub(super) fn can_decode_on_host(&self, batch: &Batch) -> bool {
        let base = self.base();
        batch.batch_size() == 1
            && batch.seq_len() == 1
            && batch.lengths() == [1]
            && base.device().is_cpu()
            && base.dtype() == DType::F32
            && (base.layers().iter())
                .all(|l| l.projections().iter().all(|(_, p)| p.has_host_product()))
    }

    /// One decode step on host slices (see the module's documentation): the hidden state
    /// `(1, 1, d)` of the new token, its routing statistics and FLOPs, with the cache
    /// appended to. The caller has checked the batch against the model and the cache, and
    /// advances the cache's row afterwards.
    pub(super) fn decode_on_host(&self, batch: &Batch, cache: &mut KvCache) -> Result<HiddenOutput> {
        let base = self.base();
        let cfg = base.config();
        let device = base.device();
        let position = batch.starts()[0];
        let (cos, sin) = base.rope().host_row(position)?;
        let mut x: Vec<f32> = base.embed(batch.ids())?.flatten_all()?.to_vec1()?;

        let all = Selection::all(&[1], 1);
        let none = Selection::new(vec![Vec::new()], 1)?;
        let dense_layer = layer_cost(cfg, &all, &all, &[position + 1]);
        let mut flops = crate::model::flops::lm_head_flops(cfg, 1);
        let dense_flops = flops + dense_layer * cfg.num_hidden_layers as f64;
        let mut stats = Vec::with_capacity(self.routers().len());
        for (j, layer) in base.layers().iter().enumerate() {
            let (norm1, _, eps) = layer.norms();
            let normed = rms_norm(&x, &host(norm1)?, eps);
            // The router's decision, as `select` takes it: threshold-p, or a top-k model's
            // auxiliary predictor (decoding is causal); the sinks are always kept.
            let routing = match self.routers().get(&j) {
                None => None,
                Some(router) => {
                    let (w, b) = router.tensors();
                    let gate_in = match self.config().gate_input {
                        GateInput::Residual => &x,
                        GateInput::Normalized => &normed,
                    };
                    let logit = dot_kernel()(&host(w)?, gate_in) + host(b)?[0];
                    let gate = 1.0 / (1.0 + (-logit).exp());
                    let threshold = match self.config().router {
                        RouterKind::ThresholdP { .. } => self.config().threshold_for(j).unwrap_or(0.5),
                        RouterKind::TopK { .. } => 0.5,
                    };
                    let kept = position < self.config().sink_tokens || gate >= threshold as f32;
                    Some((logit, gate, kept))
                }
            };
            let kept = routing.is_none_or(|(_, _, kept)| kept);
            let writes = kept || self.config().kv_policy == KvPolicy::Keep;
            if writes {
                let (k, v) = key_value(layer, &normed, &cos, &sin)?;
                let shape = (1, cfg.num_kv_heads(), 1, cfg.head_dim());
                let (k, v) = (Tensor::from_vec(k, shape, device)?, Tensor::from_vec(v, shape, device)?);
                cache.append(j, 0, &k, &v, &[position as u32])?;
            }
            let keys = cache.len(j, 0)?;
            let queries = if kept { &all } else { &none };
            let writers = if writes { &all } else { &none };
            let spent = layer_cost(cfg, queries, writers, &[keys]);
            if kept {
                let delta = layer_delta(layer, cache, j, &x, &normed, &cos, &sin, cfg)?;
                let weight = match (self.config().gate_scaling, routing) {
                    (GateScaling::Multiply, Some((_, gate, _))) => gate,
                    _ => 1.0,
                };
                for (xi, di) in x.iter_mut().zip(&delta) {
                    *xi += weight * di;
                }
            }
            let Some((logit, gate, kept)) = routing else {
                flops += spent;
                continue;
            };
            let cost = spent + router_flops(cfg, 1);
            flops += cost;
            stats.push(RoutingStats {
                layer: j,
                kept: kept as usize,
                valid: 1,
                mean_gate: Tensor::new(gate, device)?,
                logits: Tensor::new(&[[logit]], device)?,
                kept_mask: Tensor::new(&[[kept as u8 as f32]], device)?,
                flops: cost,
                dense_flops: dense_layer,
            });
        }
        Ok(HiddenOutput {
            hidden: Tensor::from_vec(x, (1, 1, cfg.hidden_size), device)?,
            stats,
            flops,
            dense_flops,
        })
    }
}

/// A small f32 CPU tensor's values (norm weights, router tensors).
fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1()?)
}

/// `x / sqrt(mean(x²) + ε) · w`, as candle's RMSNorm computes it.
fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean + eps as f32).sqrt();
    x.iter().zip(w).map(|(v, w)| v * scale * w).collect()
}

/// Rotates every head of `x` (`heads · head_dim` values) in place, half-split layout:
/// `(a, b) ← (a·cos − b·sin, b·cos + a·sin)` over the two halves of each head.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_mut(2 * half) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (ai, bi) = (a[i], b[i]);
            a[i] = ai * cos[i] - bi * sin[i];
            b[i] = bi * cos[i] + ai * sin[i];
        }
    }
}

fn projection<'a>(projections: &'a [(&'static str, &'a Projection)], name: &str) -> &'a Projection {
    let found = projections.iter().find(|(n, _)| *n == name);
    found.expect("every attention and MLP has its four and three projections").1
}

/// The new token's key (rotated) and value at a layer, `n_kv · head_dim` each.
fn key_value(
    layer: &Block,
    normed: &[f32],
    cos: &[f32],
    sin: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let projections = layer.attention().projections();
    let mut k = projection(&projections, "k_proj").host_product(normed)?;
    let v = projection(&projections, "v_proj").host_product(normed)?;
    rope(&mut k, cos, sin);
    Ok((k, v))
}

/// The layer's update `Block(x) − x` for the new token, attending to every entry the cache
/// holds for the row at layer `j` (the token's own included).
#[allow(clippy::too_many_arguments)]
fn layer_delta(
    layer: &Block,
    cache: &KvCache,
    j: usize,
    x: &[f32],
    normed: &[f32],
    cos: &[f32],
    sin: &[f32],
    cfg: &crate::LlamaConfig,
) -> Result<Vec<f32>> {
    let attention = layer.attention().projections();
    let mut q = projection(&attention, "q_proj").host_product(normed)?;
    rope(&mut q, cos, sin);
    let (k, v) = cache.row_views(j, 0)?.ok_or_else(|| {
        crate::Error::InvalidArgument(format!("layer {j} has no keys for its query"))
    })?;
    let heads = attend(&q, &k, &v, cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim())?;
    let a = projection(&attention, "o_proj").host_product(&heads)?;
    let h: Vec<f32> = x.iter().zip(&a).map(|(x, a)| x + a).collect();
    let (_, norm2, eps) = layer.norms();
    let normed2 = rms_norm(&h, &host(norm2)?, eps);
    let mlp = layer.mlp().projections();
    let gate = projection(&mlp, "gate_proj").host_product(&normed2)?;
    let up = projection(&mlp, "up_proj").host_product(&normed2)?;
    let act: Vec<f32> = (gate.iter().zip(&up))
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    let m = projection(&mlp, "down_proj").host_product(&act)?;
    Ok(a.iter().zip(&m).map(|(a, m)| a + m).collect())
}

/// Grouped-query attention of one query (`heads · head_dim`, rotated) over the cached keys
/// and values `k`, `v` (`(1, kv_heads, len, head_dim)` views of the cache's buffers): query
/// head h reads KV head `h / (heads / kv_heads)`. Returns the heads' outputs concatenated.
fn attend(
    q: &[f32],
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<Vec<f32>> {
    let len = k.dim(2)?;
    let (k_store, k_layout) = k.storage_and_layout();
    let (v_store, v_layout) = v.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(ks)), Storage::Cpu(CpuStorage::F32(vs))) = (&*k_store, &*v_store)
    else {
        return Err(crate::Error::InvalidArgument(
            "the host decode step needs an f32 KV cache on the CPU".to_string(),
        ));
    };
    // The views narrow the buffers' slot axis: each head's `len` entries are contiguous.
    let contiguous_heads = |s: &[usize]| s.len() == 4 && s[2] == head_dim && s[3] == 1;
    if !contiguous_heads(k_layout.stride()) || !contiguous_heads(v_layout.stride()) {
        return Err(crate::Error::InvalidArgument(format!(
            "the KV cache's entries are laid out with strides {:?}, not head by head",
            k_layout.stride()
        )));
    }
    let head_stride = k_layout.stride()[1];
    let (k0, v0) = (k_layout.start_offset(), v_layout.start_offset());
    let dot = dot_kernel();
    let scale = 1.0 / (head_dim as f32).sqrt();
    let group = heads / kv_heads;
    let mut out = vec![0f32; heads * head_dim];
    let mut scores = vec![0f32; len];
    for h in 0..heads {
        let g = h / group;
        let qh = &q[h * head_dim..][..head_dim];
        let keys = &ks[k0 + g * head_stride..][..len * head_dim];
        let values = &vs[v0 + g * v_layout.stride()[1]..][..len * head_dim];
        for (s, key) in scores.iter_mut().zip(keys.chunks_exact(head_dim)) {
            *s = dot(qh, key) * scale;
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let oh = &mut out[h * head_dim..][..head_dim];
        for (s, value) in scores.iter().zip(values.chunks_exact(head_dim)) {
            let p = s / sum;
            for (o, v) in oh.iter_mut().zip(value) {
                *o += p * v;
            }
        }
    }
    Ok(out)
}
