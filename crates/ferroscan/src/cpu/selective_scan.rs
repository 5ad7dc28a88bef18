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

use std::marker::PhantomData;

use rayon::prelude::*;

use super::element::{Accumulator, Element, Real};
use crate::error::{Error, Result};
use crate::layout::ScanShape;
use crate::selective::{
    strided_extent, Bc, BcGrad, SelectiveGradInputs, SelectiveGradOutputs, SelectiveInputs,
    SelectiveOutputs, SelectiveProblem, Seq, CHECKPOINT_STEPS,
};

/// Below this many state updates (`batch·dim·L·N`) a call runs on the calling thread.
const MIN_PARALLEL_WORK: usize = 1 << 15;
/// Units of work the backward aims for, so that rows sharing a variable `B`/`C` group still
/// spread over threads (a function of the shape only, so results do not depend on the pool).
const BACKWARD_UNITS: usize = 64;
/// `softplus(r) = r` above this, as in PyTorch.
const SOFTPLUS_THRESHOLD: f32 = 20.0;

// ---------------------------------------------------------------------------------------------
// Real and complex state arithmetic
// ---------------------------------------------------------------------------------------------

/// The arithmetic of one state: real (`Rl`) or complex (`Cx`) over the weight type `W`.
trait Num<W: Real>: Copy + Send + Sync {
    /// Weight values per number.
    const PARTS: usize;
    const ZERO: Self;
    fn from_parts(re: W, im: W) -> Self;
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn scale(self, w: W) -> Self;
    fn conj(self) -> Self;
    fn re(self) -> W;
    /// `exp(Δ·a)` for a real `Δ`.
    fn exp_scaled(delta: W, a: Self) -> Self;
    /// The factor of `Re(Σ C·h)` in `y`: 1 real, 2 complex.
    fn out_factor() -> W;

    /// Number `i` of an interleaved weight buffer.
    #[inline(always)]
    fn read(buf: &[W], i: usize) -> Self {
        if Self::PARTS == 1 {
            Self::from_parts(buf[i], W::ZERO)
        } else {
            Self::from_parts(buf[2 * i], buf[2 * i + 1])
        }
    }
    /// Adds `v` to number `i` of an interleaved weight buffer.
    #[inline(always)]
    fn add_into(self, buf: &mut [W], i: usize) {
        let v = Self::read(buf, i).add(self);
        v.write(buf, i);
    }
    fn write(self, buf: &mut [W], i: usize);
}

#[derive(Clone, Copy, Debug)]
struct Rl<W>(W);

#[derive(Clone, Copy, Debug)]
struct Cx<W> {
    re: W,
    im: W,
}

impl<W: Real> Num<W> for Rl<W> {
    const PARTS: usize = 1;
    const ZERO: Self = Rl(W::ZERO);
    #[inline(always)]
    fn from_parts(re: W, _: W) -> Self {
        Rl(re)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Rl(self.0 + o.0)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Rl(self.0 * o.0)
    }
    #[inline(always)]
    fn scale(self, w: W) -> Self {
        Rl(self.0 * w)
    }
    #[inline(always)]
    fn conj(self) -> Self {
        self
    }
    #[inline(always)]
    fn re(self) -> W {
        self.0
    }
    #[inline(always)]
    fn exp_scaled(delta: W, a: Self) -> Self {
        Rl((delta * a.0).exp())
    }
    #[inline(always)]
    fn out_factor() -> W {
        W::ONE
    }
    #[inline(always)]
    fn write(self, buf: &mut [W], i: usize) {
        buf[i] = self.0;
    }
}

