//! The routed model on a CUDA GPU against the same model on the CPU: forward and backward,
//! `Skip` and `Keep`, threshold-p and top-k, skip adapters, a padded batch, and the edge
//! cases (no token kept, every token kept, a single token); cached decode; the prefix-softmax
//! and fused element-wise kernels against their CPU implementations.
//!
//! Compiled always; each test prints why and passes without checking anything where no
//! CUDA device is present (a build without `--features cuda`, or a machine without a GPU).
//! `scripts/gpu-check` runs them on a GPU.

mod common;
#[path = "common/tiny.rs"]
mod tiny;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use modification::mixture_of_depths::{KvPolicy, RouterKind};
use modification::{loss, Batch, Llama, ModConfig, ModModel, Mode};
use std::collections::{BTreeMap, HashMap};

/// GPU 0, or `None` with the reason printed. `MODIFICATION_CUDA_TESTS_ON_CPU=1` puts the
/// "GPU" side on the CPU too, to check the harness itself on a machine without a GPU.
fn cuda() -> Option<Device> {
    if std::env::var("MODIFICATION_CUDA_TESTS_ON_CPU").is_ok_and(|v| v == "1") {
        return Some(Device::Cpu);
    }
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn router(kind: &str) -> RouterKind {
    match kind {
        "threshold" => RouterKind::ThresholdP {
            p: 0.5,
            per_layer: BTreeMap::new(),
        },
        _ => RouterKind::TopK { capacity: 0.5 },
    }
}

/// The tiny 3-layer model on `device` with every weight a `Var` (routers given fixed
/// weights `w_scale · random` and bias `bias`, skip adapters drawn weights, so that a
/// skipped token's update is not zero), so that gradients can be compared.
fn trainable(cfg: &ModConfig, device: &Device, w_scale: f32, bias: f32) -> (ModModel, VarMap) {
    let llama_cfg = tiny::config(3);
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, t) in tiny::weights(&llama_cfg) {
            data.insert(
                name,
                Var::from_tensor(&t.to_device(device).unwrap()).unwrap(),
            );
        }
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let base = Llama::load(vb.clone(), &llama_cfg).unwrap();
    let model = ModModel::new(base, cfg.clone(), vb).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let seed = name.len() as u64 + name.as_bytes()[13] as u64;
        if name.ends_with("router.weight") {
            let w = Tensor::from_vec(tiny::values(64, seed, w_scale), (1, 64), device).unwrap();
            var.set(&w).unwrap();
        } else if name.ends_with("router.bias") {
            var.set(&Tensor::from_vec(vec![bias], 1, device).unwrap())
                .unwrap();
        } else if name.contains("skip_adapter") {
            let shape = var.as_tensor().dims2().unwrap();
            let w = tiny::values(shape.0 * shape.1, seed, 0.2);
            var.set(&Tensor::from_vec(w, shape, device).unwrap())
                .unwrap();
        }
    }
    (model, varmap)
}

/// Largest difference relative to the larger magnitude of the CPU tensor (1 at least).
fn rel_diff(gpu: &Tensor, cpu: &Tensor) -> f32 {
    let gpu = gpu.to_device(&Device::Cpu).unwrap();
    let scale = cpu.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let scale = scale.to_scalar::<f32>().unwrap().max(1.0);
    common::max_diff(&gpu, cpu) / scale
}

struct Run {
    logits: Tensor,
    /// The sparse (gathered) forward's logits.
    inference_logits: Tensor,
    kept: Vec<Vec<u8>>,
    loss: f32,
    grads: HashMap<String, Tensor>,
}

