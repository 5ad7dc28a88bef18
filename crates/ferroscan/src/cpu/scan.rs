//! First-order scan on the CPU: `h[t] = a[t]·h[t-1] + x[t]`, forward and backward.
//!
//! Buffers are C-contiguous `(outer, len, inner)` tensors (see [`crate::layout`]);
//! states are `(outer, inner)`.
//!
//! The backward of `h[t] = a[t]·h[t-1] + x[t]` (forward direction) with upstream
//! gradients `gh[t]` (of `h`) and `gf` (of the final state) is the reverse scan
//! `g[t] = a[t+1]·g[t+1] + gh[t]` started from `g[L] = gf` (with `a[L] = 1`), and
//! `∂x[t] = g[t]`, `∂a[t] = g[t]·h[t-1]`, `∂h0 = a[0]·g[0]`. A reversed scan mirrors it.

use super::chunked::{run, Recurrence};
use super::element::{Accumulator, Element};
use super::fused;
pub use crate::args::{ScanGradInputs, ScanGradOutputs, ScanInputs, ScanOutputs};
use crate::error::Result;
use crate::layout::{ScanProblem, ScanShape};

fn check_tensor(arg: &'static str, buf_len: usize, shape: &ScanShape) -> Result<()> {
    ScanShape::check_len(arg, buf_len, shape.numel())
}

fn check_state(arg: &'static str, buf_len: Option<usize>, shape: &ScanShape) -> Result<()> {
    buf_len.map_or(Ok(()), |n| {
        ScanShape::check_len(arg, n, shape.state_numel())
    })
}

#[inline(always)]
fn at(shape: &ScanShape, p: usize, t: usize, q: usize) -> usize {
    (p * shape.len + t) * shape.inner + q
}

#[inline(always)]
fn state_or_zero<T: Element>(state: Option<&[T]>, shape: &ScanShape, p: usize, q: usize) -> T::Acc {
    state.map_or(T::Acc::ZERO, |s| s[p * shape.inner + q].to_acc())
}

/// `h[t] = a[t]·h[t-1] + x[t]` over one contiguous stretch (descending when `reverse`), in
/// multiply-add steps: the loop is bound by the latency of that dependency chain, which a fused
/// multiply-add halves (`FUSED`, only inside an FMA-enabled function; see [`fused`]).
#[inline(always)]
fn forward_row<T: Element, const FUSED: bool>(
    gates: &[T],
    tokens: &[T],
    out: &mut [T],
    s: &mut T::Acc,
    reverse: bool,
) {
    let steps = out.iter_mut().zip(gates).zip(tokens);
    let step = |((h, &g), &x): ((&mut T, &T), &T)| {
        *s = if FUSED {
            g.to_acc().mul_add(*s, x.to_acc())
        } else {
            g.to_acc() * *s + x.to_acc()
        };
        *h = T::from_acc(*s);
    };
    if reverse {
        steps.rev().for_each(step);
    } else {
        steps.for_each(step);
    }
}

struct Forward<'a, T> {
    shape: ScanShape,
    reverse: bool,
    inputs: ScanInputs<&'a [T]>,
}

impl<T: Element> Recurrence<T, 1> for Forward<'_, T> {
    fn descending(&self) -> bool {
        self.reverse
    }
    fn initial(&self, p: usize, q: usize) -> T::Acc {
        state_or_zero(self.inputs.initial, &self.shape, p, q)
    }
    #[inline(always)]
    fn gate(&self, i: usize, _: usize) -> T::Acc {
        self.inputs.gates[i].to_acc()
    }
    #[inline(always)]
    fn token(&self, i: usize) -> T::Acc {
        self.inputs.tokens[i].to_acc()
    }
    #[inline(always)]
    fn emit(&self, _: (usize, usize, usize), s: T::Acc, outs: &mut [&mut [T]; 1], at: usize) {
        outs[0][at] = T::from_acc(s);
    }
    fn finish(&self, _: usize, _: usize, s: T::Acc) -> T::Acc {
        s
    }
    fn sweep_row(
        &self,
        p: usize,
        len: usize,
        (t_lo, t_hi): (usize, usize),
        s: &mut T::Acc,
        outs: &mut [&mut [T]; 1],
    ) {
        let range = p * len + t_lo..p * len + t_hi;
        let (gates, tokens) = (
            &self.inputs.gates[range.clone()],
            &self.inputs.tokens[range],
        );
        let out = &mut outs[0][..t_hi - t_lo];
        fused::dispatch!(forward_row(gates, tokens, out, s, self.reverse));
    }
}

