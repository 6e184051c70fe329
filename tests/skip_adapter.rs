//! Skip adapters: a token skipped at a routed layer gets `x + U · silu(D · RMSNorm(x))`.
//! Expected values are computed on the host from the stored tensors.

mod common;
#[path = "common/tiny.rs"]
mod tiny;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{VarBuilder, VarMap};
use modification::mixture_of_depths::{GateScaling, KvPolicy};
use modification::train::{TrainConfig, Trainer};
use modification::{loss, Batch, Error, ModConfig, ModModel, Mode};
use std::collections::HashMap;

const RANK: usize = 3;

/// Routed layer 1 of the 2-layer tiny model, no sinks, with an adapter of rank 3.
fn config(kv: KvPolicy) -> ModConfig {
    ModConfig {
        sink_tokens: 0,
        kv_policy: kv,
        skip_adapter_rank: RANK,
        ..ModConfig::default()
    }
}

/// Router tensors of layer 1 (`bias` decides: -50 skips every token) and random adapter
/// tensors.
fn tensors(w_scale: f32, bias: f32) -> HashMap<String, Tensor> {
    let mut m = tiny::router_tensors(&[1], w_scale, bias);
    let (down, up) = (
        tiny::values(RANK * 64, 5, 0.3),
        tiny::values(64 * RANK, 6, 0.3),
    );
    m.insert(
        "model.layers.1.skip_adapter.down.weight".into(),
        Tensor::from_vec(down, (RANK, 64), &Device::Cpu).unwrap(),
    );
    m.insert(
        "model.layers.1.skip_adapter.up.weight".into(),
        Tensor::from_vec(up, (64, RANK), &Device::Cpu).unwrap(),
    );
    m
}

fn model(cfg: ModConfig, tensors: HashMap<String, Tensor>) -> ModModel {
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    ModModel::new(tiny::llama(2), cfg, vb).unwrap()
}

/// `x + U · silu(D · RMSNorm(x))` per token, in f64 on the host: `x` `(T, d)`.
fn adapted_by_hand(x: &[Vec<f32>], norm: &[f32], down: &[Vec<f32>], up: &[Vec<f32>]) -> Vec<f32> {
    let mut out = Vec::new();
    for row in x {
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / row.len() as f64;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        let n: Vec<f64> = (row.iter().zip(norm))
            .map(|(&v, &w)| v as f64 * inv * w as f64)
            .collect();
        let h: Vec<f64> = (down.iter())
            .map(|d| {
                let z: f64 = d.iter().zip(&n).map(|(&a, b)| a as f64 * b).sum();
                z / (1.0 + (-z).exp())
            })
            .collect();
        for (i, &v) in row.iter().enumerate() {
            let a: f64 = up[i].iter().zip(&h).map(|(&u, hv)| u as f64 * hv).sum();
            out.push((v as f64 + a) as f32);
        }
    }
    out
}

#[test]
fn a_skipped_token_gets_the_adapters_update_and_a_kept_token_does_not() {
    let batch = Batch::single(&tiny::ids(11, 3), 64, &Device::Cpu).unwrap();
    for kv in [KvPolicy::Skip, KvPolicy::Keep] {
        // Every gate closed: layer 1 computes nothing, so its input is the output.
        let without = ModConfig {
            skip_adapter_rank: 0,
            ..config(kv)
        };
        let x = model(without, tiny::router_tensors(&[1], 0.0, -50.0))
            .forward_hidden(&batch, Mode::Inference)
            .unwrap()
            .hidden;
        let m = model(config(kv), tensors(0.0, -50.0));
        let (down, up) = m.skip_adapters()[&1].tensors();
        let norm = tiny::weights(&tiny::config(2))["model.layers.1.input_layernorm.weight"]
            .to_vec1::<f32>()
            .unwrap();
        let want = adapted_by_hand(
            &x.i(0).unwrap().to_vec2().unwrap(),
            &norm,
            &down.to_vec2().unwrap(),
            &up.to_vec2().unwrap(),
        );
        for mode in [Mode::Inference, Mode::Training] {
            let out = m.forward_hidden(&batch, mode).unwrap();
            assert_eq!(out.stats[0].kept, 0);
            let got = out.hidden.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let diff = (got.iter().zip(&want))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "{kv:?} {mode:?}: {diff}");
        }
        // Every gate open: the adapter is not used, the model is the dense one.
        let open = model(config(kv), tensors(0.0, 50.0));
        let dense = open.base().forward(&batch).unwrap();
        let logits = open.forward(&batch, Mode::Inference).unwrap().logits;
        assert!(common::max_diff(&logits, &dense) < 1e-5);
    }
}

