//! The selective scan's backward pass on the CPU (the formulas are in the parent module's docs).

use std::marker::PhantomData;

use rayon::prelude::*;

use super::num::{sigmoid, Cx, Num, Rl};
use super::{
    check_exact, check_grad_bc, check_grad_optional, check_inputs, check_optional, check_strided,
    for_each, seq_shape, split_rows, worth_parallel, Ctx, Row, SOFTPLUS_THRESHOLD,
};
use crate::cpu::element::{Accumulator, Element, Real};
use crate::error::Result;
use crate::selective::{
    BcGrad, SelectiveGradInputs, SelectiveGradOutputs, SelectiveInputs, SelectiveProblem,
    CHECKPOINT_STEPS,
};

/// Units of work the backward aims for, so that rows sharing a variable `B`/`C` group still
/// spread over threads (a function of the shape only, so results do not depend on the pool).
const BACKWARD_UNITS: usize = 64;

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

impl UnitPlan {
    fn new(p: &SelectiveProblem, groups: [Option<usize>; 2]) -> Self {
        let rows = p.batch * p.dim;
        let span = p.group_span(groups);
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
