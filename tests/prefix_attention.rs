//! The fused CPU attention kernel equals attention computed in f64 from its definition,
//! `softmax(q·Kᵀ·scale + mask)·V` with query t of row b seeing keys `0..visible[b·Tq + t]`,
//! and the attention layer gives the same output through it as through candle's composed
//! ops with the equivalent additive mask.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use modification::model::prefix_attention::prefix_attention;
use modification::model::{Attention, RotaryEmbedding, Visible};

/// Deterministic values in [-2, 2).
fn data(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + 7919 * seed) as f32 * 0.618_034).fract() - 0.5) * 4.0)
        .collect()
}

/// Attention from its definition, in f64: `q` `(B, n_kv, G·Tq, hd)`, `k`, `v`
/// `(B, n_kv, Tk, hd)`, all flattened row-major.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, n_kv, gq, tk, hd): (usize, usize, usize, usize, usize),
    visible: &[usize],
    scale: f64,
) -> Vec<f64> {
    let tq = visible.len() / b;
    let mut out = vec![0f64; b * n_kv * gq * hd];
    for bi in 0..b {
        for h in 0..n_kv {
            let plane = bi * n_kv + h;
            for slot in 0..gq {
                let n = visible[bi * tq + slot % tq];
                if n == 0 {
                    continue;
                }
                let qr = &q[(plane * gq + slot) * hd..][..hd];
                let scores: Vec<f64> = (0..n)
                    .map(|j| {
                        let kr = &k[(plane * tk + j) * hd..][..hd];
                        scale
                            * qr.iter()
                                .zip(kr)
                                .map(|(&a, &c)| a as f64 * c as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let o = &mut out[(plane * gq + slot) * hd..][..hd];
                for (j, w) in weights.iter().enumerate() {
                    let vr = &v[(plane * tk + j) * hd..][..hd];
                    for (od, &x) in o.iter_mut().zip(vr) {
                        *od += w / total * x as f64;
                    }
                }
            }
        }
    }
    out
}

fn assert_close(got: &Tensor, want: &[f64], what: &str) {
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}: element {i} is {g}, want {w}"
        );
    }
}

/// Causal counts for a prompt of `tq` tokens after `cached` cached keys, for `b` rows.
fn causal(b: usize, tq: usize, cached: usize) -> Vec<usize> {
    (0..b)
        .flat_map(|_| (1..=tq).map(move |t| cached + t))
        .collect()
}

