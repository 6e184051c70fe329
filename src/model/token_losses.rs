//! Per-token next-token NLL and distillation KL over the vocabulary, fused on the CPU.
//!
//! Composed from candle ops, a log-softmax, the target's pick and the KL to a teacher are
//! a dozen passes over a `(tokens, 49 k)` tensor forward and as many backward, each into a
//! fresh buffer: with the `lm_head` products, 3.1 s of a 7 s LoRA + KL training step of
//! SmolLM2 (1.7 s fused). Here the forward reads each row once per reduction it needs
//! (maximum, sum of exponentials, the KL's weighted sum) and keeps nothing, and the
//! backward writes the logits' gradient in one pass per row:
//! `dL/ds = g_nll · (p_s − onehot(target)) + g_kl · (p_s − p_t)`.

use super::fused::values;
use super::vector_math::{exp, lane_max, sum_exp, LANES};
use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Per-token losses of `student` logits `(N, V)` f32 on the CPU: `(N, 2)` f32 holding
/// `−log p_s(target)` and, with `teacher` logits `(N, V)` (no gradient flows into them),
/// `KL(p_t ‖ p_s) = Σ_v p_t(v) (log p_t(v) − log p_s(v))` (0 without a teacher). Both
/// softmaxes in f32 from max-subtracted logits. Differentiable in `student`.
///
/// Errors: [`Error::InvalidArgument`] for a target outside the vocabulary or shapes that
/// do not match; [`Error::Candle`] for another dtype or device.
pub fn token_losses(student: &Tensor, teacher: Option<&Tensor>, targets: &[u32]) -> Result<Tensor> {
    let (n, vocab) = student.dims2()?;
    let fits = targets.len() == n
        && targets.iter().all(|&t| (t as usize) < vocab)
        && teacher.is_none_or(|t| t.dims() == student.dims());
    if !fits {
        return Err(Error::InvalidArgument(format!(
            "token losses: logits {:?}, teacher {:?} and {} targets do not fit together",
            student.dims(),
            teacher.map(|t| t.dims().to_vec()),
            targets.len()
        )));
    }
    let op = TokenLosses {
        targets: targets.to_vec(),
        with_teacher: teacher.is_some(),
    };
    let student = student.contiguous()?;
    // Without a teacher the student stands in for it (read, never used).
    let teacher = match teacher {
        Some(t) => t.detach().contiguous()?,
        None => student.detach(),
    };
    Ok(student.apply_op2(&teacher, op)?)
}

struct TokenLosses {
    targets: Vec<u32>,
    with_teacher: bool,
}

/// `[−log p_s(target), KL(p_t ‖ p_s)]` of one row, without a scratch buffer:
/// `KL = Σ p_t (t − s) + lse_s − lse_t`, `p_t = exp(t − lse_t)`.
#[inline(always)]
fn row_losses(s: &[f32], t: &[f32], target: usize, with_teacher: bool) -> [f32; 2] {
    let max_s = lane_max(s);
    let lse_s = max_s + sum_exp(s, max_s).ln();
    let nll = lse_s - s[target];
    if !with_teacher {
        return [nll, 0.0];
    }
    let max_t = lane_max(t);
    let sum_t = sum_exp(t, max_t);
    let lse_t = max_t + sum_t.ln();
    let mut acc = [0f32; LANES];
    let (tc, sc) = (t.chunks_exact(LANES), s.chunks_exact(LANES));
    let tail: f32 = (tc.remainder().iter().zip(sc.remainder()))
        .map(|(&tv, &sv)| exp(tv - max_t) * (tv - sv))
        .sum();
    for (tv, sv) in tc.zip(sc) {
        for l in 0..LANES {
            acc[l] += exp(tv[l] - max_t) * (tv[l] - sv[l]);
        }
    }
    let weighted = (acc.iter().sum::<f32>() + tail) / sum_t;
    [nll, weighted + lse_s - lse_t]
}

