//! The selective scan on the CPU, forward and backward (see [`crate::selective`] for the maths
//! and the buffer layouts).
//!
//! The forward runs rows `(b, d)` in parallel, each a serial loop over time with its `N` states.
//! The backward walks each row's checkpoint stretches from the last to the first: it rebuilds
//! the stretch's states from the saved checkpoint, then runs the adjoint recurrence backwards
//! through it. With `g[t]` the gradient reaching `h[t]` (complex values use PyTorch's convention
//! `∂L/∂re + i·∂L/∂im`, and `conj` is the identity for real ones), `a[t] = exp(Δ[t]·A)`,
//! `ḡy[t]` the gradient reaching `y[t]` and `f` the output factor (1 real, 2 complex):
//!
//! ```text
//! g[t]  = f·ḡy[t]·conj(C[t]) + conj(a[t+1])·g[t+1]        (g[L-1] gets the last state's gradient)
//! ∂C[t] = f·ḡy[t]·conj(h[t])           ∂B[t] = Δ[t]·u[t]·g[t]
//! ∂u[t] = D·ḡy[t] + Δ[t]·Re(conj(B[t])·g[t])
//! ∂Δ[t] = u[t]·Re(conj(B[t])·g[t]) + Re(conj(A)·w[t]),   w[t] = conj(a[t])·g[t]·conj(h[t-1])
//! ∂A    = Σ_t Δ[t]·w[t]                ∂h0 = conj(a[0])·g[0]
//! ```
//!
//! Determinism: gradients that sum over rows (`A`, `D`, `delta_bias`, constant `B`/`C` over the
//! batch; variable `B`/`C` over the channels of a group) are summed in an order fixed by the
//! problem's shape alone: per-row (or per-unit) partial sums, then an ordered reduction.

mod backward;
mod num;

use std::marker::PhantomData;

use rayon::prelude::*;

pub use backward::selective_scan_backward;
use num::{sigmoid, Cx, Num, Rl};

use super::element::{Accumulator, Element, Real};
use crate::error::{Error, Result};
use crate::layout::ScanShape;
use crate::selective::{
    strided_extent, Bc, BcGrad, SelectiveInputs, SelectiveOutputs, SelectiveProblem, Seq,
    CHECKPOINT_STEPS,
};

/// Below this many state updates (`batch·dim·L·N`) a call runs on the calling thread.
const MIN_PARALLEL_WORK: usize = 1 << 15;
/// `softplus(r) = r` above this, as in PyTorch.
const SOFTPLUS_THRESHOLD: f32 = 20.0;

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

fn check_exact(arg: &'static str, got: usize, expected: usize) -> Result<()> {
    ScanShape::check_len(arg, got, expected)
}

fn check_strided<const R: usize>(
    arg: &'static str,
    len: usize,
    shape: [usize; R],
    strides: [usize; R],
) -> Result<()> {
    match strided_extent(shape, strides) {
        Some(need) if need <= len => Ok(()),
        need => Err(Error::invalid(
            arg,
            format!(
                "a buffer spanning shape {shape:?} with strides {strides:?} ({} elements), got {len}",
                need.map_or("more than usize::MAX".to_string(), |n| n.to_string())
            ),
        )),
    }
}

fn seq_shape(p: &SelectiveProblem) -> [usize; 3] {
    [p.batch, p.dim, p.len]
}

fn check_bc<T, W>(arg: &'static str, p: &SelectiveProblem, bc: &Bc<&[T], &[W]>) -> Result<()> {
    match bc {
        Bc::Constant(w) => check_exact(arg, w.len(), p.param_numel()),
        Bc::Variable { tensor, groups } => {
            p.check_groups(arg, *groups)?;
            let shape = [p.batch, *groups, p.dstate, p.len * p.parts()];
            check_strided(arg, tensor.data.len(), shape, tensor.strides)
        }
    }
}

fn check_optional(arg: &'static str, got: Option<usize>, expected: usize) -> Result<()> {
    got.map_or(Ok(()), |n| check_exact(arg, n, expected))
}

