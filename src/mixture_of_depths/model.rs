//! [`ModModel`]: a [`Llama`] plus one router per routed layer, and its forward passes.

use crate::error::Result;
use crate::mixture_of_depths::{GateInput, GateScaling, KvPolicy, ModConfig, RouterKind};
use crate::model::flops::{lm_head_flops, router_flops};
use crate::model::kv_cache::KvCache;
use crate::model::{Batch, Block, Llama};
use crate::routing::{selection, Dispatch, Router, RoutingStats, Selection};

use super::{layer, SkipAdapter};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use std::collections::BTreeMap;

/// How a forward pass executes the routed layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sparse: kept tokens are gathered, run through the block and added back; skipped
    /// tokens cost nothing. The forward value of every mode. Routers receive no gradient.
    Inference,
    /// For training: the block's delta is computed for every token (skipped tokens as
    /// queries over the keys their policy allows, plus themselves), the forward value stays
    /// that of the hard decision, and every token's gate receives the LM gradient:
    /// `w = f + g − stopgrad(g)` (straight-through) or `f·g + (1 − f)(g − stopgrad(g))`
    /// (multiply). Without it the gates of skipped tokens only feel the load-reducing push
    /// and collapse.
    Training,
}

/// Logits and routing statistics of one forward pass.
#[derive(Debug, Clone)]
pub struct ModOutput {
    /// `(B, T, vocab)` logits in the model dtype.
    pub logits: Tensor,
    /// One entry per routed layer, in layer order.
    pub stats: Vec<RoutingStats>,
    /// FLOPs spent by the pass (layers, routers, `lm_head`). In [`Mode::Training`], which
    /// computes every token, routed layers count what the sparse inference path would spend
    /// on the same decisions, so that this measures the converted model's compute.
    pub flops: f64,
    /// FLOPs the dense model spends on the same batch.
    pub dense_flops: f64,
}

impl ModOutput {
    /// Fraction of the dense model's FLOPs this pass spent.
    pub fn compute_fraction(&self) -> f64 {
        self.flops / self.dense_flops
    }
}

/// The final residual stream of a forward pass (before the final norm and `lm_head`), with
/// its routing statistics: what a loss computed over vocabulary chunks starts from (see
/// [`crate::loss::chunked_objective`]), so that no `(B, T, vocab)` tensor is materialised.
#[derive(Debug, Clone)]
pub struct HiddenOutput {
    /// `(B, T, d)` in the model dtype.
    pub hidden: Tensor,
    /// One entry per routed layer, in layer order.
    pub stats: Vec<RoutingStats>,
    /// FLOPs of the pass, `lm_head` on every token included (as [`ModOutput::flops`]).
    pub flops: f64,
    /// FLOPs the dense model spends on the same batch.
    pub dense_flops: f64,
}

impl HiddenOutput {
    /// Fraction of the dense model's FLOPs this pass spent.
    pub fn compute_fraction(&self) -> f64 {
        self.flops / self.dense_flops
    }
}

/// A Mixture-of-Depths LLaMA: the base model plus one [`Router`] per routed layer (and,
/// with `skip_adapter_rank > 0`, one [`SkipAdapter`] per routed layer).
#[derive(Debug, Clone)]
pub struct ModModel {
    base: Llama,
    routers: BTreeMap<usize, Router>,
    skip_adapters: BTreeMap<usize, SkipAdapter>,
    config: ModConfig,
}