/// Training-mode forward and backward of `cfg` on `rows` (padded with 0) on `device`.
fn run(cfg: &ModConfig, rows: &[Vec<u32>], device: &Device, w_scale: f32, bias: f32) -> Run {
    let (model, varmap) = trainable(cfg, device, w_scale, bias);
    let batch = Batch::from_rows(rows, 0, 64, device).unwrap();
    let inference = model.forward(&batch, Mode::Inference).unwrap();
    let out = model.forward(&batch, Mode::Training).unwrap();
    let total = (loss::lm_loss(&out.logits, batch.ids(), batch.valid()).unwrap()
        + loss::load_reducing_loss(&out.stats, 0.01)
            .unwrap()
            .to_device(device)
            .unwrap())
    .unwrap();
    let store = total.backward().unwrap();
    let grads = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(name, var)| {
            let g = store.get(var.as_tensor())?;
            Some((name.clone(), g.to_device(&Device::Cpu).unwrap()))
        })
        .collect();
    let kept = out
        .stats
        .iter()
        .map(|s| {
            let mask = s.kept_mask.to_device(&Device::Cpu).unwrap();
            mask.to_dtype(DType::U8)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    Run {
        logits: out.logits.to_device(&Device::Cpu).unwrap(),
        inference_logits: inference.logits.to_device(&Device::Cpu).unwrap(),
        kept,
        loss: total.to_device(&Device::Cpu).unwrap().to_scalar().unwrap(),
        grads,
    }
}

/// GPU and CPU agree: the same kept tokens (bit-exact), training and inference logits and
/// loss within 1e-4, and every gradient within 1e-4 relative.
fn assert_same(cfg: &ModConfig, rows: &[Vec<u32>], gpu: &Device, w_scale: f32, bias: f32) {
    let on_cpu = run(cfg, rows, &Device::Cpu, w_scale, bias);
    let on_gpu = run(cfg, rows, gpu, w_scale, bias);
    let what = format!(
        "{:?} {:?} skip adapter rank {}",
        cfg.kv_policy, cfg.router, cfg.skip_adapter_rank
    );
    assert_eq!(on_gpu.kept, on_cpu.kept, "{what}: kept tokens");
    let d = rel_diff(&on_gpu.logits, &on_cpu.logits);
    assert!(d < 1e-4, "{what}: logits differ by {d}");
    let d = rel_diff(&on_gpu.inference_logits, &on_cpu.inference_logits);
    assert!(d < 1e-4, "{what}: inference logits differ by {d}");
    assert!(
        (on_gpu.loss - on_cpu.loss).abs() <= 1e-4 * on_cpu.loss.abs().max(1.0),
        "{what}: loss {} vs {}",
        on_gpu.loss,
        on_cpu.loss
    );
    assert_eq!(on_gpu.grads.len(), on_cpu.grads.len(), "{what}: gradients");
    for (name, g) in &on_cpu.grads {
        let d = rel_diff(&on_gpu.grads[name], g);
        assert!(d < 1e-4, "{what}: gradient of {name} differs by {d}");
    }
}

#[test]
fn routed_forward_and_backward_on_cuda_equal_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let rows = vec![tiny::ids(12, 10), tiny::ids(7, 11)];
    for kv in [KvPolicy::Skip, KvPolicy::Keep] {
        for kind in ["threshold", "top-k"] {
            let cfg = ModConfig {
                kv_policy: kv,
                router: router(kind),
                ..tiny::config_all_layers_no_sink()
            };
            assert_same(&cfg, &rows, &gpu, 3.0, 0.0);
        }
        let with_adapters = ModConfig {
            kv_policy: kv,
            router: router("threshold"),
            skip_adapter_rank: 4,
            ..tiny::config_all_layers_no_sink()
        };
        assert_same(&with_adapters, &rows, &gpu, 3.0, 0.0);
    }
}

#[test]
fn edge_cases_on_cuda_equal_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let cfg = ModConfig {
        router: router("threshold"),
        ..tiny::config_all_layers_no_sink()
    };
    let rows = vec![tiny::ids(9, 12)];
    // Gates far below p: no token kept. Far above: every token kept.
    assert_same(&cfg, &rows, &gpu, 0.0, -20.0);
    assert_same(&cfg, &rows, &gpu, 0.0, 20.0);
    // A single token.
    assert_same(&cfg, &[vec![7]], &gpu, 3.0, 0.0);
}

#[test]
fn cached_decode_on_cuda_equals_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let cfg = ModConfig {
        router: router("threshold"),
        kv_policy: KvPolicy::Skip,
        ..tiny::config_all_layers_no_sink()
    };
    let ids = tiny::ids(10, 13);
    let mut last = Vec::new();
    for device in [Device::Cpu, gpu] {
        let model = tiny::mod_model(tiny::llama_on(3, &device), cfg.clone(), 3.0, 0.0);
        let mut cache = model.new_cache(1).unwrap();
        let prompt = Batch::single(&ids[..6], 64, &device).unwrap();
        model.forward_cached(&prompt, &mut cache).unwrap();
        let mut logits = Vec::new();
        for &id in &ids[6..] {
            let step =
                modification::generate::decode_batch(&[id], cache.next_positions(), 64, &device)
                    .unwrap();
            let out = model.forward_cached(&step, &mut cache).unwrap();
            logits.push(out.logits.to_device(&Device::Cpu).unwrap());
        }
        last.push((Tensor::cat(&logits, 1).unwrap(), cache.bytes()));
    }
    let d = rel_diff(&last[1].0, &last[0].0);
    assert!(d < 1e-4, "decode logits differ by {d}");
    assert_eq!(last[1].1, last[0].1, "KV-cache bytes");
}

