//! Integration tests of the CPU selective scan (`ferroscan::cpu::selective_scan`).
//!
//! The reference (`ref_forward`) is the definition, written plainly in float64: a loop over
//! rows, time and states, with complex numbers as `(re, im)` pairs. Gradients are checked
//! against central finite differences of that reference (a loss `Σ w·out + Σ w_last·last`),
//! element by element on a sample of every input and along one random direction per input.
//!
//! Tolerances: float64 results agree with the reference to a few ulps times the number of
//! terms, far below `1e-9` relative; central differences with step `1e-6` are accurate to about
//! `1e-7` relative on these smooth functions. float32 accumulates in float32: we allow `1e-4`
//! of the output's largest magnitude (the loops are a few hundred operations long, each
//! rounding by `6e-8`). Half types add one rounding of the result (`2^-11`, `2^-8`).

use ferroscan::cpu::selective_scan::{selective_scan_backward, selective_scan_forward};
use ferroscan::cpu::Element;
use ferroscan::selective::{
    Bc, BcGrad, SelectiveGradInputs, SelectiveGradOutputs, SelectiveInputs, SelectiveOutputs,
    SelectiveProblem, Seq, Strided,
};
use ferroscan::Error;
use half::{bf16, f16};

// ---------------------------------------------------------------------------------------------
// Cases and data
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    dim: usize,
    len: usize,
    n: usize,
    complex: bool,
    /// `None`: constant; `Some(G)`: variable with `G` groups.
    var_b: Option<usize>,
    var_c: Option<usize>,
    has_d: bool,
    has_z: bool,
    has_bias: bool,
    softplus: bool,
    has_initial: bool,
    has_grad_last: bool,
}

impl Case {
    fn problem(&self) -> SelectiveProblem {
        SelectiveProblem::new(
            (self.batch, self.dim, self.len, self.n),
            self.complex,
            self.softplus,
        )
        .unwrap()
    }
    fn parts(&self) -> usize {
        if self.complex {
            2
        } else {
            1
        }
    }
    fn seq(&self) -> usize {
        self.batch * self.dim * self.len
    }
    fn bc_len(&self, var: Option<usize>) -> usize {
        match var {
            None => self.dim * self.n * self.parts(),
            Some(g) => self.batch * g * self.n * self.len * self.parts(),
        }
    }
    fn state(&self) -> usize {
        self.batch * self.dim * self.n * self.parts()
    }
}

/// A small xorshift generator: tests need no statistics, only spread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform(&mut self, lo: f64, hi: f64, n: usize) -> Vec<f64> {
        (0..n).map(|_| lo + (hi - lo) * self.next()).collect()
    }
    fn normal(&mut self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let (a, b) = (self.next().max(1e-12), self.next());
                (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
            })
            .collect()
    }
}

/// Every input, float64, C-contiguous, named as in the API.
#[derive(Clone, Debug)]
struct Data {
    u: Vec<f64>,
    delta: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
    d: Option<Vec<f64>>,
    z: Option<Vec<f64>>,
    bias: Option<Vec<f64>>,
    initial: Option<Vec<f64>>,
}

const NAMES: [&str; 9] = [
    "u",
    "delta",
    "A",
    "B",
    "C",
    "D",
    "z",
    "delta_bias",
    "initial",
];

