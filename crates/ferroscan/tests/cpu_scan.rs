//! Integration tests of the CPU first-order scan (`ferroscan::cpu::scan`).
//!
//! Every result is compared with a plain, sequential float64 reference written in
//! this file (`ref_forward`, `ref_backward`); the reference backward is itself
//! validated by central finite differences of the reference forward.
//!
//! # Tolerances
//!
//! With unit roundoff `u` of the type the library accumulates in, one step computes
//! `fl(fl(a·s) + x) = (a·s·(1+δ₁) + x)·(1+δ₂)`, `|δᵢ| ≤ u`. Unrolled, `h[t]` is the
//! sum of the terms `(Π a)·x[s]` (and `(Π a)·h0`), each carrying a product of at
//! most `k` factors `(1+δ)`, so
//!
//! ```text
//! |h̃[t] - h[t]| ≤ γ_k · H[t],   γ_k = k·u / (1 - k·u),
//! ```
//!
//! where `H[t]` is the same scan run on absolute values (`|a|`, `|x|`, `|h0|`): the
//! "sum of abs terms", computed by the reference and called `scale` below.
//! The sequential scan has `k ≤ 2(len+1)`. The chunked three-phase scan adds, for a
//! term crossing chunks, at most `2·chunk_len` roundings in its chunk's reduction,
//! `chunk_len + 2` per chunk it is folded across (the product `A` of the gates plus
//! one multiply-add) and `2·chunk_len` in the final rescan; with `n ≥ 2` chunks,
//! `chunk_len ≤ len/2 + 1`, this stays below `5·len + 8`. The backward is the same
//! scan plus one product (`∂a = g·h`, `∂h0 = a·g`) whose scale is `G·|h|`,
//! `|a|·G`. We use `k = 6·(len+2)` for everything. The float64 reference has its own
//! error, below `γ_{3(len+2)}` in float64 times the same scale, which is added.
//! A result that underflows has an absolute error below the accumulator's smallest
//! normal per operation: `k` of those are added too.
//!
//! Half types (`f16`, `bf16`) accumulate in `f32` and round the result once more to
//! the storage type, adding `u_out·|result| ≤ u_out·(|want| + acc_err)` with
//! `u_out = 2^-11` (f16) or `2^-8` (bf16), plus half the smallest subnormal step
//! (f16: `2^-25`, rounded up to `2^-24`). Their inputs are rounded to the half type
//! first and the reference is computed on those rounded values, so the input
//! rounding is not part of the error.

use std::fmt::Debug;

use ferroscan::cpu::scan::{
    scan_backward, scan_forward, ScanGradInputs, ScanGradOutputs, ScanInputs, ScanOutputs,
};
use ferroscan::cpu::Element;
use ferroscan::{Error, ScanProblem, ScanShape};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

// ---------------------------------------------------------------------------
// Float64 reference
// ---------------------------------------------------------------------------

/// Index of element `(p, t, q)` of a C-contiguous `(outer, len, inner)` tensor.
fn at(shape: &ScanShape, p: usize, t: usize, q: usize) -> usize {
    (p * shape.len + t) * shape.inner + q
}

struct RefForward {
    hidden: Vec<f64>,
    final_state: Vec<f64>,
}

/// `h[t] = a[t]·h[t-1] + x[t]` from `h[-1] = initial` (or, reversed,
/// `h[t] = a[t]·h[t+1] + x[t]` from `h[len] = initial`), one sequence at a time.
fn ref_forward(
    shape: &ScanShape,
    reverse: bool,
    gates: &[f64],
    tokens: &[f64],
    initial: Option<&[f64]>,
) -> RefForward {
    let mut hidden = vec![0.0; shape.numel()];
    let mut final_state = vec![0.0; shape.state_numel()];
    for p in 0..shape.outer {
        for q in 0..shape.inner {
            let s = p * shape.inner + q;
            let mut h = initial.map_or(0.0, |v| v[s]);
            if reverse {
                for t in (0..shape.len).rev() {
                    let i = at(shape, p, t, q);
                    h = gates[i] * h + tokens[i];
                    hidden[i] = h;
                }
            } else {
                for t in 0..shape.len {
                    let i = at(shape, p, t, q);
                    h = gates[i] * h + tokens[i];
                    hidden[i] = h;
                }
            }
            final_state[s] = h;
        }
    }
    RefForward {
        hidden,
        final_state,
    }
}

struct RefBackward {
    grad_gates: Vec<f64>,
    grad_tokens: Vec<f64>,
    grad_initial: Vec<f64>,
}