impl ModModel {
    /// Adds routers to `base` as `config` says, reading them from `vb`
    /// (`model.layers.{j}.router.{weight,bias}`, and `model.layers.{j}.skip_adapter.*`
    /// when `config.skip_adapter_rank > 0`). With a `VarMap`-backed `vb` new routers are
    /// created (weight 0, bias `gate_init_bias`) and trainable, and new skip adapters are
    /// the identity ([`SkipAdapter::load`]).
    ///
    /// Errors: [`crate::Error::Config`] from [`ModConfig::validate`], or for a skip-adapter
    /// rank above the hidden size; [`crate::Error::Candle`] if a stored router or adapter
    /// tensor has another shape.
    pub fn new(base: Llama, config: ModConfig, vb: VarBuilder) -> Result<Self> {
        let n = base.config().num_hidden_layers;
        config.validate(n)?;
        let d = base.config().hidden_size;
        if config.skip_adapter_rank > d {
            return Err(crate::Error::config(format!(
                "skip adapter rank {} is above the hidden size {d}",
                config.skip_adapter_rank
            )));
        }
        let layers = config.routed_layer_indices(n)?;
        let routers = (layers.iter())
            .map(|&j| {
                let vb = vb.pp(format!("model.layers.{j}.router"));
                Ok((j, Router::load(vb, d, config.gate_init_bias)?))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        let skip_adapters = (layers.iter())
            .filter(|_| config.skip_adapter_rank > 0)
            .map(|&j| {
                let vb = vb.pp(format!("model.layers.{j}.skip_adapter"));
                Ok((j, SkipAdapter::load(vb, d, config.skip_adapter_rank)?))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Self {
            base,
            routers,
            skip_adapters,
            config,
        })
    }

    /// The dense model as a `ModModel` without routed layers (for the cached generation
    /// path of an original checkpoint).
    ///
    /// Errors: none in practice; [`crate::Error::Config`] if the base config is invalid.
    pub fn dense(base: Llama) -> Result<Self> {
        let config = ModConfig {
            routed_layers: crate::mixture_of_depths::RoutedLayers::Rule(
                crate::mixture_of_depths::LayerRule::None,
            ),
            ..ModConfig::default()
        };
        let vb = VarBuilder::from_tensors(Default::default(), DType::F32, base.device());
        Self::new(base, config, vb)
    }

    /// The same model (base and routers shared, not copied) with another selection
    /// operator: how calibrated thresholds or a capacity are put in place.
    ///
    /// Errors: [`crate::Error::Config`] from [`ModConfig::validate`].
    pub fn with_router(&self, router: RouterKind) -> Result<Self> {
        let config = ModConfig {
            router,
            ..self.config.clone()
        };
        config.validate(self.base.config().num_hidden_layers)?;
        Ok(Self {
            base: self.base.clone(),
            routers: self.routers.clone(),
            skip_adapters: self.skip_adapters.clone(),
            config,
        })
    }

    /// The skip adapters by routed layer index (empty when `skip_adapter_rank` is 0).
    pub fn skip_adapters(&self) -> &BTreeMap<usize, SkipAdapter> {
        &self.skip_adapters
    }

    /// The dense base model.
    pub fn base(&self) -> &Llama {
        &self.base
    }

    /// The dense base model, for inference-time changes that keep its shapes: quantized
    /// inference ([`Llama::quantize`], [`Llama::use_blocks`]). The routers stay f32, so
    /// tokens are routed as before, up to the quantization's change of the residual stream.
    pub fn base_mut(&mut self) -> &mut Llama {
        &mut self.base
    }

    /// The conversion settings.
    pub fn config(&self) -> &ModConfig {
        &self.config
    }

    /// Routers by layer index.
    pub fn routers(&self) -> &BTreeMap<usize, Router> {
        &self.routers
    }

    /// Forward pass: logits `(B, T, vocab)` and per-routed-layer [`RoutingStats`].
    ///
    /// Routed layers run the selection operator of the config (top-k over whole rows, so
    /// this is a full-sequence forward; see [`forward_causal`](Self::forward_causal) for the
    /// decision a decoder makes).
    ///
    /// Errors: [`crate::Error::SequenceTooLong`] when T exceeds the context;
    /// [`crate::Error::InvalidArgument`] for a token id outside the vocabulary.
    pub fn forward(&self, batch: &Batch, mode: Mode) -> Result<ModOutput> {
        self.with_logits(self.run(batch, mode, false, None)?)
    }

    /// As [`forward`](Self::forward), stopping before the final norm and `lm_head`.
    ///
    /// Errors: as [`forward`](Self::forward).
    pub fn forward_hidden(&self, batch: &Batch, mode: Mode) -> Result<HiddenOutput> {
        self.run(batch, mode, false, None)
    }

    pub(super) fn with_logits(&self, out: HiddenOutput) -> Result<ModOutput> {
        Ok(ModOutput {
            logits: self.base.logits(&out.hidden)?,
            stats: out.stats,
            flops: out.flops,
            dense_flops: out.dense_flops,
        })
    }

    /// As [`forward`](Self::forward), but with every routed layer deciding causally, per
    /// token: threshold-p as configured; a top-k model uses its auxiliary predictor
    /// `sigmoid(logit) >= 0.5` (MoD §3.5). This is the decision generation makes.
    ///
    /// Errors: as [`forward`](Self::forward).
    pub fn forward_causal(&self, batch: &Batch, mode: Mode) -> Result<ModOutput> {
        self.with_logits(self.run(batch, mode, true, None)?)
    }

    /// The forward pass of every use: `cache` given for a prefill or decode step,
    /// `causal` for the per-token decision generation makes. Every layer, dense or routed,
    /// in every mode, runs through [`layer::sparse_layer`].
    ///
    /// A failure half-way leaves `cache` as it was before the call. In inference, runs on
    /// a thread of rayon's pool (see `model::on_pool`).
    pub(crate) fn run(
        &self,
        batch: &Batch,
        mode: Mode,
        causal: bool,
        mut cache: Option<&mut KvCache>,
    ) -> Result<HiddenOutput> {
        let snapshot = cache.as_deref().map(KvCache::snapshot);
        let mut layers = || self.run_layers(batch, mode, causal, cache.as_deref_mut());
        let result = match mode {
            Mode::Inference => crate::model::on_pool(layers),
            // Where its backward will run and allocate: see `model::on_pool`.
            Mode::Training => layers(),
        };
        if let (Err(_), Some(cache), Some(snapshot)) = (&result, cache, snapshot) {
            cache.restore(&snapshot);
        }
        result
    }

    fn run_layers(
        &self,
        batch: &Batch,
        mode: Mode,
        causal: bool,
        mut cache: Option<&mut KvCache>,
    ) -> Result<HiddenOutput> {
        let base = &self.base;
        base.check_batch(batch)?;
        if cache.is_none() && batch.starts().iter().any(|&s| s > 0) {
            // The sinks and the keys before the batch live in a cache.
            return Err(crate::Error::InvalidArgument(
                "a batch that continues a sequence needs the sequence's KV cache \
                 (forward_cached)"
                    .to_string(),
            ));
        }
        if let Some(cache) = cache.as_deref() {
            if cache.num_layers() != base.layers().len() {
                return Err(crate::Error::InvalidArgument(format!(
                    "a KV cache of {} layers for a model of {}",
                    cache.num_layers(),
                    base.layers().len()
                )));
            }
            cache.check_continues(batch.starts())?;
        }
        let cfg = base.config();
        let all = Selection::all(batch.lengths(), batch.seq_len());
        // A dense layer attends each token to every earlier token of its row: those the
        // cache holds and those of this call.
        let dense_keys = match cache {
            Some(_) => batch.ends(),
            None => batch.lengths().to_vec(),
        };
        let dense_layer = layer::layer_cost(cfg, &all, &all, &dense_keys);
        let mut flops = lm_head_flops(cfg, batch.num_tokens());
        let dense_flops = flops + dense_layer * cfg.num_hidden_layers as f64;
        let mut x = base.embed(batch.ids())?;
        let mut stats = Vec::with_capacity(self.routers.len());
        for (j, layer) in base.layers().iter().enumerate() {
            let routing = match self.routers.get(&j) {
                Some(router) => Some(self.route(j, layer, router, &x, batch, mode, causal)?),
                None => None,
            };
            let queries = routing.as_ref().map_or(&all, |r| &r.sel);
            let writers = match (&routing, self.config.kv_policy) {
                (Some(r), KvPolicy::Skip) => &r.sel,
                _ => &all,
            };
            let (tokens, inference_cost) = match (mode, &routing) {
                // Every token is computed (for its gate's gradient), weighted by the hard
                // decision; the cost is that of the sparse layer the same decisions give.
                (Mode::Training, Some(r)) => {
                    let keys = match self.config.kv_policy {
                        KvPolicy::Keep => layer::Keys::Causal,
                        KvPolicy::Skip => layer::Keys::KeptOrSelf(&r.f),
                    };
                    let tokens = layer::LayerTokens {
                        queries: &all,
                        writers: &all,
                        weights: Some(&r.w),
                        keys,
                    };
                    let cost = layer::layer_cost(cfg, queries, writers, &writers.kept_per_row());
                    (tokens, Some(cost))
                }
                _ => {
                    let weights = match (&routing, self.config.gate_scaling) {
                        (Some(r), GateScaling::Multiply) => Some(&r.w),
                        _ => None,
                    };
                    let tokens = layer::LayerTokens {
                        queries,
                        writers,
                        weights,
                        keys: layer::Keys::Causal,
                    };
                    (tokens, None)
                }
            };
            let cache = cache.as_deref_mut();
            let (mut next, spent) =
                layer::sparse_layer(layer, j, &x, batch, base.rope(), cfg, tokens, cache)?;
            let spent = inference_cost.unwrap_or(spent);
            let Some(r) = routing else {
                x = next;
                flops += spent;
                continue;
            };
            let mut cost = spent + router_flops(cfg, batch.num_tokens());
            if let Some(adapter) = self.skip_adapters.get(&j) {
                let scaling = self.config.gate_scaling;
                let (adapted, tokens) =
                    add_skip_update(adapter, layer, &x, next, &r, batch, mode, scaling)?;
                next = adapted;
                cost += adapter.flops(tokens);
            }
            x = next;
            flops += cost;
            stats.push(RoutingStats {
                layer: j,
                kept: r.sel.num_kept(),
                valid: batch.num_tokens(),
                mean_gate: r.mean_gate,
                logits: r.logits,
                kept_mask: r.f,
                flops: cost,
                dense_flops: dense_layer,
            });
        }
        if let Some(cache) = cache {
            cache.advance(&batch.ends());
        }
        Ok(HiddenOutput {
            hidden: x,
            stats,
            flops,
            dense_flops,
        })
    }

    /// The tokens layer `j` keeps, from its router's gates (`gates`: the host copy, `(B, T)`
    /// row-major) or, for top-k over whole rows, its logits `(B, T)` (read back here).
    fn select(
        &self,
        j: usize,
        logits: &Tensor,
        gates: &[f32],
        batch: &Batch,
        causal: bool,
    ) -> Result<Selection> {
        let t = batch.seq_len();
        // Sinks are the first positions of a sequence, wherever the batch starts.
        let sinks: Vec<usize> = batch
            .starts()
            .iter()
            .map(|&s| self.config.sink_tokens.saturating_sub(s))
            .collect();
        let threshold = match (&self.config.router, causal) {
            (RouterKind::ThresholdP { .. }, _) => self.config.threshold_for(j).unwrap_or(0.5),
            // A top-k model decoding causally uses its auxiliary predictor (MoD §3.5).
            (RouterKind::TopK { .. }, true) => 0.5,
            (RouterKind::TopK { capacity }, false) => {
                let logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
                return selection::top_k(&logits, batch.lengths(), t, *capacity, &sinks);
            }
        };
        selection::threshold_p(gates, batch.lengths(), t, threshold, &sinks)
    }

    /// Router decision of layer `j` on `x` `(B, T, d)`: logits, kept tokens, and the
    /// per-token output weight `w` (forward value f, or f·g for Multiply; gradient through g).
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        j: usize,
        layer: &Block,
        router: &Router,
        x: &Tensor,
        batch: &Batch,
        mode: Mode,
        causal: bool,
    ) -> Result<Routing> {
        let (b, t) = (batch.batch_size(), batch.seq_len());
        let gate_in = match self.config.gate_input {
            GateInput::Residual => x.clone(),
            GateInput::Normalized => layer.normed_input(x)?,
        };
        let logits = router.logits(&gate_in)?;
        // Inference records no graph through trainable routers (and keeps the fused kernels).
        let logits = match mode {
            Mode::Inference => logits.detach(),
            Mode::Training => logits,
        };
        let g = router.gates(&logits)?;
        // The one host copy a routed layer makes: the decisions are taken on the host.
        let gates: Vec<f32> = g.flatten_all()?.to_vec1()?;
        let sel = self.select(j, &logits, &gates, batch, causal)?;
        let f = Tensor::from_vec(sel.mask(), (b, t), x.device())?;
        let tokens = batch.num_tokens().max(1) as f64;
        let mean_gate = match mode {
            Mode::Training => {
                let valid_f = batch.valid().to_dtype(DType::F32)?;
                ((&g * &valid_f)?.sum_all()? / tokens)?
            }
            // The same mean from the host copy: no gradient is needed, and a decode step
            // pays per op, not per FLOP.
            Mode::Inference => {
                let sum: f64 = (batch.lengths().iter().enumerate())
                    .map(|(row, &len)| {
                        gates[row * t..][..len]
                            .iter()
                            .map(|&v| v as f64)
                            .sum::<f64>()
                    })
                    .sum();
                Tensor::new((sum / tokens) as f32, x.device())?
            }
        };
        let w = match (mode, self.config.gate_scaling) {
            // Inference takes no gradient: the forward value alone, without building the
            // estimator's graph (a decode step's overhead is per op, not per FLOP).
            (Mode::Inference, GateScaling::StraightThrough) => f.clone(),
            (Mode::Inference, GateScaling::Multiply) => (&f * &g)?,
            // Forward value: the hard decision f (times g for Multiply); gradient through g.
            (Mode::Training, scaling) => {
                let ste = (&g - g.detach())?;
                match scaling {
                    GateScaling::StraightThrough => (&f + &ste)?,
                    GateScaling::Multiply => ((&f * &g)? + ((1.0 - &f)? * &ste)?)?,
                }
            }
        };
        Ok(Routing {
            logits,
            sel,
            f,
            w,
            mean_gate,
        })
    }
}

/// Adds the skip adapter's update to a routed layer's output `next` `(B, T, d)` (the
/// layer's input `x`), and returns it with the number of tokens the adapter computes at
/// inference (for the FLOPs; training counts the same).
///
/// Inference under straight-through scaling gathers the skipped tokens and adds the
/// adapter's update to them alone. Training (and `Multiply`, whose kept tokens get
/// `(1 − g)` of it) computes every token and adds `(1 − w)·A`: the forward value is the
/// same, and the gate's gradient is the block's gain over the adapter.
#[allow(clippy::too_many_arguments)]
fn add_skip_update(
    adapter: &SkipAdapter,
    layer: &Block,
    x: &Tensor,
    next: Tensor,
    r: &Routing,
    batch: &Batch,
    mode: Mode,
    scaling: GateScaling,
) -> Result<(Tensor, usize)> {
    let skipped = r.sel.skipped(batch.lengths());
    let inference_tokens = match scaling {
        GateScaling::StraightThrough => skipped.num_kept(),
        GateScaling::Multiply => batch.num_tokens(),
    };
    if mode == Mode::Training || scaling == GateScaling::Multiply {
        let a = adapter.update(&layer.normed_input(x)?)?;
        let weight = (1.0 - &r.w)?.to_dtype(a.dtype())?.unsqueeze(2)?;
        return Ok(((next + a.broadcast_mul(&weight)?)?, inference_tokens));
    }
    let Some(dispatch) = Dispatch::new(&skipped, x.device(), x.dtype())? else {
        return Ok((next, 0));
    };
    let a = adapter.update(&layer.normed_input(&dispatch.gather(x)?)?)?;
    Ok((dispatch.add_back(&next, &a)?, inference_tokens))
}

/// A routed layer's decision on a batch.
pub(super) struct Routing {
    /// Router logits `(B, T)` f32.
    pub(super) logits: Tensor,
    /// Kept tokens.
    pub(super) sel: Selection,
    /// Kept mask `(B, T)` f32.
    pub(super) f: Tensor,
    /// Output weight of every token `(B, T)` f32.
    pub(super) w: Tensor,
    /// Mean gate over valid tokens (scalar, differentiable in training).
    pub(super) mean_gate: Tensor,
}
