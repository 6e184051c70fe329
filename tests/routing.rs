//! Mixture-of-Depths routing: behaviours that broke in public MoD implementations.
//! Expected values are computed independently from the dense model's public pieces.

mod common;
#[path = "common/tiny.rs"]
mod tiny;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use modification::mixture_of_depths::{GateScaling, KvPolicy, RouterKind};
use modification::model::{attention_mask, RopeAt};
use modification::routing::{selection, Selection};
use modification::{loss, Batch, Llama, ModConfig, ModModel, Mode};
use std::collections::BTreeMap;

fn threshold(p: f64) -> RouterKind {
    RouterKind::ThresholdP {
        p,
        per_layer: BTreeMap::new(),
    }
}

fn odd_config() -> ModConfig {
    ModConfig {
        sink_tokens: 0,
        ..ModConfig::default()
    }
}

#[test]
fn all_gates_open_equals_dense() {
    let base = tiny::llama(3);
    let batch = Batch::single(&tiny::ids(20, 1), 64, &Device::Cpu).unwrap();
    let dense = base.forward(&batch).unwrap();
    for scaling in [GateScaling::StraightThrough, GateScaling::Multiply] {
        for kv in [KvPolicy::Skip, KvPolicy::Keep] {
            let cfg = ModConfig {
                gate_scaling: scaling,
                kv_policy: kv,
                ..tiny::config_all_layers()
            };
            // bias 50: sigmoid is exactly 1.0 in f32, so Multiply's g is forced to 1.
            let m = tiny::mod_model(base.clone(), cfg, 0.0, 50.0);
            for mode in [Mode::Inference, Mode::Training] {
                let out = m.forward(&batch, mode).unwrap();
                // Within rounding: without trained weights the routed model runs the fused
                // attention kernel, the dense reference candle's composed ops.
                let diff = common::max_diff(&out.logits, &dense);
                assert!(diff <= 1e-5, "{scaling:?} {kv:?} {mode:?}: {diff}");
                assert!(out.stats.iter().all(|s| s.kept == 20 && s.valid == 20));
            }
        }
    }
}

#[test]
fn all_gates_closed_makes_every_routed_layer_the_identity() {
    let base = tiny::llama(3);
    let batch = Batch::single(&tiny::ids(12, 2), 64, &Device::Cpu).unwrap();
    let identity = base.logits(&base.embed(batch.ids()).unwrap()).unwrap();
    for kv in [KvPolicy::Skip, KvPolicy::Keep] {
        let cfg = ModConfig {
            kv_policy: kv,
            sink_tokens: 0,
            ..tiny::config_all_layers()
        };
        let m = tiny::mod_model(base.clone(), cfg, 0.0, -50.0);
        for mode in [Mode::Inference, Mode::Training] {
            let out = m.forward(&batch, mode).unwrap();
            assert_eq!(
                common::max_diff(&out.logits, &identity),
                0.0,
                "{kv:?} {mode:?}"
            );
            assert!(out
                .stats
                .iter()
                .all(|s| s.kept == 0 && s.kept_fraction() == 0.0));
        }
        // A closed layer computes its router (2·d per token) and, under Keep, the keys
        // and values every token still writes (4·d·d_kv per token); nothing else. The
        // same in training, which counts what inference spends.
        let (d, d_kv, t) = (64.0, 2.0 * 16.0, 12.0);
        let want = match kv {
            KvPolicy::Skip => 2.0 * d * t,
            KvPolicy::Keep => 2.0 * d * t + 4.0 * d * d_kv * t,
        };
        for mode in [Mode::Inference, Mode::Training] {
            let out = m.forward(&batch, mode).unwrap();
            assert!(out.stats.iter().all(|s| s.flops == want), "{kv:?} {mode:?}");
        }
    }
}

#[test]
fn threshold_p_keeps_the_routers_choices_in_ascending_order() {
    let gates = [0.1, 0.9, 0.3, 0.7, 0.5, 0.49];
    let sel = selection::threshold_p(&gates, &[6], 6, 0.5, &[0]).unwrap();
    assert_eq!(sel.kept(), vec![vec![1, 3, 4]]);
    // A sink is kept whatever its gate says.
    let sel = selection::threshold_p(&gates, &[6], 6, 0.5, &[1]).unwrap();
    assert_eq!(sel.kept(), vec![vec![0, 1, 3, 4]]);
    // Padding (positions >= length) is never kept.
    let sel = selection::threshold_p(&[0.9; 10], &[3, 5], 5, 0.5, &[0, 0]).unwrap();
    assert_eq!(sel.kept(), vec![vec![0, 1, 2], vec![0, 1, 2, 3, 4]]);
    for bad in [0.0, 1.0, -0.1, f64::NAN] {
        assert!(selection::threshold_p(&gates, &[6], 6, bad, &[0]).is_err());
    }
}