impl<W: Real> Num<W> for Cx<W> {
    const PARTS: usize = 2;
    const ZERO: Self = Cx {
        re: W::ZERO,
        im: W::ZERO,
    };
    #[inline(always)]
    fn from_parts(re: W, im: W) -> Self {
        Cx { re, im }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Cx {
            re: self.re + o.re,
            im: self.im + o.im,
        }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Cx {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
    #[inline(always)]
    fn scale(self, w: W) -> Self {
        Cx {
            re: self.re * w,
            im: self.im * w,
        }
    }
    #[inline(always)]
    fn conj(self) -> Self {
        Cx {
            re: self.re,
            im: -self.im,
        }
    }
    #[inline(always)]
    fn re(self) -> W {
        self.re
    }
    #[inline(always)]
    fn exp_scaled(delta: W, a: Self) -> Self {
        let magnitude = (delta * a.re).exp();
        let (sin, cos) = (delta * a.im).sin_cos();
        Cx {
            re: magnitude * cos,
            im: magnitude * sin,
        }
    }
    #[inline(always)]
    fn out_factor() -> W {
        W::ONE + W::ONE
    }
    #[inline(always)]
    fn write(self, buf: &mut [W], i: usize) {
        buf[2 * i] = self.re;
        buf[2 * i + 1] = self.im;
    }
}

#[inline(always)]
fn sigmoid<W: Real>(x: W) -> W {
    W::ONE / (W::ONE + (-x).exp())
}

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

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// Where a row's partial parameter gradients live in its slice of the partials buffer:
/// `[∂A: N][∂B: N][∂C: N]` numbers (constant B/C only), then `∂D`, `∂delta_bias` (real).
struct ParamSlots {
    n: usize,
    parts: usize,
}

impl ParamSlots {
    fn per_row(&self) -> usize {
        3 * self.n * self.parts + 2
    }
    /// Number offsets (in units of the state type) of the three `N`-vectors.
    fn a(&self) -> usize {
        0
    }
    fn b(&self) -> usize {
        self.n
    }
    fn c(&self) -> usize {
        2 * self.n
    }
    /// Weight offsets of the two scalars.
    fn d(&self) -> usize {
        3 * self.n * self.parts
    }
    fn bias(&self) -> usize {
        3 * self.n * self.parts + 1
    }
}

/// How the backward groups rows into units: `rows_per_unit` consecutive channels of one batch
/// element, all in one group of each variable `B`/`C`.
#[derive(Clone, Copy, Debug)]
struct UnitPlan {
    rows_per_unit: usize,
    units: usize,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl UnitPlan {
    fn new(p: &SelectiveProblem, groups: [Option<usize>; 2]) -> Self {
        let rows = p.batch * p.dim;
        let span = groups
            .iter()
            .flatten()
            .fold(0, |acc, &g| gcd(acc, p.dim / g));
        let rows_per_unit = if span == 0 || rows == 0 {
            1 // no variable B/C: every row is independent
        } else {
            // The largest divisor of the span that still leaves BACKWARD_UNITS units.
            (1..=span)
                .rev()
                .find(|&r| span % r == 0 && rows / r >= BACKWARD_UNITS)
                .unwrap_or(1)
        };
        UnitPlan {
            rows_per_unit,
            units: rows / rows_per_unit,
        }
    }
}

/// One unit's outputs: `R` consecutive rows' gradients and the unit's partial sums.
struct UnitOut<'a, T, W> {
    du: &'a mut [T],
    ddelta: &'a mut [T],
    dz: Option<&'a mut [T]>,
    dinitial: Option<&'a mut [W]>,
    params: &'a mut [W],
    var_b: Option<&'a mut [W]>,
    var_c: Option<&'a mut [W]>,
}

/// Per-row working memory, reused across the rows of a unit.
struct Work<S, W> {
    a: Vec<S>,
    start: Vec<S>,
    carry: Vec<S>,
    hs: Vec<S>,
    decays: Vec<S>,
    ys: Vec<W>,
}

struct Backward<'a, T: Element, S> {
    ctx: Ctx<'a, T, S>,
    g: SelectiveGradInputs<&'a [T], &'a [T::Acc]>,
    slots: ParamSlots,
}

impl<T: Element, S: Num<T::Acc>> Backward<'_, T, S> {
    /// Rebuilds the states of steps `t0..t1` of `row` from `work.start`: states, decays
    /// and `y` (before gating) per step.
    fn rebuild(&self, row: &Row<T::Acc>, (t0, t1): (usize, usize), work: &mut Work<S, T::Acc>) {
        let n = self.ctx.p.dstate;
        let mut h = work.start.clone();
        for t in t0..t1 {
            let j = t - t0;
            let (decays, hs) = (
                &mut work.decays[j * n..(j + 1) * n],
                &mut work.hs[j * n..(j + 1) * n],
            );
            work.ys[j] = self.ctx.step(row, t, &work.a, &mut h, |k, decay, hk| {
                decays[k] = decay;
                hs[k] = hk;
            });
        }
    }

