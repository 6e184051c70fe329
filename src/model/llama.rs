//! The dense LLaMA decoder (Touvron et al. 2023).

use super::attention::attention_mask;
use super::batch::Batch;
use super::block::Block;
use super::lora::LoraConfig;
use super::ops::rms_norm;
use super::rope::RotaryEmbedding;
use crate::checkpoint::Checkpoint;
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

/// A LLaMA-family decoder: token embedding, `num_hidden_layers` [`Block`]s, final RMSNorm,
/// `lm_head` (tied to the embedding or not).
#[derive(Debug, Clone)]
pub struct Llama {
    embed: Embedding,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    /// `lm_head` as GGML blocks, once [`Llama::quantize`] has run.
    lm_head_quantized: Option<QMatMul>,
    rope: RotaryEmbedding,
    config: LlamaConfig,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Builds the model from a [`VarBuilder`] with HF names (`model.embed_tokens.weight`,
    /// `model.layers.{i}....`, `model.norm.weight`, `lm_head.weight` unless tied).
    ///
    /// Errors: [`Error::Config`] for an invalid config; [`Error::Candle`] when `vb` lacks a
    /// tensor or has one of another shape (a [`Checkpoint`] is validated with typed errors
    /// before it gets here, see [`Llama::from_checkpoint`]).
    pub fn load(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let embed_w = vb
            .pp("model.embed_tokens")
            .get((cfg.vocab_size, d), "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_w.clone()
        } else {
            vb.pp("lm_head").get((cfg.vocab_size, d), "weight")?
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(vb.pp(format!("model.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let device = vb.device().clone();
        Ok(Self {
            embed: Embedding::new(embed_w, d),
            layers,
            norm: vb.pp("model.norm").get(d, "weight")?,
            lm_head,
            lm_head_quantized: None,
            rope: RotaryEmbedding::new(
                cfg.head_dim(),
                cfg.max_position_embeddings,
                cfg.rope_theta,
                &device,
            )?,
            config: cfg.clone(),
            dtype: vb.dtype(),
            device,
        })
    }

    /// Builds the model from a loaded, validated [`Checkpoint`] (its dtype and device).
    ///
    /// Errors: [`Error::MissingTensor`] / [`Error::ShapeMismatch`] from
    /// [`Checkpoint::validate`].
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        ckpt.validate()?;
        let vb = VarBuilder::from_tensors(ckpt.tensors.clone(), ckpt.dtype(), &ckpt.device());
        Self::load(vb, &ckpt.config)
    }

    /// The decoder layers, in order.
    pub fn layers(&self) -> &[Block] {
        &self.layers
    }

    /// RoPE tables for the whole context.
    pub fn rope(&self) -> &RotaryEmbedding {
        &self.rope
    }

    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The dtype of the weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings: `ids` `(B, T)` u32 -> `(B, T, d)`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed.forward(ids)?)
    }

    /// Final RMSNorm and `lm_head`: `hidden` `(B, T, d)` -> logits `(B, T, vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = rms_norm(hidden, &self.norm, self.config.rms_norm_eps)?;
        if let Some(q) = &self.lm_head_quantized {
            if let Some(logits) = super::linear::blocks_product(q, &h)? {
                return Ok(logits);
            }
        }
        super::linear::linear(&h, &self.lm_head)
    }

    /// Quantized inference: every projection of every layer is held as GGML blocks of
    /// `dtype` (`Q4_1`, `Q8_0`, ...; quantized from the current weights, LoRA adapters
    /// merged in) and `lm_head` as Q8_0 blocks (llama.cpp's quantizer also keeps the output
    /// matrix at higher precision: SmolLM2's Q4_1 file stores it as Q8_0, and Q4_1 there
    /// costs 7% perplexity). Steps of at most 8 rows (decode) multiply by the blocks, as
    /// llama.cpp runs a GGUF file; more rows (prefill) keep the dense weights, which are
    /// faster there on a CPU. The embedding lookup, norms, attention and routers stay in
    /// the model's dtype. Products through the blocks have no gradient: quantize a model to
    /// run it, not to train it. The dense weights are kept, so memory does not shrink.
    ///
    /// Errors: [`Error::InvalidArgument`] for a model that is not on the CPU (the block
    /// kernels are CPU kernels); [`Error::Candle`] when the hidden or MLP width is not a
    /// multiple of the type's block size (32 for Q4_0 / Q4_1 / Q8_0; 256 for K-quants).
    pub fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        self.check_cpu()?;
        for layer in &mut self.layers {
            layer.quantize(dtype)?;
        }
        let head = self.lm_head.to_dtype(DType::F32)?;
        let head = QTensor::quantize(&head, GgmlDType::Q8_0)?;
        self.lm_head_quantized = Some(QMatMul::from_qtensor(head)?);
        Ok(())
    }