/// Computes `h` (and the final state) of a first-order scan.
///
/// ```
/// use ferroscan::cpu::scan::{scan_forward, ScanInputs, ScanOutputs};
/// use ferroscan::{ScanProblem, ScanShape};
///
/// let problem = ScanProblem { shape: ScanShape::new(1, 3, 1)?, reverse: false };
/// let (gates, tokens) = ([0.5f32, 0.5, 0.5], [1.0f32, 1.0, 1.0]);
/// let mut hidden = [0.0f32; 3];
/// let inputs = ScanInputs { gates: &gates[..], tokens: &tokens[..], initial: None };
/// scan_forward(&problem, inputs, ScanOutputs { hidden: &mut hidden[..], final_state: None })?;
/// assert_eq!(hidden, [1.0, 1.5, 1.75]);
/// # Ok::<(), ferroscan::Error>(())
/// ```
pub fn scan_forward<T: Element>(
    problem: &ScanProblem,
    inputs: ScanInputs<&[T]>,
    outputs: ScanOutputs<&mut [T]>,
) -> Result<()> {
    let shape = problem.shape;
    check_tensor("gates", inputs.gates.len(), &shape)?;
    check_tensor("tokens", inputs.tokens.len(), &shape)?;
    check_tensor("hidden", outputs.hidden.len(), &shape)?;
    check_state("initial", inputs.initial.map(<[T]>::len), &shape)?;
    check_state(
        "final_state",
        outputs.final_state.as_deref().map(<[T]>::len),
        &shape,
    )?;
    let rec = Forward {
        shape,
        reverse: problem.reverse,
        inputs,
    };
    run(&shape, &rec, [outputs.hidden], outputs.final_state);
    Ok(())
}

/// One sequence's inputs of the backward: `a`, `h`, `∂h`, `h0`, and its length.
struct BackwardRow<'a, T: Element> {
    a: &'a [T],
    h: &'a [T],
    gh: &'a [T],
    h0: T::Acc,
    len: usize,
}

/// The backward over `t_lo..t_hi` of one sequence (see the module docs for the formulas); like
/// [`forward_row`], a chain of dependent multiply-adds.
#[inline(always)]
fn backward_row<T: Element, const FUSED: bool>(
    row: &BackwardRow<'_, T>,
    (t_lo, t_hi): (usize, usize),
    descending: bool,
    s: &mut T::Acc,
    (grad_a, grad_x): (&mut [T], &mut [T]),
) {
    let (a, h, gh, len) = (row.a, row.h, row.gh, row.len);
    let mut step = |t: usize, gate: T::Acc, h_before: T::Acc| {
        *s = if FUSED {
            gate.mul_add(*s, gh[t].to_acc())
        } else {
            gate * *s + gh[t].to_acc()
        };
        grad_a[t - t_lo] = T::from_acc(*s * h_before);
        grad_x[t - t_lo] = T::from_acc(*s);
    };
    let value =
        |t: Option<usize>, of: &[T], otherwise: T::Acc| t.map_or(otherwise, |t| of[t].to_acc());
    if descending {
        // Forward ran ascending: g[t] = a[t+1]·g[t+1] + gh[t], ∂a[t] = g[t]·h[t-1].
        for t in (t_lo..t_hi).rev() {
            let next = Some(t + 1).filter(|&n| n < len);
            step(
                t,
                value(next, a, T::Acc::ONE),
                value(t.checked_sub(1), h, row.h0),
            );
        }
    } else {
        // Forward ran descending: g[t] = a[t-1]·g[t-1] + gh[t], ∂a[t] = g[t]·h[t+1].
        for t in t_lo..t_hi {
            let next = Some(t + 1).filter(|&n| n < len);
            step(
                t,
                value(t.checked_sub(1), a, T::Acc::ONE),
                value(next, h, row.h0),
            );
        }
    }
}

struct Backward<'a, T> {
    shape: ScanShape,
    /// Direction of the backward scan (opposite to the forward's).
    descending: bool,
    inputs: ScanGradInputs<&'a [T]>,
}