/// Gradients of the forward scan for upstream gradients `grad_hidden` (of `h`) and
/// `grad_final` (of the final state).
///
/// Forward direction: `g[t] = gh[t] + a[t+1]·g[t+1]` from `g[len] = grad_final`,
/// `a[len] = 1`; `∂x[t] = g[t]`, `∂a[t] = g[t]·h[t-1]` with `h[-1] = initial`, and
/// `∂h0 = a[0]·g[0]` (`= grad_final` when `len == 0`). Reverse direction mirrored:
/// `g[t] = gh[t] + a[t-1]·g[t-1]` from `g[-1] = grad_final`, `∂a[t] = g[t]·h[t+1]` with
/// `h[len] = initial`, `∂h0 = a[len-1]·g[len-1]`.
fn ref_backward(
    shape: &ScanShape,
    reverse: bool,
    gates: &[f64],
    hidden: &[f64],
    initial: Option<&[f64]>,
    grad_hidden: &[f64],
    grad_final: Option<&[f64]>,
) -> RefBackward {
    let len = shape.len;
    let mut grad_gates = vec![0.0; shape.numel()];
    let mut grad_tokens = vec![0.0; shape.numel()];
    let mut grad_initial = vec![0.0; shape.state_numel()];
    for p in 0..shape.outer {
        for q in 0..shape.inner {
            let s = p * shape.inner + q;
            let h0 = initial.map_or(0.0, |v| v[s]);
            let mut g = grad_final.map_or(0.0, |v| v[s]);
            // The gate of the forward step taken after the current one (1 past the end).
            let mut a_next = 1.0;
            if reverse {
                for t in 0..len {
                    let i = at(shape, p, t, q);
                    g = grad_hidden[i] + a_next * g;
                    let h_prev = if t + 1 < len {
                        hidden[at(shape, p, t + 1, q)]
                    } else {
                        h0
                    };
                    grad_tokens[i] = g;
                    grad_gates[i] = g * h_prev;
                    a_next = gates[i];
                }
            } else {
                for t in (0..len).rev() {
                    let i = at(shape, p, t, q);
                    g = grad_hidden[i] + a_next * g;
                    let h_prev = if t > 0 {
                        hidden[at(shape, p, t - 1, q)]
                    } else {
                        h0
                    };
                    grad_tokens[i] = g;
                    grad_gates[i] = g * h_prev;
                    a_next = gates[i];
                }
            }
            grad_initial[s] = a_next * g;
        }
    }
    RefBackward {
        grad_gates,
        grad_tokens,
        grad_initial,
    }
}

fn abs_all(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---------------------------------------------------------------------------
// Deterministic random numbers (proptest draws the seed, so cases shrink well)
// ---------------------------------------------------------------------------

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval `(lo, hi)`.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let u = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        lo + (hi - lo) * u
    }

    fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

// ---------------------------------------------------------------------------
// Element types under test
// ---------------------------------------------------------------------------

const F64_U: f64 = f64::EPSILON / 2.0;