#[test]
fn top_k_keeps_largest_logits_not_first_positions() {
    // k = ceil(0.5 · 4) = 2: the two largest logits, at positions 2 and 3.
    let sel = selection::top_k(&[0.0, 0.0, 9.0, 8.0], &[4], 4, 0.5, &[0]).unwrap();
    assert_eq!(sel.kept(), vec![vec![2, 3]]);
    // Ties go to the lower position.
    let sel = selection::top_k(&[1.0, 2.0, 2.0, 2.0], &[4], 4, 0.5, &[0]).unwrap();
    assert_eq!(sel.kept(), vec![vec![1, 2]]);
    // k counts valid tokens only; padding (huge logits) is never kept; ascending output.
    let sel = selection::top_k(&[3.0, 1.0, 2.0, 99.0, 99.0], &[3], 5, 0.6, &[0]).unwrap();
    assert_eq!(sel.kept(), vec![vec![0, 2]]);
    // A sink takes one of the k slots.
    let sel = selection::top_k(&[-5.0, 1.0, 3.0, 2.0], &[4], 4, 0.5, &[1]).unwrap();
    assert_eq!(sel.kept(), vec![vec![0, 2]]);
    for bad in [0.0, 1.01, f64::NAN] {
        assert!(selection::top_k(&[1.0], &[1], 1, bad, &[0]).is_err());
    }
}

/// RoPE at the batch's positions and its dense causal mask: the dense layer's inputs.
fn dense_rope_and_mask(base: &Llama, batch: &Batch) -> (RopeAt, Tensor) {
    let rope = base.rope().at(batch.positions(), DType::F32).unwrap();
    let mask = attention_mask(
        batch.positions(),
        batch.positions(),
        batch.valid(),
        DType::F32,
    )
    .unwrap();
    (rope, mask)
}

/// A 2-layer model with layer 1 routed; returns (model, batch, h0 = output of layer 0).
fn partially_routed(kv: KvPolicy, scaling: GateScaling) -> (ModModel, Batch, Tensor) {
    let base = tiny::llama(2);
    let batch = Batch::single(&tiny::ids(16, 3), 64, &Device::Cpu).unwrap();
    let (rope, mask) = dense_rope_and_mask(&base, &batch);
    let x = base.embed(batch.ids()).unwrap();
    let h0 = (&x + base.layers()[0].delta(&x, &rope, &mask).unwrap()).unwrap();
    let cfg = ModConfig {
        kv_policy: kv,
        gate_scaling: scaling,
        router: threshold(0.5),
        ..odd_config()
    };
    (tiny::mod_model(base, cfg, 3.0, 0.0), batch, h0)
}

/// The tokens the router of layer 1 keeps, computed by hand from h0 and its tensors.
fn expected_kept(m: &ModModel, h0: &Tensor) -> (Vec<usize>, Vec<f32>) {
    let (w, b) = m.routers()[&1].tensors();
    let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let b: f32 = b.to_vec1::<f32>().unwrap()[0];
    let rows: Vec<Vec<f32>> = h0.i(0).unwrap().to_vec2().unwrap();
    let gates: Vec<f32> = rows
        .iter()
        .map(|r| 1.0 / (1.0 + (-(r.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>() + b)).exp()))
        .collect();
    let kept = (0..gates.len()).filter(|&i| gates[i] >= 0.5).collect();
    (kept, gates)
}

