//! Text generation with the routed KV cache: prefill, then decode token by token.

use crate::error::{Error, Result};
use crate::mixture_of_depths::ModModel;
use crate::model::{Batch, Llama};
use crate::text::encode_prompt;
use candle_core::{IndexOp, D};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Greedy continuation of `prompt` (ids, no BOS added) by the dense model, recomputing the
/// whole prefix at every step (no cache: exact and simple, O(T²) per token). Stops early
/// at `eos` when given. Returns only the new ids.
///
/// Errors: [`Error::InvalidArgument`] for an empty prompt; [`Error::SequenceTooLong`] when
/// prompt plus continuation exceed the context.
pub fn greedy(
    model: &Llama,
    prompt: &[u32],
    max_new_tokens: usize,
    eos: Option<u32>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("empty prompt".to_string()));
    }
    let max = model.config().max_position_embeddings;
    let mut ids = prompt.to_vec();
    let mut out = Vec::with_capacity(max_new_tokens);
    for _ in 0..max_new_tokens {
        let batch = Batch::single(&ids, max, model.device())?;
        let logits = model.forward(&batch)?;
        let next = logits
            .i((0, ids.len() - 1))?
            .argmax(D::Minus1)?
            .to_scalar::<u32>()?;
        ids.push(next);
        out.push(next);
        if Some(next) == eos {
            break;
        }
    }
    Ok(out)
}

/// Greedy decoding of a batch of prompts of different lengths with the KV cache: one
/// prefill of the right-padded prompts, then one decode step per token for all rows. Each
/// row gets the tokens it would get alone. Returns `max_new_tokens` new ids per row.
///
/// Errors: [`Error::InvalidArgument`] for no prompt or an empty one;
/// [`Error::SequenceTooLong`] beyond the context.
pub fn greedy_batch(
    model: &ModModel,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let base = model.base();
    let max = base.config().max_position_embeddings;
    let device = base.device();
    let batch = Batch::from_rows(prompts, 0, max, device)?;
    let mut cache = model.new_cache(prompts.len())?;
    let logits = model.forward_cached_last(&batch, &mut cache)?.logits;
    let mut next: Vec<u32> = logits.i((.., 0))?.argmax(D::Minus1)?.to_vec1()?;
    let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(max_new_tokens); prompts.len()];
    for step in 0..max_new_tokens {
        for (o, &n) in out.iter_mut().zip(&next) {
            o.push(n);
        }
        if step + 1 == max_new_tokens {
            break;
        }
        let step_batch = decode_batch(&next, cache.next_positions(), max, device)?;
        let logits = model.forward_cached(&step_batch, &mut cache)?.logits;
        next = logits.i((.., 0))?.argmax(D::Minus1)?.to_vec1()?;
    }
    Ok(out)
}

/// A decode step's batch: token `ids[r]` at position `positions[r]` for every row.
///
/// Errors: [`Error::SequenceTooLong`] when a position reaches the context;
/// [`Error::InvalidArgument`] when `ids` is empty or `positions` has another length.
pub fn decode_batch(
    ids: &[u32],
    positions: &[usize],
    max_len: usize,
    device: &candle_core::Device,
) -> Result<Batch> {
    let rows: Vec<Vec<u32>> = ids.iter().map(|&id| vec![id]).collect();
    Batch::continuing(&rows, positions, 0, max_len, device)
}

/// Sampling settings (candle-transformers' `LogitsProcessor` does the sampling).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Temperature; 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling threshold.
    pub top_p: Option<f64>,
    /// Sample among the k most likely tokens.
    pub top_k: Option<usize>,
    /// Repetition penalty (1 = none) over the last `repeat_last_n` tokens.
    pub repeat_penalty: f32,
    /// Window of the repetition penalty.
    pub repeat_last_n: usize,
    /// Seed of the sampler.
    pub seed: u64,
    /// Largest number of new tokens.
    pub max_new_tokens: usize,
    /// Stop at this token (the model's EOS by default).
    pub eos: Option<u32>,
    /// Stop when the generated text contains one of these.
    pub stop: Vec<String>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: None,
            top_k: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 299_792_458,
            max_new_tokens: 64,
            eos: None,
            stop: Vec::new(),
        }
    }
}

