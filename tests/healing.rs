//! The conversion recipe beyond the paper's: self-distillation (KL to the original),
//! LoRA healing merged at save time, and the compute budget with calibrated thresholds.

mod common;
#[path = "common/tiny.rs"]
mod tiny;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use modification::calibrate::calibrate_compute;
use modification::loss::{self, chunked_objective};
use modification::mixture_of_depths::{KvPolicy, RouterKind};
use modification::model::LoraConfig;
use modification::train::{Objective, TrainConfig, Trainable, Trainer};
use modification::{Batch, Error, Llama, ModConfig, ModModel, Mode};
use std::collections::BTreeMap;

fn lora_run(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 2,
        trainable: Trainable::Lora,
        objective: Objective::Kl,
        lora: LoraConfig {
            rank: 4,
            alpha: 8.0,
        },
        // Large enough that two steps move the adapters visibly.
        lora_lr: 1e-2,
        ..TrainConfig::default()
    }
}

fn grad_norm(t: &Tensor) -> f32 {
    common::l2_norm(t) as f32
}

#[test]
fn chunked_objective_equals_the_full_logit_losses() {
    // Tiny model (vocab 101): the chunked LM loss and KL equal the full-logit ones.
    let student = tiny::llama(2);
    let cfg = tiny::config(2);
    let mut w = tiny::weights(&cfg);
    for t in w.values_mut() {
        *t = (&*t * 1.3).unwrap();
    }
    let teacher = Llama::load(VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), &cfg).unwrap();
    let rows = vec![tiny::ids(40, 1), tiny::ids(33, 2)];
    let batch = Batch::from_rows(&rows, 0, 64, &Device::Cpu).unwrap();
    let hs = student.forward_hidden(&batch).unwrap();
    let ht = teacher.forward_hidden(&batch).unwrap();
    let terms = chunked_objective(
        &student,
        &hs,
        Some((&teacher, &ht)),
        batch.ids(),
        batch.valid(),
    )
    .unwrap();
    let full_lm = loss::lm_loss(&student.logits(&hs).unwrap(), batch.ids(), batch.valid())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let full_kl = loss::distillation_kl(
        &student.logits(&hs).unwrap(),
        &teacher.logits(&ht).unwrap(),
        batch.valid(),
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    let lm = terms.lm_loss().unwrap().to_scalar::<f32>().unwrap();
    let kl = terms
        .kl_loss()
        .unwrap()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(terms.nll_count, 39 + 32);
    assert_eq!(terms.kl_count, 40 + 33);
    assert!((lm - full_lm).abs() < 1e-5 * full_lm, "{lm} vs {full_lm}");
    assert!((kl - full_kl).abs() < 1e-5 * full_kl, "{kl} vs {full_kl}");
    assert!(
        kl > 1e-3,
        "the two models differ, so the KL must not vanish: {kl}"
    );
}