#[test]
fn a_fresh_adapter_is_the_identity() {
    // New tensors from a VarMap: U starts at zero, so skipping is the paper's identity.
    let batch = Batch::single(&tiny::ids(9, 4), 64, &Device::Cpu).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = ModConfig {
        gate_init_bias: 3.0,
        ..config(KvPolicy::Keep)
    };
    let fresh = ModModel::new(tiny::llama(2), cfg.clone(), vb).unwrap();
    assert_eq!(fresh.skip_adapters()[&1].rank(), RANK);
    // Close the gates of both models the same way (a threshold above sigmoid(3)).
    let closed = |m: &ModModel| m.with_router(threshold(0.99)).unwrap();
    let plain = model(
        ModConfig {
            skip_adapter_rank: 0,
            ..cfg
        },
        tiny::router_tensors(&[1], 0.0, 3.0),
    );
    let a = closed(&fresh).forward(&batch, Mode::Inference).unwrap();
    let b = closed(&plain).forward(&batch, Mode::Inference).unwrap();
    assert_eq!(a.stats[0].kept, 0);
    // Within rounding: trainable (Var) weights take candle's composed ops.
    let diff = common::max_diff(&a.logits, &b.logits);
    assert!(diff < 1e-5, "{diff}");
}

fn threshold(p: f64) -> modification::mixture_of_depths::RouterKind {
    modification::mixture_of_depths::RouterKind::ThresholdP {
        p,
        per_layer: Default::default(),
    }
}

#[test]
fn prefill_and_decode_through_the_cache_equal_the_full_forward() {
    let tokens = tiny::ids(12, 8);
    for kv in [KvPolicy::Skip, KvPolicy::Keep] {
        // Random router weights: some tokens kept, some skipped.
        let m = model(config(kv), tensors(3.0, 0.0));
        let full = Batch::single(&tokens, 64, &Device::Cpu).unwrap();
        let want = m.forward_causal(&full, Mode::Inference).unwrap();
        let kept = want.stats[0].kept;
        assert!(kept > 0 && kept < 12, "{kv:?}: kept {kept} of 12");
        let got = tiny::logits_in_chunks(&m, &tokens, &[(0, 5), (5, 6), (6, 7), (7, 12)]);
        let d = common::max_diff(&got, &want.logits.i(0).unwrap());
        assert!(d < 1e-4, "{kv:?}: {d}");
    }
}

#[test]
fn the_adapter_and_the_gate_train_and_the_flops_count_the_adapter() {
    let batch = Batch::single(&tiny::ids(16, 9), 64, &Device::Cpu).unwrap();
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, t) in tensors(3.0, 0.0) {
            data.insert(name, candle_core::Var::from_tensor(&t).unwrap());
        }
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let m = ModModel::new(tiny::llama(2), config(KvPolicy::Keep), vb).unwrap();
    let out = m.forward(&batch, Mode::Training).unwrap();
    let kept = out.stats[0].kept;
    assert!(kept > 0 && kept < 16, "kept {kept}");
    let lm = loss::lm_loss(&out.logits, batch.ids(), batch.valid()).unwrap();
    let grads = lm.backward().unwrap();
    for name in [
        "model.layers.1.skip_adapter.down.weight",
        "model.layers.1.skip_adapter.up.weight",
        "model.layers.1.router.weight",
    ] {
        let var = varmap.data().lock().unwrap()[name].clone();
        let g = grads.get(var.as_tensor()).expect(name);
        let norm = common::l2_norm(g);
        assert!(norm > 1e-6 && norm.is_finite(), "{name}: {norm}");
    }
    // The inference path (the skipped tokens gathered) gives the training forward value
    // (every token computed, weighted by 1 − w).
    let inference = m.forward(&batch, Mode::Inference).unwrap();
    assert_eq!(inference.stats[0].kept, kept);
    let diff = common::max_diff(&inference.logits, &out.logits);
    assert!(diff < 1e-4, "inference vs training forward: {diff}");
    // The same decisions without the adapter cost exactly 4·d·r FLOPs per skipped token
    // less.
    let plain = model(
        ModConfig {
            skip_adapter_rank: 0,
            ..config(KvPolicy::Keep)
        },
        tensors(3.0, 0.0),
    );
    for mode in [Mode::Inference, Mode::Training] {
        let with = m.forward(&batch, mode).unwrap();
        let without = plain.forward(&batch, mode).unwrap();
        assert_eq!(with.stats[0].kept, without.stats[0].kept);
        let extra = with.flops - without.flops;
        assert_eq!(extra, (4 * 64 * RANK * (16 - kept)) as f64, "{mode:?}");
        assert_eq!(with.dense_flops, without.dense_flops);
    }
    // Multiply scaling adds (1 − g)·A to kept tokens too; the inference forward equals
    // the training forward value.
    let mult = ModConfig {
        gate_scaling: GateScaling::Multiply,
        ..config(KvPolicy::Keep)
    };
    let mm = model(mult, tensors(3.0, 0.0));
    let a = mm.forward(&batch, Mode::Inference).unwrap().logits;
    let b = mm.forward(&batch, Mode::Training).unwrap().logits;
    assert!(common::max_diff(&a, &b) < 1e-4);
    let logits_differ =
        common::max_diff(&a, &plain.forward(&batch, Mode::Inference).unwrap().logits);
    assert!(logits_differ > 1e-3, "{logits_differ}");
}