trait TestElem: Element + Debug + PartialEq {
    const NAME: &'static str;
    /// Unit roundoff of the accumulator (`f32` for every type but `f64`).
    const ACC_U: f64;
    /// Absolute error bound of one underflowing accumulator operation.
    const ACC_TINY: f64;
    /// Unit roundoff of the rounding to the storage type (0: storage is the accumulator).
    const OUT_U: f64;
    /// Absolute error bound of that rounding in the subnormal range.
    const OUT_TINY: f64;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl TestElem for f64 {
    const NAME: &'static str = "f64";
    const ACC_U: f64 = F64_U;
    const ACC_TINY: f64 = f64::MIN_POSITIVE;
    const OUT_U: f64 = 0.0;
    const OUT_TINY: f64 = 0.0;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
}

impl TestElem for f32 {
    const NAME: &'static str = "f32";
    const ACC_U: f64 = f32::EPSILON as f64 / 2.0;
    const ACC_TINY: f64 = f32::MIN_POSITIVE as f64;
    const OUT_U: f64 = 0.0;
    const OUT_TINY: f64 = 0.0;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl TestElem for f16 {
    const NAME: &'static str = "f16";
    const ACC_U: f64 = f32::EPSILON as f64 / 2.0;
    const ACC_TINY: f64 = f32::MIN_POSITIVE as f64;
    /// 2^-11.
    const OUT_U: f64 = 1.0 / 2048.0;
    /// 2^-24, the smallest f16 subnormal (twice the bound).
    const OUT_TINY: f64 = 1.0 / 16_777_216.0;
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
}

impl TestElem for bf16 {
    const NAME: &'static str = "bf16";
    const ACC_U: f64 = f32::EPSILON as f64 / 2.0;
    const ACC_TINY: f64 = f32::MIN_POSITIVE as f64;
    /// 2^-8.
    const OUT_U: f64 = 1.0 / 256.0;
    const OUT_TINY: f64 = f32::MIN_POSITIVE as f64;
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
}

fn widen<T: TestElem>(v: &[T]) -> Vec<f64> {
    v.iter().map(|&x| x.to_f64()).collect()
}

fn narrow<T: TestElem>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

/// A buffer of NaNs: every element the library fails to write stays NaN and fails.
fn sentinel<T: TestElem>(n: usize) -> Vec<T> {
    vec![T::from_f64(f64::NAN); n]
}

/// `γ_k = k·u / (1 - k·u)`.
fn gamma(k: usize, u: f64) -> f64 {
    let ku = k as f64 * u;
    assert!(ku < 0.5, "error bound meaningless: k·u = {ku}");
    ku / (1.0 - ku)
}

/// Largest admissible `|got - want|` (see the module docs).
fn tolerance<T: TestElem>(want: f64, scale: f64, len: usize) -> f64 {
    let k = 6 * (len + 2);
    let acc =
        gamma(k, T::ACC_U) * scale + gamma(3 * (len + 2), F64_U) * scale + k as f64 * T::ACC_TINY;
    acc + T::OUT_U * (want.abs() + acc) + T::OUT_TINY
}

/// Where a flat index lies, for messages.
fn locate(shape: &ScanShape, state: bool, i: usize) -> String {
    let inner = shape.inner.max(1);
    if state {
        format!("(p={}, q={})", i / inner, i % inner)
    } else {
        let len = shape.len.max(1);
        format!(
            "(p={}, t={}, q={})",
            i / (len * inner),
            (i / inner) % len,
            i % inner
        )
    }
}

/// Checks `got` against the reference `want` within [`tolerance`]; a non-finite
/// reference value requires a non-finite result.
fn assert_close<T: TestElem>(
    what: &str,
    got: &[T],
    want: &[f64],
    scale: &[f64],
    shape: &ScanShape,
    state: bool,
    ctx: &str,
) {
    assert_eq!(got.len(), want.len(), "{what}: length; {ctx}");
    let mut bad = 0usize;
    let mut first = None;
    for (i, (&g, (&w, &s))) in got.iter().zip(want.iter().zip(scale)).enumerate() {
        let g = g.to_f64();
        let ok = if w.is_finite() {
            (g - w).abs() <= tolerance::<T>(w, s, shape.len)
        } else {
            !g.is_finite()
        };
        if !ok {
            bad += 1;
            first.get_or_insert((i, g, w, s));
        }
    }
    if let Some((i, g, w, s)) = first {
        panic!(
            "{what}: {bad} of {} elements out of tolerance; first at {i} {}: got {g:e}, \
             want {w:e} (|err| {:e}, tol {:e}, scale {s:e}); {ctx}",
            got.len(),
            locate(shape, state, i),
            (g - w).abs(),
            tolerance::<T>(w, s, shape.len),
        );
    }
}

// ---------------------------------------------------------------------------
// One test case: random inputs, library vs reference, forward and backward
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Case {
    outer: usize,
    len: usize,
    inner: usize,
    reverse: bool,
    with_initial: bool,
    want_final: bool,
    with_grad_final: bool,
    want_grad_initial: bool,
    seed: u64,
}

impl Case {
    /// Every optional state present.
    fn full(outer: usize, len: usize, inner: usize, reverse: bool, seed: u64) -> Self {
        Case {
            outer,
            len,
            inner,
            reverse,
            with_initial: true,
            want_final: true,
            with_grad_final: true,
            want_grad_initial: true,
            seed,
        }
    }

    fn shape(&self) -> ScanShape {
        ScanShape::new(self.outer, self.len, self.inner).expect("shape")
    }