    fn row(
        &self,
        row: usize,
        r: usize,
        o: &mut UnitOut<'_, T, T::Acc>,
        work: &mut Work<S, T::Acc>,
    ) {
        let ctx = &self.ctx;
        let p = &ctx.p;
        let (n, len) = (p.dstate, p.len);
        let view = ctx.row(row);
        let slots = &self.slots;
        let params = &mut o.params[r * slots.per_row()..(r + 1) * slots.per_row()];
        let du_row = &mut o.du[r * len..(r + 1) * len];
        let ddelta_row = &mut o.ddelta[r * len..(r + 1) * len];
        let mut dz_row = o.dz.as_deref_mut().map(|v| &mut v[r * len..(r + 1) * len]);
        work.a = ctx.a_row(view.d);
        work.carry = ctx.state_row(self.g.grad_last, row);
        let grad_out_base =
            (row / p.dim) * self.g.grad_out.strides[0] + (row % p.dim) * self.g.grad_out.strides[1];
        let factor = S::out_factor();
        let threshold = T::Acc::from_f32(SOFTPLUS_THRESHOLD);
        let n_ck = p.checkpoint_count();
        for kc in (0..n_ck).rev() {
            let (t0, t1) = (
                kc * CHECKPOINT_STEPS,
                ((kc + 1) * CHECKPOINT_STEPS).min(len),
            );
            for k in 0..n {
                work.start[k] = S::read(self.g.checkpoints, (row * n_ck + kc) * n + k);
            }
            self.rebuild(&view, (t0, t1), work);
            for t in (t0..t1).rev() {
                let j = t - t0;
                let (r_t, dt) = ctx.delta(&view, t);
                let u = Ctx::<T, S>::seq(&ctx.x.u, view.u, t);
                let mut gy = Ctx::<T, S>::seq(&self.g.grad_out, grad_out_base, t);
                if let Some(z) = &ctx.x.z {
                    let zt = Ctx::<T, S>::seq(z, view.z, t);
                    let s = sigmoid(zt);
                    if let Some(dz) = dz_row.as_deref_mut() {
                        dz[t] = T::from_acc(
                            gy * work.ys[j] * s * (T::Acc::ONE + zt * (T::Acc::ONE - s)),
                        );
                    }
                    gy = gy * zt * s;
                }
                params[slots.d()] = params[slots.d()] + gy * u;
                let mut gu = gy * view.d_skip;
                let mut gdelta = T::Acc::ZERO;
                let gyf = gy * factor;
                for k in 0..n {
                    let c = Ctx::<T, S>::bc(&ctx.x.c, view.c, t, k);
                    let bk = Ctx::<T, S>::bc(&ctx.x.b, view.b, t, k);
                    let g = c.conj().scale(gyf).add(work.carry[k]);
                    let h = work.hs[j * n + k];
                    let h_prev = if j > 0 {
                        work.hs[(j - 1) * n + k]
                    } else {
                        work.start[k]
                    };
                    let grad_c = h.conj().scale(gyf);
                    match o.var_c.as_deref_mut() {
                        Some(acc) => grad_c.add_into(acc, k * len + t),
                        None => grad_c.add_into(params, slots.c() + k),
                    }
                    let grad_b = g.scale(dt * u);
                    match o.var_b.as_deref_mut() {
                        Some(acc) => grad_b.add_into(acc, k * len + t),
                        None => grad_b.add_into(params, slots.b() + k),
                    }
                    let through_b = bk.conj().mul(g).re();
                    gu = gu + dt * through_b;
                    gdelta = gdelta + u * through_b;
                    let decay = work.decays[j * n + k];
                    let w = decay.conj().mul(g).mul(h_prev.conj());
                    w.scale(dt).add_into(params, slots.a() + k);
                    gdelta = gdelta + work.a[k].conj().mul(w).re();
                    work.carry[k] = decay.conj().mul(g);
                }
                let gr = if p.delta_softplus && r_t <= threshold {
                    gdelta * sigmoid(r_t)
                } else {
                    gdelta
                };
                ddelta_row[t] = T::from_acc(gr);
                params[slots.bias()] = params[slots.bias()] + gr;
                du_row[t] = T::from_acc(gu);
            }
        }
        if let Some(dinit) = o.dinitial.as_deref_mut() {
            for (k, g) in work.carry.iter().enumerate() {
                g.write(dinit, r * n + k);
            }
        }
    }