fn check_inputs<T, W>(p: &SelectiveProblem, x: &SelectiveInputs<&[T], &[W]>) -> Result<()> {
    check_strided("u", x.u.data.len(), seq_shape(p), x.u.strides)?;
    check_strided("delta", x.delta.data.len(), seq_shape(p), x.delta.strides)?;
    if let Some(z) = &x.z {
        check_strided("z", z.data.len(), seq_shape(p), z.strides)?;
    }
    check_exact("A", x.a.len(), p.param_numel())?;
    check_bc("B", p, &x.b)?;
    check_bc("C", p, &x.c)?;
    check_optional("D", x.d.map(<[W]>::len), p.dim)?;
    check_optional("delta_bias", x.delta_bias.map(<[W]>::len), p.dim)?;
    check_optional("initial", x.initial.map(<[W]>::len), p.state_numel())
}

fn check_grad_bc<T, W>(
    arg: &'static str,
    p: &SelectiveProblem,
    input: &Bc<&[T], &[W]>,
    grad: &BcGrad<&mut [T], &mut [W]>,
) -> Result<()> {
    match (input, grad) {
        (Bc::Constant(_), BcGrad::Constant(g)) => check_exact(arg, g.len(), p.param_numel()),
        (Bc::Variable { groups, .. }, BcGrad::Variable(g)) => {
            check_exact(arg, g.len(), p.variable_numel(*groups))
        }
        _ => Err(Error::invalid(
            arg,
            "a gradient of the same kind (constant or variable) as the input",
        )),
    }
}

/// An optional gradient is allowed only for an input that is present.
fn check_grad_optional(
    arg: &'static str,
    input_present: bool,
    got: Option<usize>,
    expected: usize,
) -> Result<()> {
    match got {
        Some(_) if !input_present => Err(Error::invalid(
            arg,
            "no gradient buffer: the matching input is absent",
        )),
        _ => check_optional(arg, got, expected),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the inputs
// ---------------------------------------------------------------------------------------------

/// The inputs of one call with typed accessors; `S` is the state arithmetic.
struct Ctx<'a, T: Element, S> {
    p: SelectiveProblem,
    x: SelectiveInputs<&'a [T], &'a [T::Acc]>,
    _state: PhantomData<S>,
}

/// Where one row `(b, d)` finds its inputs: offsets computed once per row, so the per-step
/// accessors do no division.
#[derive(Clone, Copy, Debug)]
struct Row<W> {
    /// Flat row index `b·dim + d`.
    index: usize,
    d: usize,
    /// Offsets of the row in `u`, `delta`, `z` (0 when absent).
    u: usize,
    delta: usize,
    z: usize,
    /// `B` and `C` of the row: the number index of `(d, 0)` (constant) or the element offset of
    /// `(b, group, 0, 0)` (variable).
    b: usize,
    c: usize,
    bias: W,
    d_skip: W,
}

impl<T: Element, S: Num<T::Acc>> Ctx<'_, T, S> {
    fn row(&self, index: usize) -> Row<T::Acc> {
        let (b, d) = (index / self.p.dim, index % self.p.dim);
        let seq_base = |s: &Seq<&[T]>| b * s.strides[0] + d * s.strides[1];
        let bc_base = |bc: &Bc<&[T], &[T::Acc]>| match bc {
            Bc::Constant(_) => d * self.p.dstate,
            Bc::Variable { tensor, groups } => {
                let g = d / (self.p.dim / groups);
                b * tensor.strides[0] + g * tensor.strides[1]
            }
        };
        Row {
            index,
            d,
            u: seq_base(&self.x.u),
            delta: seq_base(&self.x.delta),
            z: self.x.z.as_ref().map_or(0, seq_base),
            b: bc_base(&self.x.b),
            c: bc_base(&self.x.c),
            bias: self.x.delta_bias.map_or(T::Acc::ZERO, |v| v[d]),
            d_skip: self.x.d.map_or(T::Acc::ZERO, |v| v[d]),
        }
    }

    /// Element `t` of a sequence whose row starts at `base`.
    #[inline(always)]
    fn seq(s: &Seq<&[T]>, base: usize, t: usize) -> T::Acc {
        s.data[base + t * s.strides[2]].to_acc()
    }

    /// `(r, Δ)` at step `t` of `row`: the biased delta and its (optionally softplus'd) value.
    #[inline(always)]
    fn delta(&self, row: &Row<T::Acc>, t: usize) -> (T::Acc, T::Acc) {
        let r = Self::seq(&self.x.delta, row.delta, t) + row.bias;
        if self.p.delta_softplus && r <= T::Acc::from_f32(SOFTPLUS_THRESHOLD) {
            (r, r.exp().ln_1p())
        } else {
            (r, r)
        }
    }

    /// `B[t, n]` or `C[t, n]` of a row, `base` being the row's [`Row::b`] or [`Row::c`].
    #[inline(always)]
    fn bc(bc: &Bc<&[T], &[T::Acc]>, base: usize, t: usize, n: usize) -> S {
        match bc {
            Bc::Constant(w) => S::read(w, base + n),
            Bc::Variable { tensor, .. } => {
                let [_, _, sn, st] = tensor.strides;
                let at = base + n * sn;
                if S::PARTS == 1 {
                    S::from_parts(tensor.data[at + t * st].to_acc(), T::Acc::ZERO)
                } else {
                    S::from_parts(
                        tensor.data[at + 2 * t * st].to_acc(),
                        tensor.data[at + (2 * t + 1) * st].to_acc(),
                    )
                }
            }
        }
    }

    /// Advances `row` through step `t`: `h ← exp(Δ·A)·h + Δ·u·B[t]` with `a` = `A[d]`, calling
    /// `seen(k, decay, h[k])` per state; returns `y[t]` before the gate `silu(z)`.
    #[inline(always)]
    fn step(
        &self,
        row: &Row<T::Acc>,
        t: usize,
        a: &[S],
        h: &mut [S],
        mut seen: impl FnMut(usize, S, S),
    ) -> T::Acc {
        let (_, dt) = self.delta(row, t);
        let u = Self::seq(&self.x.u, row.u, t);
        let du = dt * u;
        let mut y = T::Acc::ZERO;
        for (k, (hk, &ak)) in h.iter_mut().zip(a).enumerate() {
            let decay = S::exp_scaled(dt, ak);
            *hk = decay
                .mul(*hk)
                .add(Self::bc(&self.x.b, row.b, t, k).scale(du));
            seen(k, decay, *hk);
            y = y + Self::bc(&self.x.c, row.c, t, k).mul(*hk).re();
        }
        y * S::out_factor() + row.d_skip * u
    }

    fn a_row(&self, d: usize) -> Vec<S> {
        (0..self.p.dstate)
            .map(|n| S::read(self.x.a, d * self.p.dstate + n))
            .collect()
    }

    fn state_row(&self, state: Option<&[T::Acc]>, row: usize) -> Vec<S> {
        let n = self.p.dstate;
        (0..n)
            .map(|k| state.map_or(S::ZERO, |s| S::read(s, row * n + k)))
            .collect()
    }
}