    fn problem(&self) -> ScanProblem {
        ScanProblem {
            shape: self.shape(),
            reverse: self.reverse,
        }
    }
}

/// Inputs of one case, already in the element type under test.
struct Inputs<T> {
    gates: Vec<T>,
    tokens: Vec<T>,
    initial: Option<Vec<T>>,
    grad_hidden: Vec<T>,
    grad_final: Option<Vec<T>>,
}

impl<T: TestElem> Inputs<T> {
    /// Gates in (-1.05, 1.05), everything else in (-1, 1), rounded to `T`.
    fn random(case: &Case) -> Self {
        let shape = case.shape();
        let mut rng = Rng(case.seed);
        let mut draw = |n: usize, lo: f64, hi: f64| narrow::<T>(&rng.vec(n, lo, hi));
        let gates = draw(shape.numel(), -1.05, 1.05);
        let tokens = draw(shape.numel(), -1.0, 1.0);
        let initial = draw(shape.state_numel(), -1.0, 1.0);
        let grad_hidden = draw(shape.numel(), -1.0, 1.0);
        let grad_final = draw(shape.state_numel(), -1.0, 1.0);
        Inputs {
            gates,
            tokens,
            initial: case.with_initial.then_some(initial),
            grad_hidden,
            grad_final: case.with_grad_final.then_some(grad_final),
        }
    }
}

/// Runs the library's forward and backward on `inputs` and compares every output
/// with the float64 reference computed on the same (already rounded) values.
fn check_case<T: TestElem>(case: &Case, inputs: &Inputs<T>) {
    let shape = case.shape();
    let problem = case.problem();
    let ctx = format!("{} {case:?}", T::NAME);

    // Forward.
    let gates = widen(&inputs.gates);
    let tokens = widen(&inputs.tokens);
    let initial = inputs.initial.as_deref().map(widen);
    let want = ref_forward(&shape, case.reverse, &gates, &tokens, initial.as_deref());
    let scale = ref_forward(
        &shape,
        case.reverse,
        &abs_all(&gates),
        &abs_all(&tokens),
        initial.as_deref().map(abs_all).as_deref(),
    );
    let mut hidden = sentinel::<T>(shape.numel());
    let mut final_state = case.want_final.then(|| sentinel::<T>(shape.state_numel()));
    scan_forward(
        &problem,
        ScanInputs {
            gates: &inputs.gates,
            tokens: &inputs.tokens,
            initial: inputs.initial.as_deref(),
        },
        ScanOutputs {
            hidden: &mut hidden,
            final_state: final_state.as_deref_mut(),
        },
    )
    .unwrap_or_else(|e| panic!("scan_forward failed: {e}; {ctx}"));
    assert_close(
        "hidden",
        &hidden,
        &want.hidden,
        &scale.hidden,
        &shape,
        false,
        &ctx,
    );
    if let Some(final_state) = &final_state {
        assert_close(
            "final_state",
            final_state,
            &want.final_state,
            &scale.final_state,
            &shape,
            true,
            &ctx,
        );
    }

    // Backward, given the reference's `h` stored in `T` (so it does not depend on
    // the library's forward).
    let hidden_t = narrow::<T>(&want.hidden);
    let hidden_ref = widen(&hidden_t);
    let grad_hidden = widen(&inputs.grad_hidden);
    let grad_final = inputs.grad_final.as_deref().map(widen);
    let want = ref_backward(
        &shape,
        case.reverse,
        &gates,
        &hidden_ref,
        initial.as_deref(),
        &grad_hidden,
        grad_final.as_deref(),
    );
    let scale = ref_backward(
        &shape,
        case.reverse,
        &abs_all(&gates),
        &abs_all(&hidden_ref),
        initial.as_deref().map(abs_all).as_deref(),
        &abs_all(&grad_hidden),
        grad_final.as_deref().map(abs_all).as_deref(),
    );
    let mut grad_gates = sentinel::<T>(shape.numel());
    let mut grad_tokens = sentinel::<T>(shape.numel());
    let mut grad_initial = case
        .want_grad_initial
        .then(|| sentinel::<T>(shape.state_numel()));
    scan_backward(
        &problem,
        ScanGradInputs {
            gates: &inputs.gates,
            hidden: &hidden_t,
            initial: inputs.initial.as_deref(),
            grad_hidden: &inputs.grad_hidden,
            grad_final: inputs.grad_final.as_deref(),
        },
        ScanGradOutputs {
            grad_gates: &mut grad_gates,
            grad_tokens: &mut grad_tokens,
            grad_initial: grad_initial.as_deref_mut(),
        },
    )
    .unwrap_or_else(|e| panic!("scan_backward failed: {e}; {ctx}"));
    assert_close(
        "grad_gates",
        &grad_gates,
        &want.grad_gates,
        &scale.grad_gates,
        &shape,
        false,
        &ctx,
    );
    assert_close(
        "grad_tokens",
        &grad_tokens,
        &want.grad_tokens,
        &scale.grad_tokens,
        &shape,
        false,
        &ctx,
    );
    if let Some(grad_initial) = &grad_initial {
        assert_close(
            "grad_initial",
            grad_initial,
            &want.grad_initial,
            &scale.grad_initial,
            &shape,
            true,
            &ctx,
        );
    }
}

fn run_case<T: TestElem>(case: &Case) {
    check_case::<T>(case, &Inputs::<T>::random(case));
}

/// Runs `f` on a rayon pool of `threads` threads: the chunk plan depends on the
/// thread count, so this varies the number of chunks.
fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
        .install(f)
}

// ---------------------------------------------------------------------------
// The reference itself
// ---------------------------------------------------------------------------

#[test]
fn reference_forward_small_example() {
    let shape = ScanShape::new(1, 3, 1).unwrap();
    let (gates, tokens) = ([0.5, 0.5, 0.5], [1.0, 1.0, 1.0]);
    let f = ref_forward(&shape, false, &gates, &tokens, None);
    assert_eq!(f.hidden, [1.0, 1.5, 1.75]);
    assert_eq!(f.final_state, [1.75]);
    let r = ref_forward(&shape, true, &gates, &tokens, Some(&[2.0]));
    assert_eq!(r.hidden, [2.0, 2.0, 2.0]);
    assert_eq!(r.final_state, [2.0]);
}

/// The loss `Σ gh·h + Σ gf·final` is affine in each single input (`h` is linear in
/// `x[t]` and `h0`, and in `a[t]` when the other inputs are fixed), so central
/// differences are exact up to rounding.
#[test]
fn reference_backward_matches_finite_differences() {
    for reverse in [false, true] {
        let shape = ScanShape::new(2, 5, 3).unwrap();
        let (n, m) = (shape.numel(), shape.state_numel());
        let mut rng = Rng(11 + reverse as u64);
        let gates = rng.vec(n, -1.05, 1.05);
        let tokens = rng.vec(n, -1.0, 1.0);
        let initial = rng.vec(m, -1.0, 1.0);
        let grad_hidden = rng.vec(n, -1.0, 1.0);
        let grad_final = rng.vec(m, -1.0, 1.0);
        let loss = |gates: &[f64], tokens: &[f64], initial: &[f64]| {
            let f = ref_forward(&shape, reverse, gates, tokens, Some(initial));
            dot(&f.hidden, &grad_hidden) + dot(&f.final_state, &grad_final)
        };
        let fwd = ref_forward(&shape, reverse, &gates, &tokens, Some(&initial));
        let grads = ref_backward(
            &shape,
            reverse,
            &gates,
            &fwd.hidden,
            Some(&initial),
            &grad_hidden,
            Some(&grad_final),
        );
        let step = 1e-3;
        let central = |which: usize, i: usize| {
            let eval = |e: f64| {
                let (mut a, mut x, mut h0) = (gates.clone(), tokens.clone(), initial.clone());
                [&mut a, &mut x, &mut h0][which][i] += e;
                loss(&a, &x, &h0)
            };
            (eval(step) - eval(-step)) / (2.0 * step)
        };
        let check = |name: &str, which: usize, analytic: &[f64]| {
            for (i, &want) in analytic.iter().enumerate() {
                let fd = central(which, i);
                assert!(
                    (fd - want).abs() <= 1e-9 * (1.0 + want.abs()),
                    "{name}[{i}] reverse={reverse}: finite difference {fd}, formula {want}"
                );
            }
        };
        check("grad_gates", 0, &grads.grad_gates);
        check("grad_tokens", 1, &grads.grad_tokens);
        check("grad_initial", 2, &grads.grad_initial);
    }
}

// ---------------------------------------------------------------------------
// Property tests over random shapes and options
// ---------------------------------------------------------------------------

/// Lengths: tiny, around powers of two (chunk-size-like boundaries) and primes.
const LENS: &[usize] = &[
    0, 1, 2, 3, 5, 7, 11, 13, 16, 17, 31, 32, 33, 63, 64, 65, 97, 127, 128, 129, 255, 256, 257,
    509, 511, 512, 513, 1021, 1023, 1024, 1025,
];

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Write no regression files next to the tests.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        1usize..=5,
        1usize..=6,
        prop::sample::select(LENS),
        any::<bool>(),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        any::<u64>(),
    )
        .prop_map(
            |(
                outer,
                inner,
                len,
                reverse,
                (with_initial, want_final, with_grad_final, want_grad_initial),
                seed,
            )| Case {
                outer,
                len,
                inner,
                reverse,
                with_initial,
                want_final,
                with_grad_final,
                want_grad_initial,
                seed,
            },
        )
}

