//! The three-phase chunked scan shared by every CPU recurrence of the form
//! `s[t] = gate[t]·s[t-1] + token[t]`.
//!
//! Work is split into units `(p, time chunk)` that each cover every inner index `q`,
//! so a unit's outputs form one contiguous slice. With as many outer slices as
//! threads, each unit is a whole time axis and the scan is one pass. Otherwise the
//! time axis is cut into chunks: (1) each chunk reduces to the affine map
//! `s ↦ A·s + B` it applies to its incoming state; (2) these maps are folded in scan
//! order to give each chunk its incoming state; (3) each chunk is rescanned from it.

use rayon::prelude::*;

use super::element::{Accumulator, Element};
use crate::layout::ScanShape;

/// Fewest elements a unit should hold: below this, splitting costs more than it gains.
const MIN_UNIT_ELEMENTS: usize = 1 << 15;
/// Units per thread wanted, so uneven units still balance.
const UNITS_PER_THREAD: usize = 4;

/// A recurrence `s[t] = gate·s[prev] + token` that writes `N` output tensors.
///
/// Indices are physical: `p` outer, `t` time, `q` inner, and `i = (p·len + t)·inner + q`
/// the flat index of element `(p, t, q)` (passed so the hot loop computes it once). The scan
/// visits `t` descending when [`Recurrence::descending`] is true.
pub(crate) trait Recurrence<T: Element, const N: usize>: Sync {
    /// Whether the scan runs from `t = len-1` down to `0`.
    fn descending(&self) -> bool;
    /// The state before the first step.
    fn initial(&self, p: usize, q: usize) -> T::Acc;
    /// Multiplier of the previous state at element `i` (time `t`).
    fn gate(&self, i: usize, t: usize) -> T::Acc;
    /// Additive input at element `i`.
    fn token(&self, i: usize) -> T::Acc;
    /// Stores what `element = (i, t, p·inner + q)` produces from its state `s`; `at` indexes
    /// the unit's output slices.
    fn emit(&self, element: (usize, usize, usize), s: T::Acc, outs: &mut [&mut [T]; N], at: usize);
    /// The reported final value, from the state after the last step (`len > 0`).
    fn finish(&self, p: usize, q: usize, s: T::Acc) -> T::Acc;

    /// Steps one sequence of an `inner == 1` problem (row `p`) through `t_lo..t_hi` from state
    /// `s`; `outs` hold exactly that stretch. Recurrences override this with a loop over slices
    /// (the hot path of the time-last layout); this default goes element by element.
    fn sweep_row(
        &self,
        p: usize,
        len: usize,
        (t_lo, t_hi): (usize, usize),
        s: &mut T::Acc,
        outs: &mut [&mut [T]; N],
    ) {
        let mut step = |t: usize| {
            let i = p * len + t;
            *s = self.gate(i, t) * *s + self.token(i);
            self.emit((i, t, p), *s, outs, t - t_lo);
        };
        if self.descending() {
            (t_lo..t_hi).rev().for_each(&mut step);
        } else {
            (t_lo..t_hi).for_each(&mut step);
        }
    }
}

/// How the time axis is cut: `n_chunks` chunks of `chunk_len` steps (the last may be shorter).
struct ChunkPlan {
    chunk_len: usize,
    n_chunks: usize,
}

impl ChunkPlan {
    fn new(shape: &ScanShape) -> Self {
        let wanted_units = rayon::current_num_threads() * UNITS_PER_THREAD;
        let per_slice = shape.len * shape.inner;
        let by_threads = wanted_units.div_ceil(shape.outer.max(1));
        let by_size = (per_slice / MIN_UNIT_ELEMENTS).max(1);
        let n_chunks = by_threads.min(by_size).clamp(1, shape.len.max(1));
        let chunk_len = shape.len.div_ceil(n_chunks).max(1);
        ChunkPlan {
            chunk_len,
            n_chunks: shape.len.div_ceil(chunk_len).max(1),
        }
    }
}