impl Data {
    fn new(case: &Case, seed: u64) -> Self {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        // Δ stays positive without softplus (delta_bias is within ±0.5), so states decay.
        let (lo, hi) = if case.softplus {
            (-2.0, 0.5)
        } else {
            (0.6, 1.2)
        };
        let a = if case.complex {
            (0..case.dim * case.n)
                .flat_map(|_| [-(0.2 + 0.8 * r.next()), 3.0 * (2.0 * r.next() - 1.0)])
                .collect()
        } else {
            r.uniform(-2.0, -0.3, case.dim * case.n)
        };
        Data {
            u: r.normal(case.seq()),
            delta: r.uniform(lo, hi, case.seq()),
            a,
            b: r.normal(case.bc_len(case.var_b)),
            c: r.normal(case.bc_len(case.var_c)),
            d: case.has_d.then(|| r.normal(case.dim)),
            z: case.has_z.then(|| r.normal(case.seq())),
            bias: case.has_bias.then(|| r.uniform(-0.5, 0.5, case.dim)),
            initial: case.has_initial.then(|| r.normal(case.state())),
        }
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Vec<f64>> {
        match name {
            "u" => Some(&mut self.u),
            "delta" => Some(&mut self.delta),
            "A" => Some(&mut self.a),
            "B" => Some(&mut self.b),
            "C" => Some(&mut self.c),
            "D" => self.d.as_mut(),
            "z" => self.z.as_mut(),
            "delta_bias" => self.bias.as_mut(),
            "initial" => self.initial.as_mut(),
            _ => None,
        }
    }

    /// The same values rounded to `T` (inputs) and to `T::Acc` (weights), then widened back:
    /// what the library computes on.
    fn rounded<T: TestElem>(&self, case: &Case) -> Data {
        let x = |v: &Vec<f64>| widen(&narrow::<T>(v));
        let w = |v: &Vec<f64>| v.iter().map(|&e| T::acc_round(e)).collect::<Vec<_>>();
        Data {
            u: x(&self.u),
            delta: x(&self.delta),
            a: w(&self.a),
            b: if case.var_b.is_some() {
                x(&self.b)
            } else {
                w(&self.b)
            },
            c: if case.var_c.is_some() {
                x(&self.c)
            } else {
                w(&self.c)
            },
            d: self.d.as_ref().map(w),
            z: self.z.as_ref().map(x),
            bias: self.bias.as_ref().map(w),
            initial: self.initial.as_ref().map(w),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Float64 reference: the definition
// ---------------------------------------------------------------------------------------------

type Cplx = (f64, f64);

fn cmul(a: Cplx, b: Cplx) -> Cplx {
    (a.0 * b.0 - a.1 * b.1, a.0 * b.1 + a.1 * b.0)
}

/// `(out, last)` of the selective scan, computed step by step.
fn ref_forward(case: &Case, x: &Data) -> (Vec<f64>, Vec<f64>) {
    let (bsz, dim, len, n, parts) = (case.batch, case.dim, case.len, case.n, case.parts());
    let mut out = vec![0.0; case.seq()];
    let mut last = vec![0.0; case.state()];
    // Number `k` of an interleaved (complex) or plain (real) buffer.
    let num = |v: &[f64], k: usize| -> Cplx {
        if parts == 2 {
            (v[2 * k], v[2 * k + 1])
        } else {
            (v[k], 0.0)
        }
    };
    let bc = |v: &[f64], var: Option<usize>, b: usize, d: usize, t: usize, k: usize| -> Cplx {
        match var {
            None => num(v, d * n + k),
            Some(g) => {
                let grp = d / (dim / g);
                num(v, ((b * g + grp) * n + k) * len + t)
            }
        }
    };
    for b in 0..bsz {
        for d in 0..dim {
            let row = b * dim + d;
            let mut h: Vec<Cplx> = (0..n)
                .map(|k| {
                    x.initial
                        .as_ref()
                        .map_or((0.0, 0.0), |s| num(s, row * n + k))
                })
                .collect();
            for t in 0..len {
                let i = row * len + t;
                let mut dt = x.delta[i] + x.bias.as_ref().map_or(0.0, |v| v[d]);
                if case.softplus && dt <= 20.0 {
                    dt = dt.exp().ln_1p();
                }
                let mut y = 0.0;
                for (k, hk) in h.iter_mut().enumerate() {
                    let a = num(&x.a, d * n + k);
                    let decay = {
                        let m = (dt * a.0).exp();
                        (m * (dt * a.1).cos(), m * (dt * a.1).sin())
                    };
                    let bk = bc(&x.b, case.var_b, b, d, t, k);
                    let prod = cmul(decay, *hk);
                    *hk = (prod.0 + dt * x.u[i] * bk.0, prod.1 + dt * x.u[i] * bk.1);
                    let ck = bc(&x.c, case.var_c, b, d, t, k);
                    y += cmul(ck, *hk).0;
                }
                if case.complex {
                    y *= 2.0;
                }
                y += x.d.as_ref().map_or(0.0, |v| v[d]) * x.u[i];
                if let Some(z) = &x.z {
                    y *= z[i] / (1.0 + (-z[i]).exp());
                }
                out[i] = y;
            }
            for (k, hk) in h.iter().enumerate() {
                if parts == 2 {
                    last[2 * (row * n + k)] = hk.0;
                    last[2 * (row * n + k) + 1] = hk.1;
                } else {
                    last[row * n + k] = hk.0;
                }
            }
        }
    }
    (out, last)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The loss whose gradients are checked: `Σ w·out + Σ w_last·last`.
fn ref_loss(case: &Case, x: &Data, w: &[f64], w_last: Option<&[f64]>) -> f64 {
    let (out, last) = ref_forward(case, x);
    dot(&out, w) + w_last.map_or(0.0, |wl| dot(&last, wl))
}

// ---------------------------------------------------------------------------------------------
// Calling the library
// ---------------------------------------------------------------------------------------------

trait TestElem: Element + std::fmt::Debug {
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// Rounding of a weight to the accumulator type.
    fn acc_round(v: f64) -> f64;
    /// Unit roundoff of the storage type.
    const UNIT: f64;
}

macro_rules! test_elem {
    ($t:ty, $from:expr, $to:expr, $acc:ty, $unit:expr) => {
        impl TestElem for $t {
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn acc_round(v: f64) -> f64 {
                v as $acc as f64
            }
            const UNIT: f64 = $unit;
        }
    };
}

test_elem!(f64, |v| v, |v| v, f64, 1.1e-16);
test_elem!(f32, |v| v as f32, |v: f32| v as f64, f32, 6e-8);
test_elem!(f16, f16::from_f64, |v: f16| v.to_f64(), f32, 4.9e-4);
test_elem!(bf16, bf16::from_f64, |v: bf16| v.to_f64(), f32, 3.9e-3);

fn narrow<T: TestElem>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&e| T::from_f64(e)).collect()
}

fn widen<T: TestElem>(v: &[T]) -> Vec<f64> {
    v.iter().map(|&e| e.to_f64()).collect()
}

fn weights<T: TestElem>(v: &[f64]) -> Vec<T::Acc>
where
    T::Acc: TestElem,
{
    narrow::<T::Acc>(v)
}

/// Library inputs in `T` (and `T::Acc` weights), C-contiguous.
struct Typed<T: TestElem> {
    u: Vec<T>,
    delta: Vec<T>,
    z: Option<Vec<T>>,
    var_b: Vec<T>,
    var_c: Vec<T>,
    a: Vec<T::Acc>,
    b: Vec<T::Acc>,
    c: Vec<T::Acc>,
    d: Option<Vec<T::Acc>>,
    bias: Option<Vec<T::Acc>>,
    initial: Option<Vec<T::Acc>>,
}

impl<T: TestElem> Typed<T>
where
    T::Acc: TestElem,
{
    fn new(case: &Case, x: &Data) -> Self {
        let pick = |var: Option<usize>, v: &Vec<f64>| {
            if var.is_some() {
                (narrow::<T>(v), vec![])
            } else {
                (vec![], weights::<T>(v))
            }
        };
        let (var_b, b) = pick(case.var_b, &x.b);
        let (var_c, c) = pick(case.var_c, &x.c);
        Typed {
            u: narrow(&x.u),
            delta: narrow(&x.delta),
            z: x.z.as_deref().map(narrow),
            var_b,
            var_c,
            a: weights::<T>(&x.a),
            b,
            c,
            d: x.d.as_deref().map(weights::<T>),
            bias: x.bias.as_deref().map(weights::<T>),
            initial: x.initial.as_deref().map(weights::<T>),
        }
    }

    fn inputs<'a>(&'a self, case: &Case) -> SelectiveInputs<&'a [T], &'a [T::Acc]> {
        let p = case.problem();
        let bc = |var: Option<usize>, tensor: &'a [T], w: &'a [T::Acc]| match var {
            None => Bc::Constant(w),
            Some(groups) => Bc::Variable {
                tensor: Strided {
                    data: tensor,
                    strides: [
                        groups * case.n * case.len * case.parts(),
                        case.n * case.len * case.parts(),
                        case.len * case.parts(),
                        1,
                    ],
                },
                groups,
            },
        };
        SelectiveInputs {
            u: Seq::contiguous(&self.u[..], &p),
            delta: Seq::contiguous(&self.delta[..], &p),
            a: &self.a[..],
            b: bc(case.var_b, &self.var_b[..], &self.b[..]),
            c: bc(case.var_c, &self.var_c[..], &self.c[..]),
            d: self.d.as_deref(),
            z: self.z.as_deref().map(|z| Seq::contiguous(z, &p)),
            delta_bias: self.bias.as_deref(),
            initial: self.initial.as_deref(),
        }
    }
}

struct Forward<T: TestElem> {
    out: Vec<T>,
    last: Vec<T::Acc>,
    checkpoints: Vec<T::Acc>,
}

fn run_forward<T: TestElem>(case: &Case, typed: &Typed<T>) -> Forward<T>
where
    T::Acc: TestElem,
{
    let p = case.problem();
    let mut f = Forward {
        out: vec![T::from_f64(f64::NAN); case.seq()],
        last: vec![T::Acc::from_f64(f64::NAN); case.state()],
        checkpoints: vec![T::Acc::from_f64(f64::NAN); p.checkpoint_numel()],
    };
    selective_scan_forward(
        &p,
        typed.inputs(case),
        SelectiveOutputs {
            out: &mut f.out[..],
            last_state: Some(&mut f.last[..]),
            checkpoints: Some(&mut f.checkpoints[..]),
        },
    )
    .unwrap();
    f
}

fn bc_grad<'a, X, W>(
    var: Option<usize>,
    x: &'a mut [X],
    w: &'a mut [W],
) -> BcGrad<&'a mut [X], &'a mut [W]> {
    if var.is_some() {
        BcGrad::Variable(x)
    } else {
        BcGrad::Constant(w)
    }
}

/// Gradients by input name, widened to f64.
fn run_backward<T: TestElem>(
    case: &Case,
    typed: &Typed<T>,
    w: &[f64],
    w_last: Option<&[f64]>,
) -> Vec<(&'static str, Vec<f64>)>
where
    T::Acc: TestElem,
{
    let p = case.problem();
    let fwd = run_forward(case, typed);
    let grad_out = narrow::<T>(w);
    let grad_last = w_last.map(weights::<T>);
    let nan = || T::from_f64(f64::NAN);
    let nan_w = || T::Acc::from_f64(f64::NAN);
    let mut du = vec![nan(); case.seq()];
    let mut ddelta = vec![nan(); case.seq()];
    let mut da = vec![nan_w(); case.bc_len(None)];
    let mut dbx = vec![
        nan();
        if case.var_b.is_some() {
            case.bc_len(case.var_b)
        } else {
            0
        }
    ];
    let mut dbw = vec![
        nan_w();
        if case.var_b.is_some() {
            0
        } else {
            case.bc_len(None)
        }
    ];
    let mut dcx = vec![
        nan();
        if case.var_c.is_some() {
            case.bc_len(case.var_c)
        } else {
            0
        }
    ];
    let mut dcw = vec![
        nan_w();
        if case.var_c.is_some() {
            0
        } else {
            case.bc_len(None)
        }
    ];
    let mut dd = case.has_d.then(|| vec![nan_w(); case.dim]);
    let mut dz = case.has_z.then(|| vec![nan(); case.seq()]);
    let mut dbias = case.has_bias.then(|| vec![nan_w(); case.dim]);
    let mut dinit = case.has_initial.then(|| vec![nan_w(); case.state()]);
    let b_grad = bc_grad(case.var_b, &mut dbx, &mut dbw);
    let c_grad = bc_grad(case.var_c, &mut dcx, &mut dcw);
    selective_scan_backward(
        &p,
        typed.inputs(case),
        SelectiveGradInputs {
            grad_out: Seq::contiguous(&grad_out[..], &p),
            grad_last: grad_last.as_deref(),
            checkpoints: &fwd.checkpoints[..],
        },
        SelectiveGradOutputs {
            u: &mut du[..],
            delta: &mut ddelta[..],
            a: &mut da[..],
            b: b_grad,
            c: c_grad,
            d: dd.as_deref_mut(),
            z: dz.as_deref_mut(),
            delta_bias: dbias.as_deref_mut(),
            initial: dinit.as_deref_mut(),
        },
    )
    .unwrap();
    let wx = |v: &Vec<T>| widen(v);
    let ww = |v: &Vec<T::Acc>| widen(v);
    let mut grads = vec![
        ("u", wx(&du)),
        ("delta", wx(&ddelta)),
        ("A", ww(&da)),
        (
            "B",
            if case.var_b.is_some() {
                wx(&dbx)
            } else {
                ww(&dbw)
            },
        ),
        (
            "C",
            if case.var_c.is_some() {
                wx(&dcx)
            } else {
                ww(&dcw)
            },
        ),
    ];
    grads.extend(dd.as_ref().map(|v| ("D", ww(v))));
    grads.extend(dz.as_ref().map(|v| ("z", wx(v))));
    grads.extend(dbias.as_ref().map(|v| ("delta_bias", ww(v))));
    grads.extend(dinit.as_ref().map(|v| ("initial", ww(v))));
    grads
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (|diff| {} > tol {tol})",
            (g - w).abs()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

fn check_forward<T: TestElem>(case: &Case, seed: u64)
where
    T::Acc: TestElem,
{
    let data = Data::new(case, seed);
    let typed = Typed::<T>::new(case, &data);
    let exact = data.rounded::<T>(case);
    let (want, want_last) = ref_forward(case, &exact);
    let fwd = run_forward(case, &typed);
    let acc_unit = <T::Acc as TestElem>::UNIT;
    let scale = max_abs(&want).max(1e-30);
    let acc_tol = 2000.0 * acc_unit * scale * (case.n as f64).max(1.0);
    let tol = acc_tol + T::UNIT * scale;
    assert_close(&format!("{case:?} out"), &widen(&fwd.out), &want, tol);
    let last_scale = max_abs(&want_last).max(1e-30);
    let last_tol = 2000.0 * acc_unit * last_scale;
    assert_close(
        &format!("{case:?} last"),
        &widen(&fwd.last),
        &want_last,
        last_tol,
    );
}

/// float64 gradients against central differences of the reference.
fn check_gradients(case: &Case, seed: u64) {
    let data = Data::new(case, seed);
    let typed = Typed::<f64>::new(case, &data);
    let mut r = Rng(seed ^ 0xdead_beef);
    let w = r.normal(case.seq());
    let w_last = case.has_grad_last.then(|| r.normal(case.state()));
    let grads = run_backward(case, &typed, &w, w_last.as_deref());
    let loss = |x: &Data| ref_loss(case, x, &w, w_last.as_deref());
    let eps = 1e-6;
    // Central differences lose about ulp(loss) / eps to the rounding of the loss itself.
    let fd_noise = 1e-16 * loss(&data).abs() / eps;
    for (name, grad) in &grads {
        let mut probe = data.clone();
        let n = probe.get_mut(name).unwrap().len();
        assert_eq!(grad.len(), n, "{name}: gradient length");
        let scale = max_abs(grad).max(1e-3);
        // A sample of single elements.
        let picks: Vec<usize> = (0..6.min(n))
            .map(|_| (r.next() * n as f64) as usize % n)
            .collect();
        for i in picks {
            let orig = probe.get_mut(name).unwrap()[i];
            probe.get_mut(name).unwrap()[i] = orig + eps;
            let up = loss(&probe);
            probe.get_mut(name).unwrap()[i] = orig - eps;
            let down = loss(&probe);
            probe.get_mut(name).unwrap()[i] = orig;
            let fd = (up - down) / (2.0 * eps);
            assert!(
                (grad[i] - fd).abs() <= 1e-5 * scale + fd_noise,
                "{case:?}: d/d{name}[{i}] = {}, finite difference {fd}",
                grad[i]
            );
        }
        // One random direction through all elements.
        let dir = r.normal(n);
        let base = probe.get_mut(name).unwrap().clone();
        let shifted = |s: f64| {
            base.iter()
                .zip(&dir)
                .map(|(b, v)| b + s * v)
                .collect::<Vec<_>>()
        };
        *probe.get_mut(name).unwrap() = shifted(eps);
        let up = loss(&probe);
        *probe.get_mut(name).unwrap() = shifted(-eps);
        let down = loss(&probe);
        let fd = (up - down) / (2.0 * eps);
        let want = dot(grad, &dir);
        let mag: f64 = grad.iter().zip(&dir).map(|(g, v)| (g * v).abs()).sum();
        assert!(
            (want - fd).abs() <= 1e-6 * mag.max(1e-3) + fd_noise,
            "{case:?}: directional derivative along a random direction of {name}: {want} vs {fd}"
        );
    }
    assert!(NAMES.len() >= grads.len());
}

fn base_case() -> Case {
    Case {
        batch: 2,
        dim: 4,
        len: 70, // crosses checkpoint boundaries (every 16 steps)
        n: 3,
        complex: false,
        var_b: None,
        var_c: None,
        has_d: false,
        has_z: false,
        has_bias: false,
        softplus: false,
        has_initial: false,
        has_grad_last: false,
    }
}

/// Every combination of the options, on a small problem.
fn all_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for bits in 0..256u32 {
        let flag = |k: u32| bits & (1 << k) != 0;
        let var = |k: u32| match (flag(k), flag(7)) {
            (false, _) => None,
            (true, false) => Some(1),
            (true, true) => Some(2),
        };
        cases.push(Case {
            complex: flag(0),
            var_b: var(1),
            var_c: var(2),
            has_d: flag(3),
            has_z: flag(4),
            has_bias: flag(5),
            softplus: flag(6),
            has_initial: flag(3) != flag(5),
            has_grad_last: flag(4) != flag(6),
            ..base_case()
        });
    }
    cases
}

#[test]
fn forward_matches_reference_every_option_f64_f32() {
    for (i, case) in all_cases().iter().enumerate() {
        check_forward::<f64>(case, i as u64);
        check_forward::<f32>(case, i as u64);
    }
}

#[test]
fn forward_half_types() {
    for (i, case) in all_cases().iter().enumerate().step_by(7) {
        check_forward::<f16>(case, i as u64);
        check_forward::<bf16>(case, i as u64);
    }
}

#[test]
fn gradients_match_finite_differences_every_option() {
    for (i, case) in all_cases().iter().enumerate() {
        check_gradients(case, 1000 + i as u64);
    }
}

#[test]
fn gradients_long_and_one_step() {
    for len in [1, 15, 16, 17, 200] {
        for complex in [false, true] {
            let case = Case {
                batch: 1,
                dim: 2,
                len,
                n: 2,
                complex,
                var_b: Some(1),
                var_c: Some(2),
                has_d: true,
                has_z: true,
                has_bias: true,
                softplus: true,
                has_initial: true,
                has_grad_last: true,
            };
            check_gradients(&case, len as u64);
            check_forward::<f32>(&case, len as u64);
        }
    }
}

/// Enough rows and states that the backward splits into units (and the forward runs on the
/// pool): the gradients are bit-identical whatever the number of threads.
#[test]
fn backward_is_deterministic_across_thread_counts() {
    let case = Case {
        batch: 3,
        dim: 48,
        len: 150,
        n: 8,
        var_b: Some(2),
        var_c: Some(1),
        has_d: true,
        has_z: true,
        has_bias: true,
        softplus: true,
        has_initial: true,
        has_grad_last: true,
        ..base_case()
    };
    for complex in [false, true] {
        let case = Case { complex, ..case };
        let data = Data::new(&case, 7);
        let typed = Typed::<f32>::new(&case, &data);
        let mut r = Rng(99);
        let w = r.normal(case.seq());
        let w_last = r.normal(case.state());
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| run_backward(&case, &typed, &w, Some(&w_last)))
        };
        let one = run(1);
        for threads in [1, 3, 4] {
            let other = run(threads);
            for ((name, a), (_, b)) in one.iter().zip(&other) {
                let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "d/d{name} differs between 1 and {threads} threads");
            }
        }
    }
}