#[test]
fn bad_adapter_settings_and_tensors_are_typed_errors() {
    // A rank above the hidden size.
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    let cfg = ModConfig {
        skip_adapter_rank: 65,
        ..config(KvPolicy::Keep)
    };
    let err = ModModel::new(tiny::llama(2), cfg, vb).unwrap_err();
    assert!(
        matches!(err, Error::Config { ref reason, .. } if reason.contains("65")),
        "{err}"
    );
    // A converted checkpoint without its adapter's up projection.
    let ckpt = common::smollm2();
    let mut converted = ckpt.clone();
    let cfg = ModConfig {
        skip_adapter_rank: 2,
        ..ModConfig::default()
    };
    let d = ckpt.config.hidden_size;
    for j in cfg
        .routed_layer_indices(ckpt.config.num_hidden_layers)
        .unwrap()
    {
        let zeros = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        converted
            .tensors
            .insert(format!("model.layers.{j}.router.weight"), zeros((1, d)));
        converted.tensors.insert(
            format!("model.layers.{j}.router.bias"),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        converted.tensors.insert(
            format!("model.layers.{j}.skip_adapter.down.weight"),
            zeros((2, d)),
        );
        if j != 5 {
            converted.tensors.insert(
                format!("model.layers.{j}.skip_adapter.up.weight"),
                zeros((d, 2)),
            );
        }
    }
    converted.extra_config.insert(
        modification::checkpoint::export::MOD_SECTION.to_string(),
        serde_json::to_value(&cfg).unwrap(),
    );
    let err = ModModel::from_checkpoint(&converted).unwrap_err();
    assert!(
        matches!(err, Error::MissingTensor { ref name } if name == "model.layers.5.skip_adapter.up.weight"),
        "{err}"
    );
}

#[test]
fn a_trained_adapter_is_saved_and_loads_back_with_identical_logits() {
    let ckpt = common::smollm2();
    // Gates start exactly at p (sigmoid(0) = 0.5, kept); the load term then pushes them
    // under it, so tokens are skipped and the adapters receive gradients.
    let cfg = ModConfig {
        alpha: 0.5,
        gate_init_bias: 0.0,
        skip_adapter_rank: 4,
        ..ModConfig::default()
    };
    let run = TrainConfig {
        steps: 3,
        batch_size: 2,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(ckpt, cfg, run).unwrap();
    trainer
        .run(common::small_corpus(), None, 0, |_| {})
        .unwrap();
    // Routers and adapters of the 15 odd layers, nothing else.
    let trained = trainer.trained_tensors();
    assert_eq!(trained.len(), 15 * 4);
    let up = &trained["model.layers.7.skip_adapter.up.weight"];
    assert_eq!(up.dims(), [576, 4]);
    assert!(common::l2_norm(up) > 0.0, "the adapter did not train");

    let dir = common::temp_dir("skip-adapter").join("converted");
    trainer
        .save_converted(&dir, trainer.model().config())
        .unwrap();
    let loaded = ModModel::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), trainer.model().config());
    assert_eq!(loaded.skip_adapters().len(), 15);
    let rows = &common::small_corpus().sources[1].heldout;
    let batch = Batch::from_rows(rows, 0, 8192, &Device::Cpu).unwrap();
    let a = trainer.model().forward(&batch, Mode::Inference).unwrap();
    let b = loaded.forward(&batch, Mode::Inference).unwrap();
    let skipped: usize = a.stats.iter().map(|s| s.valid - s.kept).sum();
    assert!(
        skipped > 0,
        "no token was skipped: the adapters are not exercised"
    );
    // The reloaded tensors are bit-identical, but the trainer's are variables, whose
    // buffers may sit at other alignments and take other matmul kernels: compare relative
    // to the logits' scale (as the LoRA merge check does), and the decisions exactly.
    let scale = (a.logits.abs().unwrap().max_keepdim(2).unwrap())
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let rel = common::max_diff(&a.logits, &b.logits) / scale;
    assert!(rel < 1e-4, "reloaded vs trained relative difference {rel}");
    let kept = |o: &modification::ModOutput| o.stats.iter().map(|s| s.kept).collect::<Vec<_>>();
    assert_eq!(kept(&a), kept(&b));
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}