#[test]
fn routed_layer_equals_dense_layer_without_skipped_tokens_at_original_positions() {
    for scaling in [GateScaling::StraightThrough, GateScaling::Multiply] {
        let (m, batch, h0) = partially_routed(KvPolicy::Skip, scaling);
        let (kept, gates) = expected_kept(&m, &h0);
        assert!(
            kept.len() > 2 && kept.len() < 14,
            "want a partial selection, got {kept:?}"
        );
        assert_ne!(
            kept,
            (0..kept.len()).collect::<Vec<_>>(),
            "kept must not be a prefix"
        );
        // Dense layer 1 over the full sequence (RoPE at the original positions) with the
        // skipped tokens removed from the keys; queries of skipped tokens are discarded.
        let base = m.base();
        let t = 16;
        let mut allowed = vec![-1e9f32; t * t];
        for i in 0..t {
            for &j in kept.iter().filter(|&&j| j <= i) {
                allowed[i * t + j] = 0.0;
            }
        }
        let mask = Tensor::from_vec(allowed, (1, 1, t, t), &Device::Cpu).unwrap();
        let rope = base.rope().at(batch.positions(), DType::F32).unwrap();
        let delta = base.layers()[1].delta(&h0, &rope, &mask).unwrap();
        let mut rows = Vec::new();
        for (i, &gate) in gates.iter().enumerate().take(t) {
            let h = h0.i((0, i)).unwrap();
            rows.push(if kept.contains(&i) {
                let s = if scaling == GateScaling::Multiply {
                    gate as f64
                } else {
                    1.0
                };
                // The residual is added exactly once: h + s · delta.
                (&h + (delta.i((0, i)).unwrap() * s).unwrap()).unwrap()
            } else {
                h
            });
        }
        let expected = base
            .logits(&Tensor::stack(&rows, 0).unwrap().unsqueeze(0).unwrap())
            .unwrap();
        let out = m.forward(&batch, Mode::Inference).unwrap();
        assert!(
            common::max_diff(&out.logits, &expected) < 1e-4,
            "{scaling:?}: {}",
            common::max_diff(&out.logits, &expected)
        );
        assert_eq!(out.stats[0].kept, kept.len());
        // Training mode has the same forward value.
        let train = m.forward(&batch, Mode::Training).unwrap();
        assert!(common::max_diff(&train.logits, &out.logits) < 1e-4);
    }
}

#[test]
fn keep_policy_skipped_tokens_still_serve_dense_keys_and_values() {
    let (m, batch, h0) = partially_routed(KvPolicy::Keep, GateScaling::StraightThrough);
    let (kept, _) = expected_kept(&m, &h0);
    assert!(kept.len() > 2 && kept.len() < 14);
    // Under Keep a kept token sees every earlier token's K/V, computed from the unchanged
    // hidden state exactly as the dense layer does: its update equals the dense layer's.
    let base = m.base();
    let (rope, mask) = dense_rope_and_mask(base, &batch);
    let dense_delta = base.layers()[1].delta(&h0, &rope, &mask).unwrap();
    let rows: Vec<Tensor> = (0..16)
        .map(|i| {
            let h = h0.i((0, i)).unwrap();
            if kept.contains(&i) {
                (&h + dense_delta.i((0, i)).unwrap()).unwrap()
            } else {
                h
            }
        })
        .collect();
    let expected = base
        .logits(&Tensor::stack(&rows, 0).unwrap().unsqueeze(0).unwrap())
        .unwrap();
    for mode in [Mode::Inference, Mode::Training] {
        let out = m.forward(&batch, mode).unwrap();
        assert!(common::max_diff(&out.logits, &expected) < 1e-4, "{mode:?}");
    }
}

#[test]
fn single_token_and_zero_kept_tokens_work() {
    let base = tiny::llama(2);
    let batch = Batch::single(&[7], 64, &Device::Cpu).unwrap();
    let dense = base.forward(&batch).unwrap();
    let identity = base.logits(&base.embed(batch.ids()).unwrap()).unwrap();
    let closed = tiny::mod_model(base.clone(), tiny::config_all_layers_no_sink(), 0.0, -50.0);
    let open = tiny::mod_model(base, tiny::config_all_layers_no_sink(), 0.0, 50.0);
    for mode in [Mode::Inference, Mode::Training] {
        let out = closed.forward(&batch, mode).unwrap();
        assert_eq!(out.logits.dims(), &[1, 1, 101]);
        assert_eq!(common::max_diff(&out.logits, &identity), 0.0);
        assert_eq!(
            common::max_diff(&open.forward(&batch, mode).unwrap().logits, &dense),
            0.0
        );
    }
}