    fn unit(&self, unit: usize, plan: &UnitPlan, mut o: UnitOut<'_, T, T::Acc>) {
        let n = self.ctx.p.dstate;
        let steps = CHECKPOINT_STEPS.min(self.ctx.p.len);
        let mut work = Work {
            a: vec![S::ZERO; n],
            start: vec![S::ZERO; n],
            carry: vec![S::ZERO; n],
            hs: vec![S::ZERO; steps * n],
            decays: vec![S::ZERO; steps * n],
            ys: vec![T::Acc::ZERO; steps],
        };
        for r in 0..plan.rows_per_unit {
            self.row(unit * plan.rows_per_unit + r, r, &mut o, &mut work);
        }
    }
}

/// `out[i] = Σ_k partial[k][i]` over the given partial buffers, in order.
fn sum_in_order<W: Accumulator>(out: &mut [W], partials: impl Iterator<Item = usize>, buf: &[W]) {
    out.iter_mut().for_each(|v| *v = W::ZERO);
    let len = out.len();
    for k in partials {
        for (o, &v) in out.iter_mut().zip(&buf[k * len..(k + 1) * len]) {
            *o = *o + v;
        }
    }
}

fn backward_impl<T: Element, S: Num<T::Acc>>(
    p: &SelectiveProblem,
    x: SelectiveInputs<&[T], &[T::Acc]>,
    g: SelectiveGradInputs<&[T], &[T::Acc]>,
    o: SelectiveGradOutputs<&mut [T], &mut [T::Acc]>,
) {
    let slots = ParamSlots {
        n: p.dstate,
        parts: S::PARTS,
    };
    let rows = p.batch * p.dim;
    let groups = [x.b.groups(), x.c.groups()];
    let plan = UnitPlan::new(p, groups);
    let r = plan.rows_per_unit;
    let state = p.dstate * S::PARTS;
    let per_unit_var = p.dstate * p.len * S::PARTS;
    let mut params = vec![T::Acc::ZERO; rows * slots.per_row()];
    let mut var_b = groups[0].map(|_| vec![T::Acc::ZERO; plan.units * per_unit_var]);
    let mut var_c = groups[1].map(|_| vec![T::Acc::ZERO; plan.units * per_unit_var]);
    let SelectiveGradOutputs {
        u: du,
        delta: ddelta,
        a: da,
        b: mut db,
        c: mut dc,
        d: mut dd,
        z: dz,
        delta_bias: mut dbias,
        initial: dinitial,
    } = o;
    {
        let units = plan.units;
        let dus = split_rows(Some(du), units, r * p.len);
        let ddeltas = split_rows(Some(ddelta), units, r * p.len);
        let dzs = split_rows(dz, units, r * p.len);
        let dinits = split_rows(dinitial, units, r * state);
        let param_rows = split_rows(Some(&mut params[..]), units, r * slots.per_row());
        let var_bs = split_rows(var_b.as_deref_mut(), units, per_unit_var);
        let var_cs = split_rows(var_c.as_deref_mut(), units, per_unit_var);
        let items: Vec<_> = dus
            .into_iter()
            .zip(ddeltas)
            .zip(dzs)
            .zip(dinits)
            .zip(param_rows)
            .zip(var_bs.into_iter().zip(var_cs))
            .enumerate()
            .map(
                |(unit, (((((du, ddelta), dz), dinitial), params), (var_b, var_c)))| {
                    (
                        unit,
                        UnitOut {
                            du: du.unwrap_or_default(),
                            ddelta: ddelta.unwrap_or_default(),
                            dz,
                            dinitial,
                            params: params.unwrap_or_default(),
                            var_b,
                            var_c,
                        },
                    )
                },
            )
            .collect();
        let bwd = Backward {
            ctx: Ctx::<T, S> {
                p: *p,
                x,
                _state: PhantomData,
            },
            g,
            slots: ParamSlots {
                n: p.dstate,
                parts: S::PARTS,
            },
        };
        for_each(items, worth_parallel(p), |(unit, out)| {
            bwd.unit(unit, &plan, out)
        });
    }

    // Ordered reductions: parameters over the batch, variable B/C over a group's units.
    let per_row = slots.per_row();
    let n = p.dstate;
    for d in 0..p.dim {
        let rows_of_d = (0..p.batch).map(|b| (b * p.dim + d) * per_row);
        let mut acc_a = vec![S::ZERO; n];
        let mut acc_b = vec![S::ZERO; n];
        let mut acc_c = vec![S::ZERO; n];
        let (mut acc_d, mut acc_bias) = (T::Acc::ZERO, T::Acc::ZERO);
        for base in rows_of_d {
            let row = &params[base..base + per_row];
            for k in 0..n {
                acc_a[k] = acc_a[k].add(S::read(row, slots.a() + k));
                acc_b[k] = acc_b[k].add(S::read(row, slots.b() + k));
                acc_c[k] = acc_c[k].add(S::read(row, slots.c() + k));
            }
            acc_d = acc_d + row[slots.d()];
            acc_bias = acc_bias + row[slots.bias()];
        }
        for k in 0..n {
            acc_a[k].write(da, d * n + k);
            if let BcGrad::Constant(db) = &mut db {
                acc_b[k].write(db, d * n + k);
            }
            if let BcGrad::Constant(dc) = &mut dc {
                acc_c[k].write(dc, d * n + k);
            }
        }
        if let Some(dd) = dd.as_deref_mut() {
            dd[d] = acc_d;
        }
        if let Some(dbias) = dbias.as_deref_mut() {
            dbias[d] = acc_bias;
        }
    }
    for (grad, partials, groups) in [(db, &var_b, groups[0]), (dc, &var_c, groups[1])] {
        let (BcGrad::Variable(out), Some(partials), Some(groups)) = (grad, partials, groups) else {
            continue;
        };
        if per_unit_var == 0 {
            continue;
        }
        let units_per_group = p.dim / groups / r;
        let units_per_batch = p.dim / r;
        let chunk = per_unit_var.max(1);
        let reduce = |(bg, out): (usize, &mut [T])| {
            let (b, g) = (bg / groups, bg % groups);
            let first = b * units_per_batch + g * units_per_group;
            let mut acc = vec![T::Acc::ZERO; per_unit_var];
            sum_in_order(&mut acc, first..first + units_per_group, partials);
            for (o, v) in out.iter_mut().zip(acc) {
                *o = T::from_acc(v);
            }
        };
        if worth_parallel(p) {
            out.par_chunks_mut(chunk).enumerate().for_each(reduce);
        } else {
            out.chunks_mut(chunk).enumerate().for_each(reduce);
        }
    }
}