/// Shapes whose time axis gets cut into chunks: at least 2·MIN_UNIT_ELEMENTS
/// (2^16) elements per outer slice, and `outer ≤ 3` so that even one thread wants
/// `⌈4/outer⌉ ≥ 2` units per slice.
fn chunked_case_strategy() -> impl Strategy<Value = (Case, usize)> {
    (
        1usize..=3,
        1usize..=3,
        65_536usize..=140_000,
        any::<bool>(),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        any::<u64>(),
        1usize..=6,
    )
        .prop_map(|(outer, inner, per_slice, reverse, flags, seed, threads)| {
            let (with_initial, want_final, with_grad_final, want_grad_initial) = flags;
            let case = Case {
                outer,
                len: per_slice.div_ceil(inner),
                inner,
                reverse,
                with_initial,
                want_final,
                with_grad_final,
                want_grad_initial,
                seed,
            };
            (case, threads)
        })
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn random_shapes_f64(case in case_strategy()) {
        run_case::<f64>(&case);
    }

    #[test]
    fn random_shapes_f32(case in case_strategy()) {
        run_case::<f32>(&case);
    }

    #[test]
    fn random_shapes_f16(case in case_strategy()) {
        run_case::<f16>(&case);
    }

    #[test]
    fn random_shapes_bf16(case in case_strategy()) {
        run_case::<bf16>(&case);
    }
}