impl<T: Element> Backward<'_, T> {
    /// The time index one step further in the backward scan's order, if inside.
    #[inline(always)]
    fn next_t(&self, t: usize) -> Option<usize> {
        if self.descending {
            t.checked_sub(1)
        } else {
            Some(t + 1).filter(|&n| n < self.shape.len)
        }
    }

    /// The time index one step earlier in the backward scan's order, if inside.
    #[inline(always)]
    fn prev_t(&self, t: usize) -> Option<usize> {
        if self.descending {
            Some(t + 1).filter(|&n| n < self.shape.len)
        } else {
            t.checked_sub(1)
        }
    }

    /// The flat index of the element at time `s` in the sequence of element `i` (at time `t`).
    #[inline(always)]
    fn moved(&self, i: usize, t: usize, s: usize) -> usize {
        if s > t {
            i + (s - t) * self.shape.inner
        } else {
            i - (t - s) * self.shape.inner
        }
    }
}

impl<T: Element> Recurrence<T, 2> for Backward<'_, T> {
    fn descending(&self) -> bool {
        self.descending
    }
    fn initial(&self, p: usize, q: usize) -> T::Acc {
        state_or_zero(self.inputs.grad_final, &self.shape, p, q)
    }
    /// `a` of the step the forward took after `t`: one earlier in this scan.
    #[inline(always)]
    fn gate(&self, i: usize, t: usize) -> T::Acc {
        self.prev_t(t).map_or(T::Acc::ONE, |s| {
            self.inputs.gates[self.moved(i, t, s)].to_acc()
        })
    }
    #[inline(always)]
    fn token(&self, i: usize) -> T::Acc {
        self.inputs.grad_hidden[i].to_acc()
    }
    /// `∂x[t] = g[t]`, `∂a[t] = g[t]·h_before(t)`, where `h_before` is the forward's previous state.
    #[inline(always)]
    fn emit(
        &self,
        (i, t, state): (usize, usize, usize),
        g: T::Acc,
        outs: &mut [&mut [T]; 2],
        at: usize,
    ) {
        let h_before = match self.next_t(t) {
            Some(s) => self.inputs.hidden[self.moved(i, t, s)].to_acc(),
            None => self
                .inputs
                .initial
                .map_or(T::Acc::ZERO, |h0| h0[state].to_acc()),
        };
        outs[0][at] = T::from_acc(g * h_before);
        outs[1][at] = T::from_acc(g);
    }
    /// `∂h0 = a[first forward step]·g[first forward step]`.
    fn finish(&self, p: usize, q: usize, g: T::Acc) -> T::Acc {
        let first = if self.descending {
            0
        } else {
            self.shape.len - 1
        };
        self.inputs.gates[at(&self.shape, p, first, q)].to_acc() * g
    }
    fn sweep_row(
        &self,
        p: usize,
        len: usize,
        (t_lo, t_hi): (usize, usize),
        s: &mut T::Acc,
        outs: &mut [&mut [T]; 2],
    ) {
        let row = p * len..(p + 1) * len;
        let (a, h, gh) = (
            &self.inputs.gates[row.clone()],
            &self.inputs.hidden[row.clone()],
            &self.inputs.grad_hidden[row],
        );
        let h0 = self
            .inputs
            .initial
            .map_or(T::Acc::ZERO, |h0| h0[p].to_acc());
        let [grad_a, grad_x] = outs;
        let grads = (&mut grad_a[..t_hi - t_lo], &mut grad_x[..t_hi - t_lo]);
        let rows = BackwardRow { a, h, gh, h0, len };
        let descending = self.descending;
        fused::dispatch!(backward_row(&rows, (t_lo, t_hi), descending, s, grads));
    }
}

/// Gradients of a first-order scan with respect to gates, tokens and the initial state.
pub fn scan_backward<T: Element>(
    problem: &ScanProblem,
    inputs: ScanGradInputs<&[T]>,
    outputs: ScanGradOutputs<&mut [T]>,
) -> Result<()> {
    let shape = problem.shape;
    check_tensor("gates", inputs.gates.len(), &shape)?;
    check_tensor("hidden", inputs.hidden.len(), &shape)?;
    check_tensor("grad_hidden", inputs.grad_hidden.len(), &shape)?;
    check_tensor("grad_gates", outputs.grad_gates.len(), &shape)?;
    check_tensor("grad_tokens", outputs.grad_tokens.len(), &shape)?;
    check_state("initial", inputs.initial.map(<[T]>::len), &shape)?;
    check_state("grad_final", inputs.grad_final.map(<[T]>::len), &shape)?;
    check_state(
        "grad_initial",
        outputs.grad_initial.as_deref().map(<[T]>::len),
        &shape,
    )?;
    let rec = Backward {
        shape,
        descending: !problem.reverse,
        inputs,
    };
    run(
        &shape,
        &rec,
        [outputs.grad_gates, outputs.grad_tokens],
        outputs.grad_initial,
    );
    Ok(())
}