/// Gradients of the selective scan with respect to every input, from the forward's inputs, its
/// checkpoints and the gradients of `out` and of the last state. Deterministic: the same inputs
/// give bit-identical gradients, whatever the number of threads.
pub fn selective_scan_backward<T: Element>(
    problem: &SelectiveProblem,
    inputs: SelectiveInputs<&[T], &[T::Acc]>,
    grads: SelectiveGradInputs<&[T], &[T::Acc]>,
    outputs: SelectiveGradOutputs<&mut [T], &mut [T::Acc]>,
) -> Result<()> {
    let p = problem;
    check_inputs(p, &inputs)?;
    check_strided(
        "grad_out",
        grads.grad_out.data.len(),
        seq_shape(p),
        grads.grad_out.strides,
    )?;
    check_optional(
        "grad_last",
        grads.grad_last.map(<[T::Acc]>::len),
        p.state_numel(),
    )?;
    check_exact("checkpoints", grads.checkpoints.len(), p.checkpoint_numel())?;
    check_exact("grad_u", outputs.u.len(), p.seq_numel())?;
    check_exact("grad_delta", outputs.delta.len(), p.seq_numel())?;
    check_exact("grad_A", outputs.a.len(), p.param_numel())?;
    check_grad_bc("grad_B", p, &inputs.b, &outputs.b)?;
    check_grad_bc("grad_C", p, &inputs.c, &outputs.c)?;
    check_grad_optional(
        "grad_D",
        inputs.d.is_some(),
        outputs.d.as_deref().map(<[T::Acc]>::len),
        p.dim,
    )?;
    check_grad_optional(
        "grad_z",
        inputs.z.is_some(),
        outputs.z.as_deref().map(<[T]>::len),
        p.seq_numel(),
    )?;
    check_grad_optional(
        "grad_delta_bias",
        inputs.delta_bias.is_some(),
        outputs.delta_bias.as_deref().map(<[T::Acc]>::len),
        p.dim,
    )?;
    check_grad_optional(
        "grad_initial",
        inputs.initial.is_some(),
        outputs.initial.as_deref().map(<[T::Acc]>::len),
        p.state_numel(),
    )?;
    if p.complex {
        backward_impl::<T, Cx<T::Acc>>(p, inputs, grads, outputs);
    } else {
        backward_impl::<T, Rl<T::Acc>>(p, inputs, grads, outputs);
    }
    Ok(())
}