proptest! {
    #![proptest_config(config(4))]

    #[test]
    fn random_chunked_f64((case, threads) in chunked_case_strategy()) {
        with_threads(threads, || run_case::<f64>(&case));
    }
}

// ---------------------------------------------------------------------------
// The chunked three-phase path, explicitly
// ---------------------------------------------------------------------------
//
// `ChunkPlan` cuts the time axis into min(4·threads/outer, len·inner / 2^15) chunks
// (at least 1): with outer = 1 and len·inner = 300_000, that is 4 chunks on one
// thread, 8 on two and 9 (uneven: 8 × 33_334 + 33_328) on three or more.

#[test]
fn chunked_single_sequence_f64() {
    for threads in [1, 2, 3] {
        for reverse in [false, true] {
            let case = Case::full(1, 300_000, 1, reverse, 1000 + threads as u64);
            with_threads(threads, || run_case::<f64>(&case));
        }
    }
}

#[test]
fn chunked_three_channels_f64() {
    for threads in [2, 3] {
        for reverse in [false, true] {
            let case = Case::full(1, 100_000, 3, reverse, 2000 + threads as u64);
            with_threads(threads, || run_case::<f64>(&case));
        }
    }
}

#[test]
fn chunked_f32_and_half() {
    for reverse in [false, true] {
        run_case::<f32>(&Case::full(1, 300_000, 1, reverse, 3000));
        run_case::<f32>(&Case::full(1, 100_000, 3, reverse, 3001));
        run_case::<bf16>(&Case::full(1, 100_000, 3, reverse, 3002));
        run_case::<f16>(&Case::full(1, 100_000, 3, reverse, 3003));
    }
}

/// Several outer slices, each cut in chunks, without initial state / grad_final.
#[test]
fn chunked_several_outer_slices() {
    let mut case = Case::full(3, 70_001, 1, false, 4000);
    case.with_initial = false;
    case.with_grad_final = false;
    for reverse in [false, true] {
        case.reverse = reverse;
        with_threads(2, || run_case::<f64>(&case));
    }
}

// ---------------------------------------------------------------------------
// Edge cases
// ---------------------------------------------------------------------------

fn len_zero<T: TestElem>() {
    let shape = ScanShape::new(2, 0, 3).unwrap();
    let initial = narrow::<T>(&[0.5, -1.0, 2.0, 0.0, -0.25, 3.0]);
    let grad_final = narrow::<T>(&[-0.5, 1.5, 0.75, -2.0, 0.125, 1.0]);
    for reverse in [false, true] {
        let problem = ScanProblem { shape, reverse };
        for with_initial in [false, true] {
            let mut hidden: Vec<T> = Vec::new();
            let mut final_state = sentinel::<T>(6);
            scan_forward(
                &problem,
                ScanInputs {
                    gates: &[],
                    tokens: &[],
                    initial: with_initial.then_some(&initial[..]),
                },
                ScanOutputs {
                    hidden: &mut hidden,
                    final_state: Some(&mut final_state),
                },
            )
            .unwrap();
            let want = if with_initial {
                initial.clone()
            } else {
                narrow::<T>(&[0.0; 6])
            };
            assert_eq!(
                final_state,
                want,
                "{} final_state, reverse={reverse}",
                T::NAME
            );
        }
        for with_grad_final in [false, true] {
            let mut grad_initial = sentinel::<T>(6);
            scan_backward(
                &problem,
                ScanGradInputs {
                    gates: &[],
                    hidden: &[],
                    initial: Some(&initial),
                    grad_hidden: &[],
                    grad_final: with_grad_final.then_some(&grad_final[..]),
                },
                ScanGradOutputs {
                    grad_gates: &mut [],
                    grad_tokens: &mut [],
                    grad_initial: Some(&mut grad_initial),
                },
            )
            .unwrap();
            let want = if with_grad_final {
                grad_final.clone()
            } else {
                narrow::<T>(&[0.0; 6])
            };
            assert_eq!(
                grad_initial,
                want,
                "{} grad_initial, reverse={reverse}",
                T::NAME
            );
        }
    }
}

#[test]
fn len_zero_final_is_initial_and_grad_initial_is_grad_final() {
    len_zero::<f64>();
    len_zero::<f32>();
    len_zero::<f16>();
    len_zero::<bf16>();
}

