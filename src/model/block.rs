//! One pre-norm LLaMA decoder layer.

use super::attention::{Attention, Visible};
use super::linear::Projection;
use super::lora::LoraConfig;
use super::mlp::Mlp;
use super::ops::rms_norm;
use super::rope::RopeAt;
use crate::error::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// `h = x + Attn(norm₁(x))`, `out = h + Mlp(norm₂(h))`.
///
/// The layer is exposed through its *delta* `out - x = a + m` so that a routed layer can
/// scale it by the gate and add it to the residual stream exactly once.
#[derive(Debug, Clone)]
pub struct Block {
    attn: Attention,
    mlp: Mlp,
    input_norm: Tensor,
    post_attn_norm: Tensor,
    eps: f64,
}

impl Block {
    /// Loads layer `vb` (`model.layers.{i}`) of a model with the given sizes.
    pub fn load(vb: VarBuilder, cfg: &crate::config::LlamaConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            attn: Attention::load(
                vb.pp("self_attn"),
                d,
                cfg.num_attention_heads,
                cfg.num_kv_heads(),
            )?,
            mlp: Mlp::load(vb.pp("mlp"), d, cfg.intermediate_size)?,
            input_norm: vb.pp("input_layernorm").get(d, "weight")?,
            post_attn_norm: vb.pp("post_attention_layernorm").get(d, "weight")?,
            eps: cfg.rms_norm_eps,
        })
    }

    /// Self-attention (a routed layer computes keys and values of tokens it does not
    /// compute as queries).
    pub fn attention(&self) -> &Attention {
        &self.attn
    }

    /// Every projection of the layer with its HF name relative to the layer
    /// (`self_attn.q_proj`, ..., `mlp.down_proj`).
    pub fn projections(&self) -> Vec<(String, &Projection)> {
        let attn = self.attn.projections().into_iter();
        let mlp = self.mlp.projections().into_iter();
        attn.map(|(n, p)| (format!("self_attn.{n}"), p))
            .chain(mlp.map(|(n, p)| (format!("mlp.{n}"), p)))
            .collect()
    }

    /// Attaches a LoRA adapter to every projection, read or created from `vb`
    /// (`model.layers.{i}`: `self_attn.q_proj.lora_a`, ...).
    ///
    /// Errors: [`crate::Error::Candle`] when a stored adapter tensor is misshapen.
    pub fn attach_lora(&mut self, vb: VarBuilder, cfg: &LoraConfig) -> Result<()> {
        for (name, proj) in self.projections_mut() {
            proj.attach_lora(vb.pp(name), cfg)?;
        }
        Ok(())
    }

    /// Holds every projection as GGML blocks of `dtype` for inference
    /// ([`Projection::quantize`]).
    ///
    /// Errors: as [`Projection::quantize`].
    pub fn quantize(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<()> {
        for (_, proj) in self.projections_mut() {
            proj.quantize(dtype)?;
        }
        Ok(())
    }

    /// Every projection by its name within the layer (`self_attn.q_proj`, ...), mutable.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Projection)> {
        let attn = self.attn.projections_mut().into_iter();
        let mlp = self.mlp.projections_mut().into_iter();
        attn.map(|(n, p)| (format!("self_attn.{n}"), p))
            .chain(mlp.map(|(n, p)| (format!("mlp.{n}"), p)))
            .collect()
    }

    /// `norm₁(x)`: the normalised input attention projects from. `(B, T, d)`.
    pub fn normed_input(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.input_norm, self.eps)
    }

    /// The layer's change to the residual stream for a token set attending to itself.
    ///
    /// `x`: `(B, T, d)`; `rope`: at the set's original positions; `mask`: `(B, 1, T, T)`.
    /// Returns `Block(x) - x`, `(B, T, d)`.
    pub fn delta(&self, x: &Tensor, rope: &RopeAt, mask: &Tensor) -> Result<Tensor> {
        let normed = self.normed_input(x)?;
        let (k, v) = self.attn.key_values(&normed, rope)?;
        self.delta_with_kv(x, &normed, rope, &k, &v, Visible::Mask(mask))
    }

    /// As [`delta`](Self::delta), for queries `x` (`(B, Tq, d)`, normalised: `normed`) over
    /// given keys/values `(B, n_kv, Tk, hd)`, each query seeing the keys `visible` names
    /// (see [`Attention::attend`]): the form a KV cache or the `Keep` policy (skipped
    /// tokens still write K/V) needs.
    pub fn delta_with_kv(
        &self,
        x: &Tensor,
        normed: &Tensor,
        rope: &RopeAt,
        k: &Tensor,
        v: &Tensor,
        visible: Visible,
    ) -> Result<Tensor> {
        let a = self.attn.attend(normed, rope, k, v, visible)?;
        let h = (x + &a)?;
        let m = self
            .mlp
            .forward(&rms_norm(&h, &self.post_attn_norm, self.eps)?)?;
        Ok((a + m)?)
    }
}
