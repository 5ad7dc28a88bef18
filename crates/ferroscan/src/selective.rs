//! The selective scan (Mamba's S6): its validated problem description and its arguments,
//! shared by every backend.
//!
//! For each batch element `b` and channel `d` (a "row"), with `N` states per row:
//!
//! ```text
//! r[t] = delta[t] + delta_bias[d]            Δ[t] = softplus(r[t]) if delta_softplus, else r[t]
//! h[t] = exp(Δ[t]·A[d]) ⊙ h[t-1] + Δ[t]·u[t]·B[t]      (h[-1] = initial, else zeros)
//! y[t] = f · Re(Σ_n C[t,n]·h[t,n]) + D[d]·u[t]        (f = 1 real, 2 complex)
//! out[t] = y[t]·silu(z[t])                             (when z is given)
//! ```
//!
//! `B[t]` and `C[t]` are either constant per channel (`(dim, N)` weights) or vary with the batch
//! element and time and are shared by the `dim / G` channels of a group (`(batch, G, N, L)`;
//! channel `d` uses group `d / (dim / G)`).
//!
//! Two element types meet here: the *input* type `X` of `u`, `delta`, `z`, `out`, variable `B`/`C`
//! and their gradients (f16, bf16, f32 or f64), and the *weight* type `W` = its accumulator (f32,
//! or f64 for f64 inputs) of `A`, `D`, `delta_bias`, constant `B`/`C`, the states and every
//! parameter gradient. Complex problems (`complex = true`) store every weight-typed complex
//! value as interleaved `(re, im)` pairs; variable `B`/`C` are then real tensors whose last axis
//! has length `2L` and holds the pair of step `t` at positions `2t` and `2t + 1`.
//!
//! Sequences `u`, `delta`, `z` and the output gradient may have any (non-negative) strides over
//! `(batch, dim, time)`, e.g. channels-last views; variable `B`/`C` any strides over their four
//! axes. Everything a backend writes is C-contiguous.

use crate::error::{Error, Result};

/// Time steps between the states a forward pass saves for the backward pass: the forward writes
/// the state entering steps `0, CHECKPOINT_STEPS, 2·CHECKPOINT_STEPS, …`, and the backward
/// rebuilds the states in between, one stretch at a time. (Sixteen steps: the CUDA backward
/// rebuilds a stretch in registers; the checkpoints take `N / 16` times the memory of `u` in the
/// weight type.) Mirrored by `FS_SEL_CK` in `kernels/selective_scan.cu`.
pub const CHECKPOINT_STEPS: usize = 16;

/// The shape and options of a selective scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SelectiveProblem {
    /// Batch size.
    pub batch: usize,
    /// Channels (`dim`).
    pub dim: usize,
    /// Sequence length `L`.
    pub len: usize,
    /// States per channel `N` (complex states when `complex`).
    pub dstate: usize,
    /// `A`, `B`, `C` and the states are complex.
    pub complex: bool,
    /// Apply softplus to `delta + delta_bias`.
    pub delta_softplus: bool,
}

impl SelectiveProblem {
    /// A problem whose every buffer has fewer than 2^63 elements, with at least one state.
    pub fn new(
        (batch, dim, len, dstate): (usize, usize, usize, usize),
        complex: bool,
        delta_softplus: bool,
    ) -> Result<Self> {
        if dstate == 0 {
            return Err(Error::invalid(
                "dstate",
                "at least one state per channel, got 0",
            ));
        }
        let problem = SelectiveProblem {
            batch,
            dim,
            len,
            dstate,
            complex,
            delta_softplus,
        };
        let biggest = [
            batch.checked_mul(dim).and_then(|n| n.checked_mul(len)),
            batch
                .checked_mul(dim)
                .and_then(|n| n.checked_mul(dstate))
                .and_then(|n| n.checked_mul(2 * len.max(1))),
        ];
        if biggest
            .iter()
            .all(|n| n.is_some_and(|n| n <= i64::MAX as usize))
        {
            Ok(problem)
        } else {
            Err(Error::invalid(
                "shape",
                format!("element counts below 2^63, got batch {batch}, dim {dim}, length {len}, dstate {dstate}"),
            ))
        }
    }