#[test]
fn empty_outer_or_inner_is_a_no_op() {
    let shapes = [
        (0, 5, 3),
        (3, 5, 0),
        (0, 0, 0),
        (0, 0, 4),
        (4, 0, 0),
        (0, 100_000, 3),
        (4, 100_000, 0),
    ];
    for (outer, len, inner) in shapes {
        let shape = ScanShape::new(outer, len, inner).unwrap();
        assert_eq!(shape.numel(), 0);
        assert_eq!(shape.state_numel(), 0);
        for reverse in [false, true] {
            let problem = ScanProblem { shape, reverse };
            for optional in [false, true] {
                let empty: &[f32] = &[];
                let (mut a, mut b, mut c, mut d, mut e) = (
                    Vec::<f32>::new(),
                    Vec::<f32>::new(),
                    Vec::<f32>::new(),
                    Vec::<f32>::new(),
                    Vec::<f32>::new(),
                );
                scan_forward(
                    &problem,
                    ScanInputs {
                        gates: empty,
                        tokens: empty,
                        initial: optional.then_some(empty),
                    },
                    ScanOutputs {
                        hidden: &mut a,
                        final_state: optional.then_some(&mut b[..]),
                    },
                )
                .unwrap_or_else(|err| panic!("{shape:?}: {err}"));
                scan_backward(
                    &problem,
                    ScanGradInputs {
                        gates: empty,
                        hidden: empty,
                        initial: optional.then_some(empty),
                        grad_hidden: empty,
                        grad_final: optional.then_some(empty),
                    },
                    ScanGradOutputs {
                        grad_gates: &mut c,
                        grad_tokens: &mut d,
                        grad_initial: optional.then_some(&mut e[..]),
                    },
                )
                .unwrap_or_else(|err| panic!("{shape:?}: {err}"));
            }
        }
    }
}

/// A non-finite input anywhere must not panic, must reach every output the
/// reference says it reaches (as NaN or ±Inf: the chunked path may turn an Inf into
/// a NaN through `0·Inf` where a chunk's gate product underflows), and must leave
/// every other output correct.
fn poisoned<T: TestElem>(case: &Case, poison: f64, threads: usize) {
    let shape = case.shape();
    let (p, q) = (shape.outer / 2, shape.inner / 2);
    let t = shape.len / 2;
    let i = at(&shape, p, t, q);
    let s = p * shape.inner + q;
    type Poison<T> = fn(&mut Inputs<T>, usize, usize, T);
    let targets: [(&str, Poison<T>); 5] = [
        ("tokens", |inp, i, _, v| inp.tokens[i] = v),
        ("gates", |inp, i, _, v| inp.gates[i] = v),
        ("grad_hidden", |inp, i, _, v| inp.grad_hidden[i] = v),
        ("initial", |inp, _, s, v| {
            if let Some(h0) = inp.initial.as_mut() {
                h0[s] = v;
            }
        }),
        ("grad_final", |inp, _, s, v| {
            if let Some(gf) = inp.grad_final.as_mut() {
                gf[s] = v;
            }
        }),
    ];
    for (name, set) in targets {
        let mut inputs = Inputs::<T>::random(case);
        // Gates away from 0, so that every later step sees the poison.
        for g in inputs.gates.iter_mut() {
            *g = T::from_f64(0.5 + 0.5 * g.to_f64().abs().min(0.99));
        }
        set(&mut inputs, i, s, T::from_f64(poison));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_threads(threads, || check_case::<T>(case, &inputs))
        }));
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{poison} in {name} at {}: {msg}", locate(&shape, false, i));
        }
    }
}

#[test]
fn non_finite_inputs_propagate() {
    for reverse in [false, true] {
        let case = Case::full(3, 40, 4, reverse, 5000);
        for poison in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            poisoned::<f64>(&case, poison, 2);
            poisoned::<f32>(&case, poison, 2);
            poisoned::<f16>(&case, poison, 2);
            poisoned::<bf16>(&case, poison, 2);
        }
    }
}

#[test]
fn non_finite_inputs_propagate_chunked() {
    for reverse in [false, true] {
        let case = Case::full(1, 100_000, 1, reverse, 6000);
        poisoned::<f32>(&case, f64::NAN, 3);
        poisoned::<f64>(&case, f64::INFINITY, 2);
    }
}

// ---------------------------------------------------------------------------
// Invalid arguments
// ---------------------------------------------------------------------------