/// The GPU's prefix-softmax kernels (f32 and bf16) against the CPU implementation in f32:
/// probabilities and the scores' gradient, on odd sizes (37 queries, 70 key slots: more
/// than a warp's width) with counts from 0 (a padding slot) to every key.
#[test]
fn prefix_softmax_on_cuda_equals_the_cpu() {
    use modification::model::prefix_softmax::prefix_softmax;
    let Some(gpu) = cuda() else { return };
    let (b, h, g, t, tk) = (2, 3, 3, 37, 70);
    let counts: Vec<usize> = (0..b * t).map(|i| (i * 7) % (tk + 1)).collect();
    let shape = (b, h, g * t, tk);
    let scores = Tensor::from_vec(
        tiny::values(b * h * g * t * tk, 5, 4.0),
        shape,
        &Device::Cpu,
    )
    .unwrap();
    let weights = Tensor::from_vec(
        tiny::values(b * h * g * t * tk, 6, 1.0),
        shape,
        &Device::Cpu,
    )
    .unwrap();
    let run = |device: &Device, dtype: DType| -> (Tensor, Tensor) {
        let var =
            Var::from_tensor(&scores.to_dtype(dtype).unwrap().to_device(device).unwrap()).unwrap();
        let p = prefix_softmax(var.as_tensor(), &counts, t, 0.125).unwrap();
        let w = weights.to_dtype(dtype).unwrap().to_device(device).unwrap();
        let grads = (&p * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = grads.get(var.as_tensor()).unwrap();
        let host = |x: &Tensor| {
            x.to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
        };
        (host(&p), host(grad))
    };
    let (p_cpu, g_cpu) = run(&Device::Cpu, DType::F32);
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let (p, grad) = run(&gpu, dtype);
        let dp = rel_diff(&p, &p_cpu);
        assert!(dp < tolerance, "{dtype:?}: probabilities differ by {dp}");
        let dg = rel_diff(&grad, &g_cpu);
        assert!(dg < tolerance, "{dtype:?}: gradients differ by {dg}");
    }
    // An infinite score makes its row NaN, in bf16 as on the CPU (never a silent 0).
    let row = Tensor::new(&[f32::INFINITY, 0.0, 1.0, 2.0], &gpu).unwrap();
    let row = row
        .reshape((1, 1, 1, 4))
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let p = prefix_softmax(&row, &[4], 1, 0.125).unwrap();
    let p: Vec<f32> = p
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(
        p.iter().all(|v| v.is_nan()),
        "bf16 row with an infinite score: {p:?}"
    );
}