#[test]
fn prefix_attention_equals_its_definition() {
    let dev = Device::Cpu;
    // (rows, KV heads, query heads per KV head, query slots, keys, head width, counts)
    type Case = (usize, usize, usize, usize, usize, usize, Vec<usize>);
    let mut cases: Vec<Case> = vec![];
    for t in [1usize, 7, 64, 1000] {
        // A causal prompt, grouped-query attention (3 query heads per KV head).
        cases.push((1, 3, 3, t, t, 64, causal(1, t, 0)));
    }
    // Two rows, head width 40 (not a whole value block), multi-head attention.
    cases.push((2, 2, 1, 7, 7, 40, causal(2, 7, 0)));
    // Routed tokens: each query sees the kept keys up to its position, a count that
    // jumps; row 1 ends in two padding slots (count 0).
    cases.push((2, 3, 3, 6, 9, 64, vec![1, 3, 4, 4, 7, 9, 2, 2, 5, 6, 0, 0]));
    // A decode step and a chunk after a partially filled cache of 300 entries.
    cases.push((1, 3, 3, 1, 301, 64, vec![301]));
    cases.push((1, 3, 3, 5, 305, 64, causal(1, 5, 300)));
    // Few queries per plane (the decode path: keys read row by row, no transposition),
    // head width 40 (not a whole vector of sums), a padding slot, two rows.
    cases.push((2, 3, 2, 2, 9, 40, vec![3, 9, 0, 5]));
    cases.push((1, 2, 1, 1, 130, 40, vec![130]));
    for (b, n_kv, g, tq, tk, hd, visible) in cases {
        let what = format!("B {b}, KV heads {n_kv}, G {g}, Tq {tq}, Tk {tk}, hd {hd}");
        let gq = g * tq;
        let (qd, kd, vd) = (
            data(b * n_kv * gq * hd, 1),
            data(b * n_kv * tk * hd, 2),
            data(b * n_kv * tk * hd, 3),
        );
        let q = Tensor::from_vec(qd.clone(), (b, n_kv, gq, hd), &dev).unwrap();
        let k = Tensor::from_vec(kd.clone(), (b, n_kv, tk, hd), &dev).unwrap();
        let v = Tensor::from_vec(vd.clone(), (b, n_kv, tk, hd), &dev).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let want = reference(&qd, &kd, &vd, (b, n_kv, gq, tk, hd), &visible, scale);
        let got = prefix_attention(&q, &k, &v, &visible, scale as f32).unwrap();
        assert_eq!(got.dims(), &[b, n_kv, gq, hd], "{what}");
        assert_close(&got, &want, &what);
        // The same keys as a view into a larger buffer (a KV cache with spare capacity):
        // strided over the token axis's end, rows still contiguous.
        let spare = |x: &Tensor| {
            let pad = Tensor::zeros((b, n_kv, 5, hd), DType::F32, &dev).unwrap();
            Tensor::cat(&[x, &pad], 2)
                .unwrap()
                .narrow(2, 0, tk)
                .unwrap()
        };
        let got = prefix_attention(&q, &spare(&k), &spare(&v), &visible, scale as f32).unwrap();
        assert_close(&got, &want, &format!("{what}, strided keys"));
    }
}

#[test]
fn prefix_attention_refuses_counts_that_do_not_fit() {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 1, 4, 8), DType::F32, &dev).unwrap();
    let k = Tensor::zeros((1, 1, 3, 8), DType::F32, &dev).unwrap();
    // A count beyond the keys, and a count list that does not divide the queries.
    for visible in [vec![1, 2, 3, 4], vec![1, 2, 3]] {
        let err = prefix_attention(&q, &k, &k, &visible, 1.0).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }
}