/// Channels-last `u`, `delta`, `z` (a `(batch, L, dim)` buffer read as `(batch, dim, L)`) and a
/// variable `B` in `(batch, L, N)` memory order give the contiguous results exactly.
#[test]
fn strided_inputs_match_contiguous() {
    let case = Case {
        var_b: Some(1),
        has_z: true,
        has_d: true,
        ..base_case()
    };
    let p = case.problem();
    let data = Data::new(&case, 3);
    let typed = Typed::<f32>::new(&case, &data);
    let want = run_forward(&case, &typed).out;
    let (bsz, dim, len, n) = (case.batch, case.dim, case.len, case.n);
    let to_last = |v: &[f32]| {
        let mut out = vec![0.0f32; v.len()];
        for b in 0..bsz {
            for d in 0..dim {
                for t in 0..len {
                    out[(b * len + t) * dim + d] = v[(b * dim + d) * len + t];
                }
            }
        }
        out
    };
    let (u, delta, z) = (
        to_last(&typed.u),
        to_last(&typed.delta),
        to_last(typed.z.as_ref().unwrap()),
    );
    let mut b_lnl = vec![0.0f32; typed.var_b.len()];
    for b in 0..bsz {
        for k in 0..n {
            for t in 0..len {
                b_lnl[(b * len + t) * n + k] = typed.var_b[(b * n + k) * len + t];
            }
        }
    }
    fn seq(data: &[f32], len: usize, dim: usize) -> Seq<&[f32]> {
        Seq {
            data,
            strides: [len * dim, 1, dim],
        }
    }
    let mut inputs = typed.inputs(&case);
    inputs.u = seq(&u, len, dim);
    inputs.delta = seq(&delta, len, dim);
    inputs.z = Some(seq(&z, len, dim));
    inputs.b = Bc::Variable {
        tensor: Strided {
            data: &b_lnl[..],
            strides: [len * n, 0, 1, n],
        },
        groups: 1,
    };
    let mut out = vec![f32::NAN; case.seq()];
    selective_scan_forward(
        &p,
        inputs,
        SelectiveOutputs {
            out: &mut out[..],
            last_state: None,
            checkpoints: None,
        },
    )
    .unwrap();
    assert!(out
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn empty_sequence_passes_the_state_through() {
    let case = Case {
        len: 0,
        has_initial: true,
        has_grad_last: true,
        ..base_case()
    };
    let data = Data::new(&case, 5);
    let typed = Typed::<f32>::new(&case, &data);
    let fwd = run_forward(&case, &typed);
    assert!(fwd.out.is_empty() && fwd.checkpoints.is_empty());
    assert_eq!(fwd.last, *typed.initial.as_ref().unwrap());
    let w_last = Rng(1).normal(case.state());
    let grads = run_backward(&case, &typed, &[], Some(&w_last));
    let dinit = &grads.iter().find(|(n, _)| *n == "initial").unwrap().1;
    assert_close("d/dinitial", dinit, &widen(&narrow::<f32>(&w_last)), 0.0);
    let da = &grads.iter().find(|(n, _)| *n == "A").unwrap().1;
    assert!(da.iter().all(|&v| v == 0.0));
}

// ---------------------------------------------------------------------------------------------
// Bad arguments
// ---------------------------------------------------------------------------------------------

fn arg_of(err: Error) -> &'static str {
    match err {
        Error::InvalidArgument { arg, .. } => arg,
        other => panic!("expected an invalid argument, got {other}"),
    }
}

#[test]
fn bad_buffers_are_invalid_arguments_naming_them() {
    let case = Case {
        var_b: Some(2),
        has_d: true,
        ..base_case()
    };
    let p = case.problem();
    let data = Data::new(&case, 1);
    let typed = Typed::<f32>::new(&case, &data);
    let mut out = vec![0.0f32; case.seq()];
    let run = |inputs: SelectiveInputs<&[f32], &[f32]>, out: &mut [f32]| {
        selective_scan_forward(
            &p,
            inputs,
            SelectiveOutputs {
                out,
                last_state: None,
                checkpoints: None,
            },
        )
    };
    let short = &typed.u[..typed.u.len() - 1];
    let mut x = typed.inputs(&case);
    x.u = Seq::contiguous(short, &p);
    assert_eq!(arg_of(run(x, &mut out).unwrap_err()), "u");
    let mut x = typed.inputs(&case);
    x.a = &typed.a[1..];
    assert_eq!(arg_of(run(x, &mut out).unwrap_err()), "A");
    let mut x = typed.inputs(&case);
    x.b = Bc::Variable {
        tensor: Strided {
            data: &typed.var_b[..],
            strides: [1, 1, 1, 1],
        },
        groups: 3, // does not divide dim = 4
    };
    assert_eq!(arg_of(run(x, &mut out).unwrap_err()), "B");
    let mut x = typed.inputs(&case);
    x.d = Some(&typed.a[..3]);
    assert_eq!(arg_of(run(x, &mut out).unwrap_err()), "D");
    let x = typed.inputs(&case);
    assert_eq!(arg_of(run(x, &mut out[1..]).unwrap_err()), "out");
    assert_eq!(
        arg_of(SelectiveProblem::new((1, 1, 1, 0), false, false).unwrap_err()),
        "dstate"
    );
    assert_eq!(
        arg_of(SelectiveProblem::new((1 << 40, 1 << 40, 1 << 40, 1), false, false).unwrap_err()),
        "shape"
    );
}