/// Steps through `t_lo..t_hi` in scan order from the states in `carry` (one per `q`).
fn sweep<T: Element, R: Recurrence<T, N>, const N: usize>(
    rec: &R,
    shape: &ScanShape,
    p: usize,
    (t_lo, t_hi): (usize, usize),
    carry: &mut [T::Acc],
    outs: &mut [&mut [T]; N],
) {
    let q_len = shape.inner;
    if let [s] = carry {
        rec.sweep_row(p, shape.len, (t_lo, t_hi), s, outs);
        return;
    }
    let mut step = |t: usize| {
        let at = (t - t_lo) * q_len;
        let row = (p * shape.len + t) * q_len;
        for (q, s) in carry.iter_mut().enumerate() {
            let i = row + q;
            *s = rec.gate(i, t) * *s + rec.token(i);
            rec.emit((i, t, p * q_len + q), *s, outs, at + q);
        }
    };
    if rec.descending() {
        (t_lo..t_hi).rev().for_each(&mut step);
    } else {
        (t_lo..t_hi).for_each(&mut step);
    }
}

/// The affine map `s ↦ A·s + B` (one pair per `q`) that `t_lo..t_hi` applies.
fn reduce<T: Element, R: Recurrence<T, N>, const N: usize>(
    rec: &R,
    shape: &ScanShape,
    p: usize,
    (t_lo, t_hi): (usize, usize),
    maps: &mut [(T::Acc, T::Acc)],
) {
    for (q, map) in maps.iter_mut().enumerate() {
        let mut acc = (T::Acc::ONE, T::Acc::ZERO);
        let mut step = |t: usize| {
            let i = (p * shape.len + t) * shape.inner + q;
            let g = rec.gate(i, t);
            acc = (g * acc.0, g * acc.1 + rec.token(i));
        };
        if rec.descending() {
            (t_lo..t_hi).rev().for_each(&mut step);
        } else {
            (t_lo..t_hi).for_each(&mut step);
        }
        *map = acc;
    }
}

/// Splits each of the `N` outputs into per-outer-slice pieces.
fn split_outer<'a, T, const N: usize>(
    outs: [&'a mut [T]; N],
    slice_len: usize,
) -> Vec<[&'a mut [T]; N]> {
    let mut iters = outs.map(|o| o.chunks_mut(slice_len.max(1)));
    let mut pieces = Vec::new();
    loop {
        let next: [Option<&'a mut [T]>; N] = std::array::from_fn(|i| iters[i].next());
        if next.iter().any(Option::is_none) {
            return pieces;
        }
        pieces.push(next.map(|o| o.unwrap_or_default()));
    }
}

/// One piece of work: its index, its output slices and its incoming states.
type Work<'a, T, const N: usize> = (usize, ([&'a mut [T]; N], &'a mut [<T as Element>::Acc]));