#[test]
fn sink_tokens_are_kept_whatever_the_gate_says() {
    let base = tiny::llama(3);
    let rows = vec![tiny::ids(9, 4), tiny::ids(5, 5)];
    let batch = Batch::from_rows(&rows, 0, 64, &Device::Cpu).unwrap();
    let cfg = ModConfig {
        sink_tokens: 1,
        ..tiny::config_all_layers()
    };
    let m = tiny::mod_model(base.clone(), cfg, 0.0, -50.0);
    let out = m.forward(&batch, Mode::Inference).unwrap();
    for s in &out.stats {
        assert_eq!((s.kept, s.valid), (2, 14), "layer {}", s.layer);
        let mask: Vec<Vec<f32>> = s.kept_mask.to_vec2().unwrap();
        assert_eq!(mask[0][0], 1.0);
        assert_eq!(mask[1][0], 1.0);
    }
    // The first token computed every layer alone, as in the dense model.
    let dense = base.forward(&batch).unwrap();
    assert!(common::max_diff(&out.logits.i((.., 0)).unwrap(), &dense.i((.., 0)).unwrap()) < 1e-5);
}

#[test]
fn padded_batch_gives_each_row_what_it_gets_alone() {
    let base = tiny::llama(3);
    let rows = vec![tiny::ids(13, 6), tiny::ids(4, 7), tiny::ids(9, 8)];
    let routers = [threshold(0.5), RouterKind::TopK { capacity: 0.5 }];
    for router in routers {
        for kv in [KvPolicy::Skip, KvPolicy::Keep] {
            let cfg = ModConfig {
                router: router.clone(),
                kv_policy: kv,
                sink_tokens: 1,
                ..tiny::config_all_layers()
            };
            let m = tiny::mod_model(base.clone(), cfg, 3.0, 0.0);
            let batch = Batch::from_rows(&rows, 0, 64, &Device::Cpu).unwrap();
            let out = m.forward(&batch, Mode::Inference).unwrap();
            let mut kept_alone = vec![0usize; out.stats.len()];
            let mut gate_sum_alone = vec![0f64; out.stats.len()];
            for (r, row) in rows.iter().enumerate() {
                let alone = m
                    .forward(
                        &Batch::single(row, 64, &Device::Cpu).unwrap(),
                        Mode::Inference,
                    )
                    .unwrap();
                let got = out.logits.i((r, ..row.len())).unwrap();
                let want = alone.logits.i(0).unwrap();
                assert!(
                    common::max_diff(&got, &want) < 1e-4,
                    "{router:?} {kv:?} row {r}"
                );
                for (l, s) in alone.stats.iter().enumerate() {
                    kept_alone[l] += s.kept;
                    gate_sum_alone[l] +=
                        s.mean_gate.to_scalar::<f32>().unwrap() as f64 * row.len() as f64;
                }
            }
            for (l, s) in out.stats.iter().enumerate() {
                // Padding never enters F_j or G_j.
                assert_eq!(s.valid, 26);
                assert_eq!(s.kept, kept_alone[l], "{router:?} layer {l}");
                let g = s.mean_gate.to_scalar::<f32>().unwrap() as f64;
                assert!((g - gate_sum_alone[l] / 26.0).abs() < 1e-5);
            }
            // The LM loss ignores padding: the batch loss equals the token-weighted mean.
            let (sum, count) =
                loss::next_token_nll(&out.logits, batch.ids(), batch.valid()).unwrap();
            assert_eq!(count, 12 + 3 + 8);
            assert!(sum.to_scalar::<f32>().unwrap().is_finite());
        }
    }
}