    /// Weight-type values per state: 1 real, 2 complex.
    pub fn parts(&self) -> usize {
        if self.complex {
            2
        } else {
            1
        }
    }

    /// Elements of one `(batch, dim, L)` sequence tensor.
    pub fn seq_numel(&self) -> usize {
        self.batch * self.dim * self.len
    }

    /// Weight-type values of `A` (and of constant `B`/`C`): `(dim, N)`, times [`Self::parts`].
    pub fn param_numel(&self) -> usize {
        self.dim * self.dstate * self.parts()
    }

    /// Weight-type values of a state tensor `(batch, dim, N)` (initial and last state).
    pub fn state_numel(&self) -> usize {
        self.batch * self.dim * self.dstate * self.parts()
    }

    /// Per-channel parameter-gradient partials a backward writes per (batch element, chunk):
    /// ∂A, constant ∂B and ∂C (N values each, in weight type), ∂D and ∂delta_bias.
    pub fn param_slots(&self) -> usize {
        3 * self.dstate * self.parts() + 2
    }

    /// Saved states per row: `ceil(L / CHECKPOINT_STEPS)`.
    pub fn checkpoint_count(&self) -> usize {
        self.len.div_ceil(CHECKPOINT_STEPS)
    }

    /// Weight-type values of the checkpoints `(batch, dim, checkpoint_count, N)`.
    pub fn checkpoint_numel(&self) -> usize {
        self.state_numel() * self.checkpoint_count()
    }

    /// Input-type elements of a contiguous variable `B`/`C` with `groups` groups.
    pub fn variable_numel(&self, groups: usize) -> usize {
        self.batch * groups * self.dstate * self.len * self.parts()
    }

    /// The channel spans that never straddle a group boundary of any variable `B`/`C`: the gcd of
    /// their group sizes `dim / G` (`groups`: the group counts of `B` and `C`, `None` when
    /// constant), or 0 when neither varies. Backends cut channels into pieces whose size divides it.
    pub fn group_span(&self, groups: [Option<usize>; 2]) -> usize {
        fn gcd(a: usize, b: usize) -> usize {
            if b == 0 {
                a
            } else {
                gcd(b, a % b)
            }
        }
        groups
            .iter()
            .flatten()
            .fold(0, |acc, &g| gcd(acc, self.dim / g.max(1)))
    }

    /// Checks that `groups` groups split the channels evenly.
    pub fn check_groups(&self, arg: &'static str, groups: usize) -> Result<()> {
        if groups == 0 || self.dim % groups != 0 {
            return Err(Error::invalid(
                arg,
                format!(
                    "a group count that divides dim = {}, got {groups}",
                    self.dim
                ),
            ));
        }
        Ok(())
    }
}

/// A strided tensor of rank `R`: its buffer and the element stride of each axis.
#[derive(Clone, Copy, Debug)]
pub struct Strided<B, const R: usize> {
    /// The buffer (a slice starting at the tensor's first element, or a device address).
    pub data: B,
    /// Element strides, outermost axis first.
    pub strides: [usize; R],
}

/// A `(batch, dim, time)` sequence tensor with any strides.
pub type Seq<B> = Strided<B, 3>;

impl<B> Strided<B, 3> {
    /// A C-contiguous `(batch, dim, L)` sequence of `problem`.
    pub fn contiguous(data: B, problem: &SelectiveProblem) -> Self {
        Strided {
            data,
            strides: [problem.dim * problem.len, problem.len, 1],
        }
    }
}

/// The number of elements a buffer must span for a tensor of `shape` and `strides`: one past
/// the largest offset (0 for an empty tensor), or `None` beyond `usize`.
pub fn strided_extent<const R: usize>(shape: [usize; R], strides: [usize; R]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().zip(strides).try_fold(1usize, |acc, (&n, s)| {
        acc.checked_add((n - 1).checked_mul(s)?)
    })
}