fn arg_of(err: Error) -> &'static str {
    match err {
        Error::InvalidArgument { arg, .. } => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// Forward on shape (2, 5, 3) with the buffer called `bad` one element too long
/// (`delta = 1`) or too short (`delta = -1`).
fn forward_with_bad(bad: &str, delta: isize) -> ferroscan::Result<()> {
    let problem = ScanProblem {
        shape: ScanShape::new(2, 5, 3).unwrap(),
        reverse: false,
    };
    let n = |name: &str, len: usize| {
        if name == bad {
            len.checked_add_signed(delta).unwrap()
        } else {
            len
        }
    };
    let gates = vec![0.5f32; n("gates", 30)];
    let tokens = vec![1.0f32; n("tokens", 30)];
    let initial = vec![0.0f32; n("initial", 6)];
    let mut hidden = vec![0.0f32; n("hidden", 30)];
    let mut final_state = vec![0.0f32; n("final_state", 6)];
    scan_forward(
        &problem,
        ScanInputs {
            gates: &gates,
            tokens: &tokens,
            initial: Some(&initial),
        },
        ScanOutputs {
            hidden: &mut hidden,
            final_state: Some(&mut final_state),
        },
    )
}

/// Backward on shape (2, 5, 3) with the buffer called `bad` resized by `delta`.
fn backward_with_bad(bad: &str, delta: isize) -> ferroscan::Result<()> {
    let problem = ScanProblem {
        shape: ScanShape::new(2, 5, 3).unwrap(),
        reverse: true,
    };
    let n = |name: &str, len: usize| {
        if name == bad {
            len.checked_add_signed(delta).unwrap()
        } else {
            len
        }
    };
    let gates = vec![0.5f64; n("gates", 30)];
    let hidden = vec![1.0f64; n("hidden", 30)];
    let initial = vec![0.0f64; n("initial", 6)];
    let grad_hidden = vec![1.0f64; n("grad_hidden", 30)];
    let grad_final = vec![1.0f64; n("grad_final", 6)];
    let mut grad_gates = vec![0.0f64; n("grad_gates", 30)];
    let mut grad_tokens = vec![0.0f64; n("grad_tokens", 30)];
    let mut grad_initial = vec![0.0f64; n("grad_initial", 6)];
    scan_backward(
        &problem,
        ScanGradInputs {
            gates: &gates,
            hidden: &hidden,
            initial: Some(&initial),
            grad_hidden: &grad_hidden,
            grad_final: Some(&grad_final),
        },
        ScanGradOutputs {
            grad_gates: &mut grad_gates,
            grad_tokens: &mut grad_tokens,
            grad_initial: Some(&mut grad_initial),
        },
    )
}

#[test]
fn wrong_buffer_lengths_are_invalid_arguments() {
    forward_with_bad("", 0).expect("valid forward");
    backward_with_bad("", 0).expect("valid backward");
    for delta in [-1, 1] {
        for name in ["gates", "tokens", "hidden", "initial", "final_state"] {
            let err = forward_with_bad(name, delta).expect_err(name);
            assert!(err.to_string().contains(name), "message of {name}: {err}");
            assert_eq!(arg_of(err), name, "forward, delta {delta}");
        }
        for name in [
            "gates",
            "hidden",
            "grad_hidden",
            "grad_gates",
            "grad_tokens",
            "initial",
            "grad_final",
            "grad_initial",
        ] {
            let err = backward_with_bad(name, delta).expect_err(name);
            assert!(err.to_string().contains(name), "message of {name}: {err}");
            assert_eq!(arg_of(err), name, "backward, delta {delta}");
        }
    }
}

/// A state buffer sized like a tensor is rejected, also when `len == 0`.
#[test]
fn state_sized_like_a_tensor_is_rejected() {
    let problem = ScanProblem {
        shape: ScanShape::new(2, 4, 3).unwrap(),
        reverse: false,
    };
    let x = vec![0.5f32; 24];
    let mut h = vec![0.0f32; 24];
    let err = scan_forward(
        &problem,
        ScanInputs {
            gates: &x,
            tokens: &x,
            initial: Some(&x),
        },
        ScanOutputs {
            hidden: &mut h,
            final_state: None,
        },
    )
    .unwrap_err();
    assert_eq!(arg_of(err), "initial");

    let empty = ScanProblem {
        shape: ScanShape::new(2, 0, 3).unwrap(),
        reverse: true,
    };
    let short = [1.0f32; 5];
    let mut grad_initial = [0.0f32; 6];
    let err = scan_backward(
        &empty,
        ScanGradInputs {
            gates: &[],
            hidden: &[],
            initial: None,
            grad_hidden: &[],
            grad_final: Some(&short),
        },
        ScanGradOutputs {
            grad_gates: &mut [],
            grad_tokens: &mut [],
            grad_initial: Some(&mut grad_initial),
        },
    )
    .unwrap_err();
    assert_eq!(arg_of(err), "grad_final");
}

#[test]
fn invalid_shapes_are_invalid_arguments() {
    assert_eq!(
        arg_of(ScanShape::new(usize::MAX, 2, 1).unwrap_err()),
        "shape"
    );
    assert_eq!(
        arg_of(ScanShape::new(1 << 40, 1 << 40, 1).unwrap_err()),
        "shape"
    );
    assert_eq!(arg_of(ScanShape::from_dims(&[2, 3], 2).unwrap_err()), "dim");
    let s = ScanShape::from_dims(&[2, 3, 5, 7], 1).unwrap();
    assert_eq!((s.outer, s.len, s.inner), (2, 3, 35));
}