#[test]
fn training_mode_gives_skipped_tokens_gates_an_lm_gradient() {
    let base = tiny::llama(2);
    let batch = Batch::single(&tiny::ids(16, 9), 64, &Device::Cpu).unwrap();
    // w = 0, bias -1: every gate is sigmoid(-1) = 0.27 < p, so every token is skipped.
    let varmap = VarMap::new();
    let cfg = ModConfig {
        gate_init_bias: 3.0,
        ..odd_config()
    };
    {
        let mut data = varmap.data().lock().unwrap();
        let w =
            Var::from_tensor(&Tensor::zeros((1, 64), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[-1f32], &Device::Cpu).unwrap()).unwrap();
        data.insert("model.layers.1.router.weight".into(), w);
        data.insert("model.layers.1.router.bias".into(), b);
    }
    let m = ModModel::new(
        base,
        cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let bias = varmap.data().lock().unwrap()["model.layers.1.router.bias"].clone();
    let weight = varmap.data().lock().unwrap()["model.layers.1.router.weight"].clone();
    let train = m.forward(&batch, Mode::Training).unwrap();
    assert_eq!(train.stats[0].kept, 0);
    let lm = loss::lm_loss(&train.logits, batch.ids(), batch.valid()).unwrap();
    let grads = lm.backward().unwrap();
    let gb = grads
        .get(bias.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!(gb.abs() > 1e-6, "bias gradient {gb}");
    let gw = grads
        .get(weight.as_tensor())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(gw > 1e-6);
    // Inference mode gives the routers no gradient at all, even with every gate open.
    let open = Var::from_tensor(&Tensor::new(&[3f32], &Device::Cpu).unwrap()).unwrap();
    varmap
        .data()
        .lock()
        .unwrap()
        .insert("model.layers.1.router.bias".into(), open.clone());
    let m = ModModel::new(
        tiny::llama(2),
        ModConfig {
            gate_scaling: GateScaling::Multiply,
            ..odd_config()
        },
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let inf = m.forward(&batch, Mode::Inference).unwrap();
    assert_eq!(inf.stats[0].kept, 16);
    let lm = loss::lm_loss(&inf.logits, batch.ids(), batch.valid()).unwrap();
    assert!(lm.backward().unwrap().get(open.as_tensor()).is_none());
    // ...while training mode, on the same open gates, gives it one.
    let train = m.forward(&batch, Mode::Training).unwrap();
    let lm = loss::lm_loss(&train.logits, batch.ids(), batch.valid()).unwrap();
    assert!(lm.backward().unwrap().get(open.as_tensor()).is_some());
}

#[test]
fn backward_reaches_every_router_and_block_weight_with_finite_loss() {
    let cfg = tiny::config(3);
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, t) in tiny::weights(&cfg) {
            data.insert(name, Var::from_tensor(&t).unwrap());
        }
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let base = Llama::load(vb.clone(), &cfg).unwrap();
    let mcfg = ModConfig {
        router: threshold(0.5),
        gate_init_bias: 0.5,
        ..tiny::config_all_layers()
    };
    let m = ModModel::new(base, mcfg.clone(), vb).unwrap();
    // Give the fresh routers non-zero weights so that the selection is partial.
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.ends_with("router.weight") {
            let seed = name.len() as u64 + name.as_bytes()[13] as u64;
            var.set(&Tensor::from_vec(tiny::values(64, seed, 3.0), (1, 64), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let rows = vec![tiny::ids(12, 10), tiny::ids(7, 11)];
    let batch = Batch::from_rows(&rows, 0, 64, &Device::Cpu).unwrap();
    for kv in [KvPolicy::Skip, KvPolicy::Keep] {
        let m = ModModel::new(
            m.base().clone(),
            ModConfig {
                kv_policy: kv,
                ..mcfg.clone()
            },
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let out = m.forward(&batch, Mode::Training).unwrap();
        // Every layer keeps several tokens but not all: block weights get gradients only
        // through kept tokens (a skipped token's delta enters with forward weight 0).
        let kept: Vec<usize> = out.stats.iter().map(|s| s.kept).collect();
        assert!(
            kept.iter().all(|&k| k > 3 && k < 19),
            "want partial routing, kept {kept:?}"
        );
        let total = (loss::lm_loss(&out.logits, batch.ids(), batch.valid()).unwrap()
            + loss::load_reducing_loss(&out.stats, 0.01).unwrap())
        .unwrap();
        assert!(total.to_scalar::<f32>().unwrap().is_finite());
        let grads = total.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        assert_eq!(data.len(), cfg.tensor_shapes().len() + 6);
        for (name, var) in data.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{kv:?}: gradient of {name} is {norm}"
            );
        }
    }
}

#[test]
fn real_model_with_open_gates_reproduces_reference_perplexity() {
    let ckpt = common::smollm2();
    let base = Llama::from_checkpoint(ckpt).unwrap();
    // Default conversion: odd layers, threshold p = 0.5, fresh gates (w = 0, b = 2).
    let m = ModModel::new(
        base,
        ModConfig::default(),
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu),
    )
    .unwrap();
    assert_eq!(
        m.routers().keys().copied().collect::<Vec<_>>(),
        (1..30).step_by(2).collect::<Vec<_>>()
    );
    let ids = common::moby_reference_ids();
    let batch = Batch::single(&ids, 8192, &Device::Cpu).unwrap();
    let out = m.forward(&batch, Mode::Inference).unwrap();
    assert!(out.stats.iter().all(|s| s.kept == 256));
    let (sum, count) = loss::next_token_nll(&out.logits, batch.ids(), batch.valid()).unwrap();
    let ppl = (sum.to_scalar::<f32>().unwrap() as f64 / count as f64).exp();
    assert!((ppl - 30.8813).abs() / 30.8813 < 1e-3, "perplexity {ppl}");
}

#[test]
fn gate_gradient_stays_finite_for_saturated_logits() {
    // Gates on the raw residual stream see logits in the hundreds after a few steps.
    let x =
        Var::from_tensor(&Tensor::new(&[-500f32, -90.0, 0.0, 90.0, 500.0], &Device::Cpu).unwrap())
            .unwrap();
    let router = modification::routing::Router::from_tensors(
        Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let g = router.gates(x.as_tensor()).unwrap();
    let values: Vec<f32> = g.to_vec1().unwrap();
    assert_eq!(values[0], 0.0);
    assert_eq!(values[2], 0.5);
    assert_eq!(values[4], 1.0);
    let grads = g.sum_all().unwrap().backward().unwrap();
    let dg: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
    assert!(dg.iter().all(|d| d.is_finite()), "{dg:?}");
    assert_eq!(dg[2], 0.25);
}

#[test]
fn routing_map_marks_exactly_the_kept_cells() {
    use modification::routing::RoutingMap;
    // Gate weights 0 and bias -20: every gate is sigmoid(-20) < p, so only the sink (the
    // first token) is kept, at every routed layer.
    let cfg = ModConfig {
        router: threshold(0.5),
        sink_tokens: 1,
        ..tiny::config_all_layers()
    };
    let m = tiny::mod_model(tiny::llama(3), cfg, 0.0, -20.0);
    let ids = tiny::ids(6, 21);
    let batch = Batch::single(&ids, 64, &Device::Cpu).unwrap();
    let out = m.forward(&batch, Mode::Inference).unwrap();
    let tokens: Vec<String> = ["a", "b c", "<d>", "e", "\n", "f"]
        .map(String::from)
        .to_vec();
    let map = RoutingMap::from_stats(&out.stats, 0, tokens).unwrap();
    assert_eq!(map.layers, vec![0, 1, 2]);
    for layer in &map.kept {
        assert_eq!(layer, &vec![true, false, false, false, false, false]);
    }
    assert_eq!(map.layers_used(), vec![3, 0, 0, 0, 0, 0]);
    let text = map.to_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[1], "### |  3/3 | a");
    assert_eq!(lines[2], "... |  0/3 | b␣c");
    assert_eq!(lines[5], "... |  0/3 | ⏎");
    let html = map.to_html();
    assert_eq!(html.matches("class=\"kept\"").count(), 3);
    assert_eq!(html.matches("class=\"skipped\"").count(), 15);
    assert!(html.contains("&lt;d&gt;"), "token text is escaped");

    // Gates far above p: every cell kept. A map longer than the row is refused.
    let m = tiny::mod_model(tiny::llama(3), tiny::config_all_layers(), 0.0, 20.0);
    let out = m.forward(&batch, Mode::Inference).unwrap();
    let tokens: Vec<String> = (0..6).map(|i| i.to_string()).collect();
    let map = RoutingMap::from_stats(&out.stats, 0, tokens).unwrap();
    assert_eq!(map.layers_used(), vec![3; 6]);
    let seven: Vec<String> = (0..7).map(|i| i.to_string()).collect();
    assert!(matches!(
        RoutingMap::from_stats(&out.stats, 0, seven),
        Err(modification::Error::InvalidArgument(_))
    ));
}

#[test]
fn skipped_tokens_are_the_real_tokens_a_selection_does_not_keep() {
    let sel = Selection::new(vec![vec![0, 2, 4], vec![1], vec![], vec![0, 1, 2]], 6).unwrap();
    let skipped = sel.skipped(&[5, 3, 2, 3]);
    let want: Vec<Vec<u32>> = vec![vec![1, 3], vec![0, 2], vec![0, 1], vec![]];
    assert_eq!(skipped.kept(), want.as_slice());
    assert_eq!(skipped.seq_len(), 6);
    assert_eq!(skipped.num_kept() + sel.num_kept(), 5 + 3 + 2 + 3);
}