#[test]
fn kl_is_zero_with_every_gate_open_and_routers_feel_only_the_load_term() {
    let ckpt = common::smollm2();
    let teacher = Llama::from_checkpoint(ckpt).unwrap();
    let varmap = VarMap::new();
    // Bias 2 with zero weights: every gate 0.88 >= p = 0.5, every token kept.
    let model = ModModel::new(
        Llama::from_checkpoint(ckpt).unwrap(),
        ModConfig::default(),
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let rows = common::small_corpus().sources[1].heldout.clone();
    let batch = Batch::from_rows(&rows, 0, 8192, &Device::Cpu).unwrap();
    let out = model.forward_hidden(&batch, Mode::Training).unwrap();
    assert!(out.stats.iter().all(|s| s.kept == s.valid));
    let th = teacher.forward_hidden(&batch).unwrap();
    let terms = chunked_objective(
        model.base(),
        &out.hidden,
        Some((&teacher, &th)),
        batch.ids(),
        batch.valid(),
    )
    .unwrap();
    let kl = terms.kl_loss().unwrap().unwrap();
    let kl_value = kl.to_scalar::<f32>().unwrap();
    assert!(kl_value.abs() < 1e-5, "KL with every gate open: {kl_value}");

    let load = loss::load_reducing_loss(&out.stats, 0.01).unwrap();
    let w = varmap.data().lock().unwrap()["model.layers.5.router.weight"].clone();
    let grad_of = |loss: &Tensor| loss.backward().unwrap().get(w.as_tensor()).unwrap().clone();
    let g_load = grad_of(&load);
    let g_both = grad_of(&(&kl + &load).unwrap());
    let g_lm = grad_of(&terms.lm_loss().unwrap());
    let diff = grad_norm(&(&g_both - &g_load).unwrap());
    // The LM loss does move the router at the same point: the KL's silence is not a
    // missing gradient path.
    assert!(grad_norm(&g_lm) > 1e-2, "LM gradient {}", grad_norm(&g_lm));
    assert!(
        diff < 1e-3 * grad_norm(&g_lm),
        "KL adds {diff} to the router gradient (LM gradient {})",
        grad_norm(&g_lm)
    );
}

#[test]
fn lora_trains_only_adapters_and_routers_and_merges_exactly() {
    let ckpt = common::smollm2();
    let mut trainer = Trainer::new(ckpt, ModConfig::default(), lora_run(2)).unwrap();
    trainer
        .run(common::small_corpus(), None, 0, |_| {})
        .unwrap();

    // Only adapters (7 projections x 30 layers x A, B) and routers (15 x weight, bias).
    let trained = trainer.trained_tensors();
    assert_eq!(trained.len(), 7 * 30 * 2 + 15 * 2);
    assert!(trained
        .keys()
        .all(|n| n.ends_with(".lora_a") || n.ends_with(".lora_b") || n.contains(".router.")));
    let b = &trained["model.layers.4.mlp.up_proj.lora_b"];
    assert!(grad_norm(b) > 0.0, "the adapter did not train");

    // Base weights are bit-identical until the merge.
    for (i, layer) in trainer.model().base().layers().iter().enumerate() {
        for (name, proj) in layer.projections() {
            let key = format!("model.layers.{i}.{name}.weight");
            assert_eq!(
                common::max_diff(&proj.weight, &ckpt.tensors[&key]),
                0.0,
                "{key}"
            );
        }
    }

    // Merged weights give the unmerged model's logits.
    let converted = trainer.converted(trainer.model().config()).unwrap();
    let merged = ModModel::from_checkpoint(&converted).unwrap();
    let rows = common::small_corpus().sources[0].heldout.clone();
    let batch = Batch::from_rows(&rows, 0, 8192, &Device::Cpu).unwrap();
    let a = trainer.model().forward(&batch, Mode::Inference).unwrap();
    let m = merged.forward(&batch, Mode::Inference).unwrap();
    let scale = a
        .logits
        .abs()
        .unwrap()
        .max_keepdim(2)
        .unwrap()
        .mean_all()
        .unwrap();
    let rel = common::max_diff(&a.logits, &m.logits) / scale.to_scalar::<f32>().unwrap();
    assert!(rel < 1e-4, "merged vs unmerged relative difference {rel}");
    let key = "model.layers.4.mlp.up_proj.weight";
    assert!(common::max_diff(&converted.tensors[key], &ckpt.tensors[key]) > 0.0);

    // Save -> load round-trips the merged model.
    let dir = common::temp_dir("lora").join("converted");
    trainer
        .save_converted(&dir, trainer.model().config())
        .unwrap();
    let loaded = ModModel::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let l = loaded.forward(&batch, Mode::Inference).unwrap();
    // The reloaded tensors are bit-identical; the forward's rounding may differ (buffer
    // alignment picks other matmul kernels), so compare as the merge check does.
    let rel = common::max_diff(&l.logits, &m.logits) / scale.to_scalar::<f32>().unwrap();
    assert!(rel < 1e-4, "reloaded vs merged relative difference {rel}");
    let kept_l: Vec<usize> = l.stats.iter().map(|s| s.kept).collect();
    let kept_m: Vec<usize> = m.stats.iter().map(|s| s.kept).collect();
    assert_eq!(kept_l, kept_m);
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

fn routed_tiny(router: RouterKind) -> ModModel {
    let cfg = ModConfig {
        router,
        kv_policy: KvPolicy::Keep,
        ..tiny::config_all_layers()
    };
    tiny::mod_model(tiny::llama(4), cfg, 0.5, 0.0)
}

fn rows(seed: u64) -> Vec<Vec<u32>> {
    (0..24).map(|i| tiny::ids(48, seed * 100 + i)).collect()
}

fn compute_on(model: &ModModel, rows: &[Vec<u32>]) -> f64 {
    let batch = Batch::from_rows(rows, 0, 64, &Device::Cpu).unwrap();
    model
        .forward(&batch, Mode::Inference)
        .unwrap()
        .compute_fraction()
}

#[test]
fn calibrated_compute_lands_on_target_on_rows_it_never_saw() {
    for router in [
        RouterKind::ThresholdP {
            p: 0.5,
            per_layer: BTreeMap::new(),
        },
        RouterKind::TopK { capacity: 0.5 },
    ] {
        let model = routed_tiny(router.clone());
        for target in [0.6, 0.8] {
            let (calibrated, c) = calibrate_compute(&model, &rows(1), target).unwrap();
            assert!(
                (c.compute_fraction - target).abs() < 0.01,
                "{router:?} {c:?}"
            );
            let heldout = compute_on(&calibrated, &rows(2));
            assert!(
                (heldout - target).abs() < 0.02,
                "{router:?}: target {target}, held-out rows {heldout}"
            );
            assert!(c.reachable.0 < target && c.reachable.1 > target);
        }
    }
    // Threshold-p records one threshold per routed layer, each inside (0, 1).
    let model = routed_tiny(RouterKind::ThresholdP {
        p: 0.5,
        per_layer: BTreeMap::new(),
    });
    let (calibrated, _) = calibrate_compute(&model, &rows(1), 0.7).unwrap();
    match &calibrated.config().router {
        RouterKind::ThresholdP { per_layer, .. } => {
            assert_eq!(per_layer.len(), 4);
            assert!(per_layer.values().all(|&p| p > 0.0 && p < 1.0));
        }
        other => panic!("calibration changed the operator: {other:?}"),
    }
}

#[test]
fn unreachable_or_invalid_compute_targets_are_typed_errors() {
    let model = routed_tiny(RouterKind::ThresholdP {
        p: 0.5,
        per_layer: BTreeMap::new(),
    });
    // The lm_head and the sinks cost compute that no threshold removes.
    match calibrate_compute(&model, &rows(1), 0.01) {
        Err(Error::UnreachableTarget { target, min, max }) => {
            assert_eq!(target, 0.01);
            // Every token kept costs the dense model plus the routers.
            assert!(
                min > 0.01 && min < max && (1.0..1.01).contains(&max),
                "{min} {max}"
            );
        }
        other => panic!("expected UnreachableTarget, got {other:?}"),
    }
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        assert!(matches!(
            calibrate_compute(&model, &rows(1), bad),
            Err(Error::InvalidArgument(_))
        ));
        let cfg = TrainConfig {
            target_compute: Some(bad),
            ..TrainConfig::default()
        };
        assert!(matches!(cfg.validate(), Err(Error::InvalidArgument(m)) if m.contains("compute")));
    }
    assert!(matches!(
        calibrate_compute(&model, &[], 0.8),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn bad_lora_and_objective_settings_are_refused_before_training() {
    let zero = TrainConfig {
        lora: LoraConfig {
            rank: 0,
            alpha: 8.0,
        },
        ..lora_run(1)
    };
    assert!(matches!(zero.validate(), Err(Error::InvalidArgument(m)) if m.contains("rank 0")));
    // Above the hidden size (576): refused by the trainer, which knows the model.
    let huge = TrainConfig {
        lora: LoraConfig {
            rank: 577,
            alpha: 8.0,
        },
        ..lora_run(1)
    };
    huge.validate().unwrap();
    let err = Trainer::new(common::smollm2(), ModConfig::default(), huge).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("577") && m.contains("576")),
        "{err}"
    );
    // An objective that does not exist does not parse.
    let err = serde_json::from_str::<TrainConfig>(r#"{"objective": "mse"}"#).unwrap_err();
    assert!(err.to_string().contains("mse"), "{err}");
    let ok: TrainConfig = serde_json::from_str(r#"{"objective": "kl_lm"}"#).unwrap();
    assert_eq!(ok.objective, Objective::KlLm);
}

#[test]
fn compute_budget_pushes_every_gate_only_while_over_budget() {
    let model = routed_tiny(RouterKind::ThresholdP {
        p: 0.5,
        per_layer: BTreeMap::new(),
    });
    let batch = Batch::from_rows(&rows(3), 0, 64, &Device::Cpu).unwrap();
    let out = model.forward_hidden(&batch, Mode::Training).unwrap();
    let c = out.compute_fraction();
    assert!(c > 0.1 && c < 1.01, "{c}");
    let gates: f32 = out
        .stats
        .iter()
        .map(|s| s.mean_gate.to_scalar::<f32>().unwrap())
        .sum();
    let over = loss::compute_budget_loss(&out.stats, 0.1, c, c - 0.01)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let under = loss::compute_budget_loss(&out.stats, 0.1, c, c + 0.01)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (over - 0.1 * gates).abs() < 1e-6,
        "{over} vs {}",
        0.1 * gates
    );
    assert_eq!(under, 0.0);
    // Training-mode compute is what the sparse inference path spends on the same decisions.
    let inference = model.forward(&batch, Mode::Inference).unwrap();
    let kept: Vec<usize> = out.stats.iter().map(|s| s.kept).collect();
    let kept_inf: Vec<usize> = inference.stats.iter().map(|s| s.kept).collect();
    assert_eq!(kept, kept_inf);
    assert!(
        (c - inference.compute_fraction()).abs() < 0.02,
        "{c} vs {}",
        inference.compute_fraction()
    );
}

#[test]
fn calibrated_thresholds_above_the_initial_gate_are_valid_for_loaded_models_only() {
    let mut per_layer = BTreeMap::new();
    per_layer.insert(3, 0.95);
    let cfg = ModConfig {
        router: RouterKind::ThresholdP { p: 0.5, per_layer },
        ..ModConfig::default()
    };
    // A loaded (calibrated) model may carry p = 0.95 > sigmoid(2) = 0.88 ...
    cfg.validate(30).unwrap();
    // ... a fresh conversion may not: its first decision would already skip tokens.
    let err = cfg.validate_fresh(30).unwrap_err();
    assert!(
        matches!(&err, Error::Config { reason, .. } if reason.contains("0.95")),
        "{err}"
    );
    let err = Trainer::new(common::smollm2(), cfg, lora_run(1)).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
}