/// `B` or `C`: constant per channel, or varying over batch and time and shared within groups.
#[derive(Clone, Copy, Debug)]
pub enum Bc<X, W> {
    /// `(dim, N)` weights (interleaved complex pairs when complex).
    Constant(W),
    /// `(batch, groups, N, L)` inputs (last axis `2L` when complex), any strides.
    Variable {
        /// The tensor.
        tensor: Strided<X, 4>,
        /// Number of channel groups `G` (dividing `dim`).
        groups: usize,
    },
}

impl<X, W> Bc<X, W> {
    /// The group count of a variable tensor.
    pub fn groups(&self) -> Option<usize> {
        match self {
            Bc::Constant(_) => None,
            Bc::Variable { groups, .. } => Some(*groups),
        }
    }
}

/// Where the gradient of `B` or `C` goes: C-contiguous, of the same kind as the input.
#[derive(Debug)]
pub enum BcGrad<X, W> {
    /// `(dim, N)` weight-type gradient of a constant `B`/`C`.
    Constant(W),
    /// `(batch, G, N, L·parts)` input-type gradient of a variable `B`/`C`.
    Variable(X),
}

/// Inputs of a selective scan (forward, and again for the backward).
#[derive(Clone, Copy, Debug)]
pub struct SelectiveInputs<X, W> {
    /// `u`, `(batch, dim, L)`.
    pub u: Seq<X>,
    /// `delta` (before bias and softplus), `(batch, dim, L)`.
    pub delta: Seq<X>,
    /// `A`, `(dim, N)`.
    pub a: W,
    /// `B`.
    pub b: Bc<X, W>,
    /// `C`.
    pub c: Bc<X, W>,
    /// `D`, `(dim,)`; absent means 0.
    pub d: Option<W>,
    /// `z`, `(batch, dim, L)`; absent means no gating.
    pub z: Option<Seq<X>>,
    /// `delta_bias`, `(dim,)`; absent means 0.
    pub delta_bias: Option<W>,
    /// Initial state `(batch, dim, N)`; absent means zeros.
    pub initial: Option<W>,
}

/// Outputs of the forward pass (C-contiguous).
#[derive(Debug)]
pub struct SelectiveOutputs<X, W> {
    /// `out`, `(batch, dim, L)`.
    pub out: X,
    /// `h[L-1]` (the initial state when `L = 0`), `(batch, dim, N)`.
    pub last_state: Option<W>,
    /// The states entering every [`CHECKPOINT_STEPS`]-th step, `(batch, dim, ceil(L/16), N)`:
    /// what the backward pass needs besides the inputs.
    pub checkpoints: Option<W>,
}

/// What the backward pass needs besides the forward's inputs.
#[derive(Clone, Copy, Debug)]
pub struct SelectiveGradInputs<X, W> {
    /// Gradient of the loss with respect to `out`, `(batch, dim, L)`, any strides.
    pub grad_out: Seq<X>,
    /// Gradient with respect to the last state; absent means zeros.
    pub grad_last: Option<W>,
    /// The forward's [`SelectiveOutputs::checkpoints`].
    pub checkpoints: W,
}

/// Gradients of a selective scan (C-contiguous). An absent optional gradient is not computed;
/// one whose input is absent is an error.
#[derive(Debug)]
pub struct SelectiveGradOutputs<X, W> {
    /// With respect to `u`.
    pub u: X,
    /// With respect to `delta`.
    pub delta: X,
    /// With respect to `A`.
    pub a: W,
    /// With respect to `B`.
    pub b: BcGrad<X, W>,
    /// With respect to `C`.
    pub c: BcGrad<X, W>,
    /// With respect to `D`.
    pub d: Option<W>,
    /// With respect to `z`.
    pub z: Option<X>,
    /// With respect to `delta_bias`.
    pub delta_bias: Option<W>,
    /// With respect to the initial state.
    pub initial: Option<W>,
}