/// Splits an optional buffer into `rows` consecutive pieces of `per_row` elements.
fn split_rows<W>(buf: Option<&mut [W]>, rows: usize, per_row: usize) -> Vec<Option<&mut [W]>> {
    match buf {
        None => (0..rows).map(|_| None).collect(),
        Some(buf) if per_row == 0 => {
            let _ = buf;
            (0..rows).map(|_| Some(<&mut [W]>::default())).collect()
        }
        Some(buf) => buf.chunks_mut(per_row).map(Some).collect(),
    }
}

/// Runs `f` on every item, in parallel when `parallel`.
fn for_each<I: Send>(items: Vec<I>, parallel: bool, f: impl Fn(I) + Send + Sync) {
    if parallel {
        items.into_par_iter().for_each(f);
    } else {
        items.into_iter().for_each(f);
    }
}

fn worth_parallel(p: &SelectiveProblem) -> bool {
    p.seq_numel().saturating_mul(p.dstate) >= MIN_PARALLEL_WORK
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

/// One row's outputs: `out[L]`, and optionally its last state and checkpoints.
struct RowOut<'a, T, W> {
    out: &'a mut [T],
    last: Option<&'a mut [W]>,
    checkpoints: Option<&'a mut [W]>,
}

fn forward_row<T: Element, S: Num<T::Acc>>(
    ctx: &Ctx<'_, T, S>,
    row: usize,
    o: RowOut<'_, T, T::Acc>,
) {
    let n = ctx.p.dstate;
    let row = ctx.row(row);
    let a = ctx.a_row(row.d);
    let mut h = ctx.state_row(ctx.x.initial, row.index);
    let mut checkpoints = o.checkpoints;
    for (t, out) in o.out.iter_mut().enumerate() {
        if t % CHECKPOINT_STEPS == 0 {
            if let Some(ck) = checkpoints.as_deref_mut() {
                let base = (t / CHECKPOINT_STEPS) * n;
                for (k, hk) in h.iter().enumerate() {
                    hk.write(ck, base + k);
                }
            }
        }
        let mut y = ctx.step(&row, t, &a, &mut h, |_, _, _| {});
        if let Some(z) = &ctx.x.z {
            let zt = Ctx::<T, S>::seq(z, row.z, t);
            y = y * zt * sigmoid(zt);
        }
        *out = T::from_acc(y);
    }
    if let Some(last) = o.last {
        for (k, hk) in h.iter().enumerate() {
            hk.write(last, k);
        }
    }
}