/// Runs every `(p, chunk)` unit from its incoming state in `carries`.
fn sweep_units<T: Element, R: Recurrence<T, N>, const N: usize>(
    rec: &R,
    shape: &ScanShape,
    plan: &ChunkPlan,
    outs: [&mut [T]; N],
    carries: &mut [T::Acc],
) {
    let (len, inner) = (shape.len, shape.inner);
    let chunk_bounds = |c: usize| (c * plan.chunk_len, ((c + 1) * plan.chunk_len).min(len));
    let pieces = split_outer(outs, len * inner);
    let chunk_elems = plan.chunk_len * inner;
    let run_piece = |(p, (piece, carry_p)): Work<'_, T, N>| {
        let mut chunk_iters = piece.map(|o| o.chunks_mut(chunk_elems.max(1)));
        let units: Vec<[&mut [T]; N]> = (0..plan.n_chunks)
            .map(|_| std::array::from_fn(|i| chunk_iters[i].next().unwrap_or_default()))
            .collect();
        let run_unit = |(c, (mut outs_c, carry)): Work<'_, T, N>| {
            sweep(rec, shape, p, chunk_bounds(c), carry, &mut outs_c);
        };
        if plan.n_chunks == 1 {
            units
                .into_iter()
                .zip(carry_p.chunks_mut(inner.max(1)))
                .enumerate()
                .for_each(run_unit);
        } else {
            units
                .into_par_iter()
                .zip(carry_p.par_chunks_mut(inner.max(1)))
                .enumerate()
                .for_each(run_unit);
        }
    };
    let carry_slices = (plan.n_chunks * inner).max(1);
    if shape.numel() < MIN_UNIT_ELEMENTS {
        // Too small to pay for handing work to the thread pool (microseconds per call).
        pieces
            .into_iter()
            .zip(carries.chunks_mut(carry_slices))
            .enumerate()
            .for_each(run_piece);
    } else {
        pieces
            .into_par_iter()
            .zip(carries.par_chunks_mut(carry_slices))
            .enumerate()
            .for_each(run_piece);
    }
}

/// Runs `rec` over a `(outer, len, inner)` problem, writing its outputs and, when
/// asked, the final values (`(outer, inner)`; the initial state when `len == 0`).
pub(crate) fn run<T: Element, R: Recurrence<T, N>, const N: usize>(
    shape: &ScanShape,
    rec: &R,
    outs: [&mut [T]; N],
    final_out: Option<&mut [T]>,
) {
    let (len, inner) = (shape.len, shape.inner);
    let states = shape.state_numel();
    let plan = ChunkPlan::new(shape);
    let chunk_bounds = |c: usize| (c * plan.chunk_len, ((c + 1) * plan.chunk_len).min(len));
    // Scan order of the chunks.
    let chunk_at = |k: usize| {
        if rec.descending() {
            plan.n_chunks - 1 - k
        } else {
            k
        }
    };

    // carries[(p·n_chunks + c)·inner + q]: the state entering chunk c.
    let mut carries = vec![T::Acc::ZERO; states * plan.n_chunks];
    let mut finals = vec![T::Acc::ZERO; states];
    if plan.n_chunks > 1 && len > 0 {
        let mut maps = vec![(T::Acc::ONE, T::Acc::ZERO); states * plan.n_chunks];
        maps.par_chunks_mut(inner.max(1))
            .enumerate()
            .for_each(|(unit, m)| {
                reduce(
                    rec,
                    shape,
                    unit / plan.n_chunks,
                    chunk_bounds(unit % plan.n_chunks),
                    m,
                )
            });
        carries
            .par_chunks_mut((plan.n_chunks * inner).max(1))
            .zip(finals.par_chunks_mut(inner.max(1)))
            .enumerate()
            .for_each(|(p, (carry_p, final_p))| {
                for (q, fin) in final_p.iter_mut().enumerate() {
                    let mut s = rec.initial(p, q);
                    for k in 0..plan.n_chunks {
                        let c = chunk_at(k);
                        carry_p[c * inner + q] = s;
                        let (a, b) = maps[(p * plan.n_chunks + c) * inner + q];
                        s = T::Acc::scale_by_product(a, s) + b;
                    }
                    *fin = s;
                }
            });
    } else {
        for (i, s) in carries.iter_mut().enumerate() {
            *s = rec.initial(i / inner.max(1), i % inner.max(1));
        }
    }

    sweep_units(rec, shape, &plan, outs, &mut carries);

    if let Some(final_out) = final_out {
        let single_pass = plan.n_chunks == 1;
        for (i, out) in final_out.iter_mut().enumerate() {
            let (p, q) = (i / inner.max(1), i % inner.max(1));
            let value = if len == 0 {
                rec.initial(p, q)
            } else if single_pass {
                rec.finish(p, q, carries[i])
            } else {
                rec.finish(p, q, finals[i])
            };
            *out = T::from_acc(value);
        }
    }
}