/// `g_nll · (p_s − onehot(target)) + g_kl · (p_s − p_t)` of one row into `out`.
#[inline(always)]
fn row_gradient(
    s: &[f32],
    t: &[f32],
    target: usize,
    g: [f32; 2],
    with_teacher: bool,
    out: &mut [f32],
) {
    let g_kl = if with_teacher { g[1] } else { 0.0 };
    let max_s = lane_max(s);
    let w_s = (g[0] + g_kl) / sum_exp(s, max_s);
    for (o, &v) in out.iter_mut().zip(s) {
        *o = w_s * exp(v - max_s);
    }
    out[target] -= g[0];
    if with_teacher {
        let max_t = lane_max(t);
        let w_t = g_kl / sum_exp(t, max_t);
        for (o, &v) in out.iter_mut().zip(t) {
            *o -= w_t * exp(v - max_t);
        }
    }
}

impl CustomOp2 for TokenLosses {
    fn name(&self) -> &'static str {
        "token-losses"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, vocab) = l1.shape().dims2()?;
        let (s, t) = (values::<f32>(s1, l1)?, values::<f32>(s2, l2)?);
        let forward = forward_kernel();
        let out: Vec<[f32; 2]> = (0..n)
            .into_par_iter()
            .map(|i| {
                let row = i * vocab..(i + 1) * vocab;
                let target = self.targets[i] as usize;
                forward(&s[row.clone()], &t[row], target, self.with_teacher)
            })
            .collect();
        Ok((CpuStorage::F32(out.concat()), Shape::from((n, 2))))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let op = TokenLossesGradient {
            targets: self.targets.clone(),
            with_teacher: self.with_teacher,
        };
        let grad = grad.detach().contiguous()?;
        let d = student
            .detach()
            .apply_op3_no_bwd(&teacher.detach(), &grad, &op)?;
        Ok((Some(d), None))
    }
}

/// The logits' gradient of [`TokenLosses`] given the gradient `(N, 2)` of its output.
struct TokenLossesGradient {
    targets: Vec<u32>,
    with_teacher: bool,
}

impl CustomOp3 for TokenLossesGradient {
    fn name(&self) -> &'static str {
        "token-losses-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, vocab) = l1.shape().dims2()?;
        let (s, t, g) = (
            values::<f32>(s1, l1)?,
            values::<f32>(s2, l2)?,
            values::<f32>(s3, l3)?,
        );
        let backward = backward_kernel();
        let mut out = vec![0f32; n * vocab];
        (out.par_chunks_mut(vocab).enumerate()).for_each(|(i, o)| {
            let row = i * vocab..(i + 1) * vocab;
            let target = self.targets[i] as usize;
            let gi = [g[2 * i], g[2 * i + 1]];
            backward(&s[row.clone()], &t[row], target, gi, self.with_teacher, o);
        });
        Ok((CpuStorage::F32(out), Shape::from((n, vocab))))
    }
}

type Forward = fn(&[f32], &[f32], usize, bool) -> [f32; 2];
type Backward = fn(&[f32], &[f32], usize, [f32; 2], bool, &mut [f32]);

/// The forward row kernel compiled for the widest vector instructions this CPU has.
fn forward_kernel() -> Forward {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        return |s, t, target, teacher| unsafe { forward_avx512(s, t, target, teacher) };
    }
    row_losses
}

/// The backward row kernel compiled for the widest vector instructions this CPU has.
fn backward_kernel() -> Backward {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        return |s, t, target, g, teacher, out| unsafe {
            backward_avx512(s, t, target, g, teacher, out)
        };
    }
    row_gradient
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn forward_avx512(s: &[f32], t: &[f32], target: usize, with_teacher: bool) -> [f32; 2] {
    row_losses(s, t, target, with_teacher)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn backward_avx512(
    s: &[f32],
    t: &[f32],
    target: usize,
    g: [f32; 2],
    with_teacher: bool,
    out: &mut [f32],
) {
    row_gradient(s, t, target, g, with_teacher, out)
}