#[test]
fn attention_layer_agrees_on_the_fused_and_composed_paths() {
    let dev = Device::Cpu;
    let (d, heads, kv_heads, t) = (32, 4, 2, 9);
    // Plain tensors, not variables: the fused path runs only where nothing tracks a
    // gradient.
    let hd = d / heads;
    let shapes = [
        ("q_proj", d),
        ("k_proj", kv_heads * hd),
        ("v_proj", kv_heads * hd),
        ("o_proj", d),
    ];
    let weights = (shapes.iter().enumerate())
        .map(|(i, &(name, out))| {
            let w = Tensor::from_vec(data(out * d, 10 + i), (out, d), &dev).unwrap();
            (format!("attn.{name}.weight"), (w * 0.2).unwrap())
        })
        .collect();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
    let attn = Attention::load(vb.pp("attn"), d, heads, kv_heads).unwrap();
    let rope = RotaryEmbedding::new(d / heads, 64, 10_000.0, &dev).unwrap();
    let x = Tensor::from_vec(data(t * d, 4), (1, t, d), &dev).unwrap();
    let positions = Tensor::arange(0u32, t as u32, &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let at = rope.at(&positions, DType::F32).unwrap();
    let (k, v) = attn.key_values(&x, &at).unwrap();
    let counts = causal(1, t, 0);
    let fused = attn
        .attend(&x, &at, &k, &v, Visible::Prefix(&counts))
        .unwrap();
    let mask = modification::model::attention_mask(
        &positions,
        &positions,
        &Tensor::ones((1, t), DType::U8, &dev).unwrap(),
        DType::F32,
    )
    .unwrap();
    let composed = attn.attend(&x, &at, &k, &v, Visible::Mask(&mask)).unwrap();
    let diff = common::max_diff(&fused, &composed);
    assert!(diff < 1e-5, "fused and composed attention differ by {diff}");
    // The last query sees every key: the same as no mask at all.
    let last = attn
        .attend(
            &x.i((.., t - 1..)).unwrap(),
            &rope
                .at(&positions.i((.., t - 1..)).unwrap(), DType::F32)
                .unwrap(),
            &k,
            &v,
            Visible::All,
        )
        .unwrap();
    let diff = common::max_diff(&fused.i((.., t - 1..)).unwrap(), &last);
    assert!(
        diff < 1e-5,
        "the last query differs from unmasked attention by {diff}"
    );
}

/// `softmax(q·Kᵀ·scale + mask)·V` from candle's composed, differentiable ops: `q`
/// `(B, n_kv, G·Tq, hd)`, query slot t of row b seeing keys `0..visible[b·Tq + t]`; a slot
/// that sees no key gets a zero output, as from the kernel.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, visible: &[usize], scale: f64) -> Tensor {
    let (b, n_kv, gq, _) = q.dims4().unwrap();
    let tk = k.dim(2).unwrap();
    let tq = visible.len() / b;
    let mask: Vec<f32> = (visible.iter())
        .flat_map(|&n| (0..tk).map(move |j| if j < n { 0.0 } else { -1e9 }))
        .collect();
    let mask = Tensor::from_vec(mask, (b, 1, 1, tq, tk), q.device()).unwrap();
    let seen: Vec<f32> = visible.iter().map(|&n| f32::from(n > 0)).collect();
    let seen = Tensor::from_vec(seen, (b, 1, 1, tq, 1), q.device()).unwrap();
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
        .unwrap()
        .reshape((b, n_kv, gq / tq, tq, tk))
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
    let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)
        .unwrap()
        .broadcast_mul(&seen)
        .unwrap()
        .reshape((b, n_kv, gq, tk))
        .unwrap();
    probs.matmul(v).unwrap()
}

#[test]
fn prefix_attention_gradients_equal_the_composed_ops() {
    let dev = Device::Cpu;
    // (rows, KV heads, G, Tq, Tk, hd, counts): causal GQA; routed counts with padding.
    let cases = [
        (1, 3, 3, 7, 7, 64, causal(1, 7, 0)),
        (2, 2, 2, 6, 9, 40, vec![1, 3, 4, 4, 7, 9, 2, 2, 5, 6, 0, 0]),
        (1, 1, 1, 1, 5, 16, vec![5]),
    ];
    for (b, n_kv, g, tq, tk, hd, visible) in cases {
        let what = format!("B {b}, KV heads {n_kv}, G {g}, Tq {tq}, Tk {tk}, hd {hd}");
        let gq = g * tq;
        let var = |shape: (usize, usize, usize, usize), seed| {
            let n = shape.0 * shape.1 * shape.2 * shape.3;
            candle_core::Var::from_tensor(&Tensor::from_vec(data(n, seed), shape, &dev).unwrap())
                .unwrap()
        };
        let (q, k, v) = (
            var((b, n_kv, gq, hd), 1),
            var((b, n_kv, tk, hd), 2),
            var((b, n_kv, tk, hd), 3),
        );
        // A weighted sum, so that every output element has its own gradient.
        let weights =
            Tensor::from_vec(data(b * n_kv * gq * hd, 4), (b, n_kv, gq, hd), &dev).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let grads = |out: Tensor| {
            let g = (out * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            [&q, &k, &v].map(|x| g.get(x.as_tensor()).unwrap().clone())
        };
        let fused = grads(prefix_attention(&q, &k, &v, &visible, scale as f32).unwrap());
        let want = grads(composed(&q, &k, &v, &visible, scale));
        for ((got, want), name) in fused.iter().zip(&want).zip(["q", "k", "v"]) {
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let top = want.iter().fold(0f32, |m, w| m.max(w.abs()));
            assert!(top > 0.0, "{what}: d{name} is all zero");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{what}: d{name}[{i}] is {g}, want {w}"
                );
            }
        }
    }
}