fn forward_impl<T: Element, S: Num<T::Acc>>(
    p: &SelectiveProblem,
    x: SelectiveInputs<&[T], &[T::Acc]>,
    o: SelectiveOutputs<&mut [T], &mut [T::Acc]>,
) {
    let ctx = Ctx::<T, S> {
        p: *p,
        x,
        _state: PhantomData,
    };
    let rows = p.batch * p.dim;
    let state = p.dstate * p.parts();
    let outs = split_rows(Some(o.out), rows, p.len);
    let lasts = split_rows(o.last_state, rows, state);
    let checkpoints = split_rows(o.checkpoints, rows, state * p.checkpoint_count());
    let items: Vec<_> = outs
        .into_iter()
        .zip(lasts)
        .zip(checkpoints)
        .enumerate()
        .map(|(row, ((out, last), checkpoints))| {
            (
                row,
                RowOut {
                    out: out.unwrap_or_default(),
                    last,
                    checkpoints,
                },
            )
        })
        .collect();
    for_each(items, worth_parallel(p), |(row, o)| {
        forward_row(&ctx, row, o)
    });
}

/// Runs the selective scan: `out`, and when asked the last state and the checkpoints the
/// backward pass needs. Input strides are honoured; outputs are C-contiguous.
///
/// ```
/// use ferroscan::cpu::selective_scan::selective_scan_forward;
/// use ferroscan::selective::{Bc, Seq, SelectiveInputs, SelectiveOutputs, SelectiveProblem};
///
/// // One row, two steps, one real state: A = -1, B = C = 1, delta = ln 2 (so exp(ΔA) = 1/2).
/// let p = SelectiveProblem::new((1, 1, 2, 1), false, false)?;
/// let (u, delta) = ([1.0f32, 1.0], [std::f32::consts::LN_2; 2]);
/// let (a, bc) = ([-1.0f32], [1.0f32]);
/// let mut out = [0.0f32; 2];
/// let inputs = SelectiveInputs {
///     u: Seq::contiguous(&u[..], &p),
///     delta: Seq::contiguous(&delta[..], &p),
///     a: &a[..],
///     b: Bc::Constant(&bc[..]),
///     c: Bc::Constant(&bc[..]),
///     d: None,
///     z: None,
///     delta_bias: None,
///     initial: None,
/// };
/// let outputs = SelectiveOutputs { out: &mut out[..], last_state: None, checkpoints: None };
/// selective_scan_forward(&p, inputs, outputs)?;
/// let ln2 = std::f32::consts::LN_2;
/// assert!((out[0] - ln2).abs() < 1e-6 && (out[1] - 1.5 * ln2).abs() < 1e-6);
/// # Ok::<(), ferroscan::Error>(())
/// ```
pub fn selective_scan_forward<T: Element>(
    problem: &SelectiveProblem,
    inputs: SelectiveInputs<&[T], &[T::Acc]>,
    outputs: SelectiveOutputs<&mut [T], &mut [T::Acc]>,
) -> Result<()> {
    let p = problem;
    check_inputs(p, &inputs)?;
    check_exact("out", outputs.out.len(), p.seq_numel())?;
    check_optional(
        "last_state",
        outputs.last_state.as_deref().map(<[T::Acc]>::len),
        p.state_numel(),
    )?;
    check_optional(
        "checkpoints",
        outputs.checkpoints.as_deref().map(<[T::Acc]>::len),
        p.checkpoint_numel(),
    )?;
    if p.complex {
        forward_impl::<T, Cx<T::Acc>>(p, inputs, outputs);
    } else {
        forward_impl::<T, Rl<T::Acc>>(p, inputs, outputs);
    }
    Ok(())
}