/// What a generation produced and what it cost.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids.
    pub tokens: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Wall time of the prefill, seconds.
    pub prefill_seconds: f64,
    /// Wall time of all decode steps, seconds.
    pub decode_seconds: f64,
    /// Bytes held by the KV cache at the end, per layer.
    pub kv_bytes_per_layer: Vec<usize>,
    /// For every generated token but the last (which is never run through the model), the
    /// routed layers it went through: `(layer, kept)` in layer order.
    pub routing: Vec<Vec<(usize, bool)>>,
}

impl Generation {
    /// Total KV-cache bytes.
    pub fn kv_bytes(&self) -> usize {
        self.kv_bytes_per_layer.iter().sum()
    }
}

/// Generates a continuation of `prompt` (encoded by [`encode_prompt`]: with BOS where the
/// tokenizer adds one, as LLaMA-2's does), streaming new text to `on_text` as it is
/// produced.
///
/// Errors: [`Error::InvalidArgument`] for an empty prompt; [`Error::SequenceTooLong`] when
/// the prompt plus `max_new_tokens` exceed the context; [`Error::Tokenizer`].
pub fn generate(
    model: &ModModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    cfg: &SamplingConfig,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let base = model.base();
    let max = base.config().max_position_embeddings;
    let device = base.device();
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("empty prompt".to_string()));
    }
    let prompt_ids = encode_prompt(tokenizer, prompt)?;
    if prompt_ids.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt encodes to no tokens".to_string(),
        ));
    }
    if prompt_ids.len() + cfg.max_new_tokens > max {
        return Err(Error::SequenceTooLong {
            len: prompt_ids.len() + cfg.max_new_tokens,
            max,
        });
    }
    let sampling = match (cfg.temperature, cfg.top_k, cfg.top_p) {
        (t, _, _) if t <= 0.0 => Sampling::ArgMax,
        (t, None, None) => Sampling::All { temperature: t },
        (t, Some(k), None) => Sampling::TopK { k, temperature: t },
        (t, None, Some(p)) => Sampling::TopP { p, temperature: t },
        (t, Some(k), Some(p)) => Sampling::TopKThenTopP {
            k,
            p,
            temperature: t,
        },
    };
    let mut sampler = LogitsProcessor::from_sampling(cfg.seed, sampling);
    let eos = cfg.eos.or(base.config().eos_token_id);

    let mut cache = model.new_cache(1)?;
    let start = Instant::now();
    let out = model.forward_cached_last(&Batch::single(&prompt_ids, max, device)?, &mut cache)?;
    let mut logits = out.logits.i((0, 0))?;
    let prefill_seconds = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut all = prompt_ids.clone();
    let mut tokens = Vec::new();
    let mut routing = Vec::new();
    let mut text = String::new();
    let mut stream = tokenizer.decode_stream(true);
    for _ in 0..cfg.max_new_tokens {
        let l = if cfg.repeat_penalty == 1.0 {
            logits.clone()
        } else {
            let start = all.len().saturating_sub(cfg.repeat_last_n);
            candle_transformers::utils::apply_repeat_penalty(
                &logits,
                cfg.repeat_penalty,
                &all[start..],
            )?
        };
        let next = sampler.sample(&l.to_dtype(candle_core::DType::F32)?)?;
        if Some(next) == eos {
            break;
        }
        tokens.push(next);
        all.push(next);
        // Only the new token's text, once it forms whole characters.
        let piece = stream
            .step(next)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        if let Some(piece) = piece {
            on_text(&piece);
            text.push_str(&piece);
        }
        if cfg.stop.iter().any(|s| text.contains(s.as_str())) {
            break;
        }
        if tokens.len() == cfg.max_new_tokens {
            break;
        }
        let step = decode_batch(&[next], cache.next_positions(), max, device)?;
        let out = model.forward_cached(&step, &mut cache)?;
        routing.push(out.stats.iter().map(|s| (s.layer, s.kept == 1)).collect());
        logits = out.logits.i((0, 0))?;
    }
    Ok(Generation {
        tokens,
        text,
        prompt_tokens: prompt_ids.len(),
        prefill_seconds,
        decode_seconds: start.elapsed().as_secs_f64(),
        kv_bytes_per_layer: cache.layer_bytes(),
        routing,
    })
}