/// Runs `op` on `inputs` (CPU f32 tensors, moved to `device` in `dtype`, the first
/// `trained` of them tracked) and returns its output and the tracked inputs' gradients of
/// `Σ op ⊙ probe`, on the CPU in f32.
fn op_and_grads(
    inputs: &[Tensor],
    trained: usize,
    device: &Device,
    dtype: DType,
    op: &dyn Fn(&[Tensor]) -> Tensor,
) -> Vec<Tensor> {
    let moved: Vec<Tensor> = (inputs.iter())
        .map(|t| t.to_dtype(dtype).unwrap().to_device(device).unwrap())
        .collect();
    let vars: Vec<Var> = (moved[..trained].iter())
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let mut operands: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    operands.extend(moved[trained..].iter().cloned());
    let out = op(&operands);
    let probe = Tensor::from_vec(tiny::values(out.elem_count(), 77, 1.0), out.dims(), device)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let grads = (&out * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let host = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let mut results = vec![host(&out)];
    results.extend(vars.iter().map(|v| host(grads.get(v.as_tensor()).unwrap())));
    results
}

/// The fused element-wise kernels (RMSNorm, SwiGLU, RoPE) and the training attention on
/// the GPU in f32 and bf16 against the CPU's in f32: the output and every trained
/// operand's gradient, on a single row or token, odd widths, and more rows than a block's
/// warps.
#[test]
fn fused_ops_on_cuda_equal_the_cpu() {
    use modification::model::fused;
    let Some(gpu) = cuda() else { return };
    let tensor = |dims: &[usize], seed: u64, scale: f32| {
        let n = dims.iter().product();
        Tensor::from_vec(tiny::values(n, seed, scale), dims, &Device::Cpu).unwrap()
    };
    // A case: its name, its inputs, and the op on them.
    type Case = (String, Vec<Tensor>, Box<dyn Fn(&[Tensor]) -> Tensor>);
    let mut cases: Vec<Case> = Vec::new();
    for dims in [vec![1, 1, 5], vec![3, 7, 13], vec![2, 300, 40]] {
        let d = dims[2];
        cases.push((
            format!("RMSNorm {dims:?}"),
            vec![tensor(&dims, 1, 3.0), tensor(&[d], 2, 1.0)],
            Box::new(|t: &[Tensor]| fused::rms_norm(&t[0], &t[1], 1e-5).unwrap()),
        ));
        cases.push((
            format!("SwiGLU {dims:?}"),
            vec![tensor(&dims, 3, 8.0), tensor(&dims, 4, 2.0)],
            Box::new(|t: &[Tensor]| fused::swiglu(&t[0], &t[1]).unwrap()),
        ));
    }
    for (b, h, t, hd) in [(1, 1, 1, 4), (2, 3, 5, 6), (2, 9, 33, 64)] {
        let angles = tensor(&[b, t, hd / 2], 5, 3.0);
        cases.push((
            format!("RoPE {:?}", (b, h, t, hd)),
            vec![
                tensor(&[b, h, t, hd], 6, 2.0),
                angles.cos().unwrap(),
                angles.sin().unwrap(),
            ],
            Box::new(|t: &[Tensor]| fused::rope(&t[0], &t[1], &t[2]).unwrap()),
        ));
    }
    // The training attention: 2 rows, 3 KV heads of 2 query heads, 37 queries over 70
    // keys, counts from 0 (a padding slot) to every key.
    let (b, n_kv, g, t, tk, hd) = (2, 3, 2, 37, 70, 16);
    let visible: Vec<usize> = (0..b * t).map(|i| (i * 7) % (tk + 1)).collect();
    cases.push((
        "recomputed attention".to_string(),
        vec![
            tensor(&[b, n_kv, g * t, hd], 7, 1.0),
            tensor(&[b, n_kv, tk, hd], 8, 1.0),
            tensor(&[b, n_kv, tk, hd], 9, 1.0),
        ],
        Box::new(move |x: &[Tensor]| {
            modification::model::recomputed_attention::recomputed_prefix_attention(
                &x[0], &x[1], &x[2], &visible, 0.25,
            )
            .unwrap()
        }),
    ));
    // bf16 has a kernel on the GPU only; the CPU-harness mode checks f32.
    let dtypes: &[(DType, f32)] = match gpu.is_cpu() {
        true => &[(DType::F32, 1e-5)],
        false => &[(DType::F32, 1e-5), (DType::BF16, 2e-2)],
    };
    for (name, inputs, op) in &cases {
        let trained = inputs.len() - usize::from(name.starts_with("RoPE")) * 2;
        let want = op_and_grads(inputs, trained, &Device::Cpu, DType::F32, op.as_ref());
        for &(dtype, tolerance) in dtypes {
            let got = op_and_grads(inputs, trained, &gpu, dtype, op.as_ref());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let d = rel_diff(g, w);
                let what = if i == 0 {
                    "output".to_string()
                } else {
                    format!("gradient {}", i - 1)
                };
                assert!(d < tolerance, "{name} {dtype:?}: {what} differs by {d}");
            }
        }
    }
}

/// The training attention's backward on the GPU takes the broadcast (zero-stride) gradient
/// of a plain sum, and gives the CPU's gradients.
#[test]
fn recomputed_attention_takes_a_broadcast_gradient() {
    use modification::model::recomputed_attention::recomputed_prefix_attention;
    let Some(gpu) = cuda() else { return };
    let (b, n_kv, t, hd) = (1, 2, 5, 8);
    let visible: Vec<usize> = (1..=t).collect();
    let grads_on = |device: &Device| -> Vec<Tensor> {
        let var = |seed| {
            let values = tiny::values(b * n_kv * t * hd, seed, 1.0);
            Var::from_tensor(&Tensor::from_vec(values, (b, n_kv, t, hd), device).unwrap()).unwrap()
        };
        let (q, k, v) = (var(21), var(22), var(23));
        let out =
            recomputed_prefix_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &visible, 0.3)
                .unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        [q, k, v]
            .iter()
            .map(|x| {
                grads
                    .get(x.as_tensor())
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap()
            })
            .collect()
    };
    for (g, c) in grads_on(&gpu).iter().zip(&grads_on(&Device::Cpu)) {
        let d = rel_diff(g, c);
        assert!(d < 1e-5, "gradients differ by {d}");
    }
}