    /// Quantized inference with stored blocks: every projection and `lm_head` found in
    /// `blocks` (by HF name, `(out, in)`, e.g. [`crate::checkpoint::gguf::load_blocks`] of
    /// the GGUF file the model was loaded from; `model.embed_tokens.weight` stands for a
    /// tied `lm_head`) is multiplied by its blocks from now on, exactly the weights
    /// llama.cpp runs. Names not in `blocks` stay dense. Returns how many matrices use
    /// blocks.
    ///
    /// Errors: [`Error::ShapeMismatch`] for blocks of another shape than the weight;
    /// [`Error::InvalidArgument`] for a projection with a LoRA adapter, or a model that is
    /// not on the CPU.
    pub fn use_blocks(
        &mut self,
        blocks: &std::collections::HashMap<String, std::sync::Arc<QTensor>>,
    ) -> Result<usize> {
        self.check_cpu()?;
        let mut used = 0;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, proj) in layer.projections_mut() {
                let name = format!("model.layers.{i}.{name}.weight");
                if let Some(b) = blocks.get(&name) {
                    proj.use_blocks(&name, b.clone())?;
                    used += 1;
                }
            }
        }
        let head_name = match self.config.tie_word_embeddings {
            true => "model.embed_tokens.weight",
            false => "lm_head.weight",
        };
        if let Some(b) = blocks.get(head_name) {
            super::linear::check_block_shape(head_name, b, &self.lm_head)?;
            self.lm_head_quantized = Some(QMatMul::from_arc(b.clone())?);
            used += 1;
        }
        Ok(used)
    }

    fn check_cpu(&self) -> Result<()> {
        if self.device.is_cpu() {
            return Ok(());
        }
        Err(Error::InvalidArgument(
            "quantized inference runs on the CPU; load the model there".to_string(),
        ))
    }

    /// Checks that a batch fits the model's context and vocabulary (one scalar read-back).
    ///
    /// Errors: [`Error::SequenceTooLong`] when a row ends past the context; [`Error::InvalidArgument`] for a token id
    /// outside the vocabulary.
    pub fn check_batch(&self, batch: &Batch) -> Result<()> {
        let max = self.config.max_position_embeddings;
        let end = batch.ends().into_iter().max().unwrap_or(0);
        if end > max {
            return Err(Error::SequenceTooLong { len: end, max });
        }
        let largest = batch.ids().flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if largest as usize >= self.config.vocab_size {
            return Err(Error::InvalidArgument(format!(
                "token id {largest} is outside the vocabulary of {} tokens",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Attaches a LoRA adapter to every projection of every layer, read or created from
    /// `vb` (`model.layers.{i}.self_attn.q_proj.lora_a`, ...; a `VarMap`-backed `vb` makes
    /// them trainable). The embedding, norms and `lm_head` get none.
    ///
    /// Errors: [`Error::InvalidArgument`] from [`LoraConfig::validate`];
    /// [`Error::Candle`] when a stored adapter tensor is misshapen.
    pub fn attach_lora(&mut self, vb: VarBuilder, cfg: &LoraConfig) -> Result<()> {
        cfg.validate(self.config.hidden_size)?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.attach_lora(vb.pp(format!("model.layers.{i}")), cfg)?;
        }
        Ok(())
    }

    /// The projection weights with their adapters merged in, by HF name
    /// (`model.layers.{i}.self_attn.q_proj.weight`, ...), only for projections that carry an
    /// adapter. Each is `(out, in)` in the model dtype.
    ///
    /// Errors: [`Error::Candle`] on a tensor failure.
    pub fn merged_lora_weights(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        let mut out = std::collections::HashMap::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, proj) in layer.projections() {
                if proj.adapter.is_some() {
                    out.insert(
                        format!("model.layers.{i}.{name}.weight"),
                        proj.merged_weight()?,
                    );
                }
            }
        }
        Ok(out)
    }

    /// Dense forward pass: logits for every position, `(B, T, vocab)`.
    ///
    /// Padding keys are masked, so each row gets the logits it would get alone; logits at
    /// padding positions are meaningless.
    ///
    /// Errors: [`Error::SequenceTooLong`] when T exceeds the context;
    /// [`Error::InvalidArgument`] for a token id outside the vocabulary.
    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        self.logits(&self.forward_hidden(batch)?)
    }

    /// As [`forward`](Self::forward), stopping before the final norm and `lm_head`: the
    /// final residual stream `(B, T, d)`.
    ///
    /// Errors: as [`forward`](Self::forward).
    pub fn forward_hidden(&self, batch: &Batch) -> Result<Tensor> {
        self.check_batch(batch)?;
        let mut x = self.embed(batch.ids())?;
        let rope = self.rope.at(batch.positions(), self.dtype)?;
        let mask = attention_mask(
            batch.positions(),
            batch.positions(),
            batch.valid(),
            self.dtype,
        )?;
        for layer in &self.layers {
            x = (&x + layer.delta(&x, &rope, &mask)?)?;
        }
        Ok(x)
    }
}
