//! Python bindings of ferroscan: argument conversion only.
//!
//! Tensors arrive as addresses (`int`, 0 for an absent optional) of C-contiguous buffers that
//! the Python package allocated and validated; shapes arrive as `(outer, len, inner)`. Errors
//! become `ValueError` (bad argument) or `RuntimeError` (CUDA/NVRTC/driver); a Rust panic is
//! caught and reported as `RuntimeError`, never unwound into Python.

use std::panic::{catch_unwind, AssertUnwindSafe};

use ferroscan::args::{ScanGradInputs, ScanGradOutputs, ScanInputs, ScanOutputs};
use ferroscan::cpu::{self, Element};
use ferroscan::selective::{
    strided_extent, Bc, BcGrad, SelectiveGradInputs, SelectiveGradOutputs, SelectiveInputs,
    SelectiveOutputs, SelectiveProblem, Seq, Strided, CHECKPOINT_STEPS,
};
use ferroscan::{cuda, DType, Error, ScanProblem, ScanShape};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

mod gated_scan;

fn to_py(err: Error) -> PyErr {
    match err {
        Error::InvalidArgument { .. } => PyValueError::new_err(err.to_string()),
        _ => PyRuntimeError::new_err(err.to_string()),
    }
}

/// Runs `f` with the GIL released, turning errors and panics into Python exceptions.
fn run_detached<R: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<R, Error> + Send,
) -> PyResult<R> {
    py.detach(|| catch_unwind(AssertUnwindSafe(f)))
        .map_err(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            PyRuntimeError::new_err(format!("ferroscan internal error (please report): {msg}"))
        })?
        .map_err(to_py)
}

/// The element type and problem of a call.
fn parse(
    dtype: &str,
    (outer, len, inner): (usize, usize, usize),
    reverse: bool,
) -> PyResult<(DType, ScanProblem)> {
    let dtype = DType::parse(dtype).map_err(to_py)?;
    let shape = ScanShape::new(outer, len, inner).map_err(to_py)?;
    Ok((dtype, ScanProblem { shape, reverse }))
}

/// An optional buffer: address 0 means absent.
fn opt<A: PartialEq + Default>(addr: A) -> Option<A> {
    (addr != A::default()).then_some(addr)
}

/// Runs `f` on device `device` with PyTorch's stream `stream`, the GIL released.
///
/// # Safety
/// `stream` must be a live stream of the device's primary context (PyTorch's current stream),
/// and every address `f` passes on must be valid for its shape until the stream ran the kernels.
unsafe fn on_cuda<R: Send>(
    py: Python<'_>,
    device: usize,
    stream: u64,
    f: impl FnOnce(&cuda::Device, &cudarc::driver::CudaStream) -> Result<R, Error> + Send,
) -> PyResult<R> {
    run_detached(py, move || {
        let dev = cuda::device(device)?;
        // SAFETY: guaranteed by the caller.
        let stream = unsafe { dev.borrowed_stream(stream) };
        f(&dev, &stream)
    })
}

/// A host buffer of `n` elements at `addr`.
///
/// # Safety
/// `addr` must point to `n` initialized, aligned elements of `T` that stay alive and are not
/// written by anyone else for `'a`.
unsafe fn host<'a, T>(addr: usize, n: usize) -> &'a [T] {
    if n == 0 {
        &[]
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(addr as *const T, n) }
    }
}

/// A mutable host buffer; see [`host`].
///
/// # Safety
/// As for [`host`], and nobody else reads or writes it for `'a`.
unsafe fn host_mut<'a, T>(addr: usize, n: usize) -> &'a mut [T] {
    if n == 0 {
        &mut []
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut T, n) }
    }
}

/// Calls `$body` with `$t` bound to the element type named by `$dtype`.
macro_rules! with_element {
    ($dtype:expr, $t:ident, $body:expr) => {
        match $dtype {
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
        }
    };
}

/// # Safety
/// The addresses describe valid host buffers of `problem`'s shapes (see [`host`]).
unsafe fn cpu_forward<T: Element>(
    problem: &ScanProblem,
    inputs: ScanInputs<usize>,
    outputs: ScanOutputs<usize>,
) -> Result<(), Error> {
    let (n, s) = (problem.shape.numel(), problem.shape.state_numel());
    // SAFETY: guaranteed by the caller.
    unsafe {
        cpu::scan_forward::<T>(
            problem,
            ScanInputs {
                gates: host(inputs.gates, n),
                tokens: host(inputs.tokens, n),
                initial: inputs.initial.map(|a| host(a, s)),
            },
            ScanOutputs {
                hidden: host_mut(outputs.hidden, n),
                final_state: outputs.final_state.map(|a| host_mut(a, s)),
            },
        )
    }
}

/// # Safety
/// The addresses describe valid host buffers of `problem`'s shapes (see [`host`]).
unsafe fn cpu_backward<T: Element>(
    problem: &ScanProblem,
    inputs: ScanGradInputs<usize>,
    outputs: ScanGradOutputs<usize>,
) -> Result<(), Error> {
    let (n, s) = (problem.shape.numel(), problem.shape.state_numel());
    // SAFETY: guaranteed by the caller.
    unsafe {
        cpu::scan_backward::<T>(
            problem,
            ScanGradInputs {
                gates: host(inputs.gates, n),
                hidden: host(inputs.hidden, n),
                initial: inputs.initial.map(|a| host(a, s)),
                grad_hidden: host(inputs.grad_hidden, n),
                grad_final: inputs.grad_final.map(|a| host(a, s)),
            },
            ScanGradOutputs {
                grad_gates: host_mut(outputs.grad_gates, n),
                grad_tokens: host_mut(outputs.grad_tokens, n),
                grad_initial: outputs.grad_initial.map(|a| host_mut(a, s)),
            },
        )
    }
}

/// Forward scan of host buffers: `shape = (outer, len, inner)`; addresses are `int`, 0 = absent.
#[pyfunction]
#[pyo3(signature = (dtype, shape, reverse, gates, tokens, initial, hidden, final_state))]
#[allow(clippy::too_many_arguments)] // mirrors the operation's tensors one to one
fn cpu_scan_forward(
    py: Python<'_>,
    dtype: &str,
    shape: (usize, usize, usize),
    reverse: bool,
    gates: usize,
    tokens: usize,
    initial: usize,
    hidden: usize,
    final_state: usize,
) -> PyResult<()> {
    let (dtype, problem) = parse(dtype, shape, reverse)?;
    let inputs = ScanInputs {
        gates,
        tokens,
        initial: opt(initial),
    };
    let outputs = ScanOutputs {
        hidden,
        final_state: opt(final_state),
    };
    // SAFETY: the Python package passes contiguous CPU tensors of the shapes it validated.
    run_detached(py, move || {
        with_element!(dtype, T, unsafe {
            cpu_forward::<T>(&problem, inputs, outputs)
        })
    })
}

/// Backward scan of host buffers; see `cpu_scan_forward`.
#[pyfunction]
#[pyo3(signature = (dtype, shape, reverse, gates, hidden, initial, grad_hidden, grad_final, grad_gates, grad_tokens, grad_initial))]
#[allow(clippy::too_many_arguments)] // mirrors the operation's tensors one to one
fn cpu_scan_backward(
    py: Python<'_>,
    dtype: &str,
    shape: (usize, usize, usize),
    reverse: bool,
    gates: usize,
    hidden: usize,
    initial: usize,
    grad_hidden: usize,
    grad_final: usize,
    grad_gates: usize,
    grad_tokens: usize,
    grad_initial: usize,
) -> PyResult<()> {
    let (dtype, problem) = parse(dtype, shape, reverse)?;
    let inputs = ScanGradInputs {
        gates,
        hidden,
        initial: opt(initial),
        grad_hidden,
        grad_final: opt(grad_final),
    };
    let outputs = ScanGradOutputs {
        grad_gates,
        grad_tokens,
        grad_initial: opt(grad_initial),
    };
    // SAFETY: the Python package passes contiguous CPU tensors of the shapes it validated.
    run_detached(py, move || {
        with_element!(dtype, T, unsafe {
            cpu_backward::<T>(&problem, inputs, outputs)
        })
    })
}

/// Scratch bytes a CUDA scan of this problem needs on device `device`.
#[pyfunction]
fn cuda_scan_scratch_bytes(
    py: Python<'_>,
    device: usize,
    dtype: &str,
    shape: (usize, usize, usize),
) -> PyResult<usize> {
    let (dtype, problem) = parse(dtype, shape, false)?;
    run_detached(py, move || {
        let dev = cuda::device(device)?;
        Ok(cuda::scan::scan_scratch_bytes(&dev, dtype, &problem))
    })
}

/// Forward scan of device buffers on the CUDA stream `stream` (PyTorch's current stream).
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, shape, reverse, gates, tokens, initial, hidden, final_state, scratch, scratch_bytes))]
#[allow(clippy::too_many_arguments)] // mirrors the operation's tensors one to one
fn cuda_scan_forward(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    shape: (usize, usize, usize),
    reverse: bool,
    gates: u64,
    tokens: u64,
    initial: u64,
    hidden: u64,
    final_state: u64,
    scratch: u64,
    scratch_bytes: usize,
) -> PyResult<()> {
    let (dtype, problem) = parse(dtype, shape, reverse)?;
    // SAFETY: the Python package passes PyTorch's live stream of this device and contiguous
    // tensors of the validated shapes on it, kept alive by the caching allocator's stream
    // semantics until the kernels ran.
    unsafe {
        on_cuda(py, device, stream, move |dev, stream| {
            cuda::scan::scan_forward_raw(
                dev,
                stream,
                dtype,
                &problem,
                ScanInputs {
                    gates,
                    tokens,
                    initial: opt(initial),
                },
                ScanOutputs {
                    hidden,
                    final_state: opt(final_state),
                },
                (scratch, scratch_bytes),
            )
        })
    }
}

/// Backward scan of device buffers on the CUDA stream `stream`.
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, shape, reverse, gates, hidden, initial, grad_hidden, grad_final, grad_gates, grad_tokens, grad_initial, scratch, scratch_bytes))]
#[allow(clippy::too_many_arguments)] // mirrors the operation's tensors one to one
fn cuda_scan_backward(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    shape: (usize, usize, usize),
    reverse: bool,
    gates: u64,
    hidden: u64,
    initial: u64,
    grad_hidden: u64,
    grad_final: u64,
    grad_gates: u64,
    grad_tokens: u64,
    grad_initial: u64,
    scratch: u64,
    scratch_bytes: usize,
) -> PyResult<()> {
    let (dtype, problem) = parse(dtype, shape, reverse)?;
    // SAFETY: as in `cuda_scan_forward`.
    unsafe {
        on_cuda(py, device, stream, move |dev, stream| {
            cuda::scan::scan_backward_raw(
                dev,
                stream,
                dtype,
                &problem,
                ScanGradInputs {
                    gates,
                    hidden,
                    initial: opt(initial),
                    grad_hidden,
                    grad_final: opt(grad_final),
                },
                ScanGradOutputs {
                    grad_gates,
                    grad_tokens,
                    grad_initial: opt(grad_initial),
                },
                (scratch, scratch_bytes),
            )
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Selective scan
// ---------------------------------------------------------------------------------------------

/// `(batch, dim, len, dstate, complex, delta_softplus)`.
type ProblemArg = (usize, usize, usize, usize, bool, bool);
/// A strided `(batch, dim, time)` tensor: `(address, strides)`; address 0 = absent.
type SeqArg = (u64, (usize, usize, usize));
/// `B` or `C`: `(address, groups, strides)`; `groups == 0` means constant `(dim, N)` weights
/// (strides ignored), else a variable `(batch, groups, N, L·parts)` tensor.
type BcArg = (u64, usize, (usize, usize, usize, usize));

fn selective_problem(dtype: &str, p: ProblemArg) -> PyResult<(DType, SelectiveProblem)> {
    let dtype = DType::parse(dtype).map_err(to_py)?;
    let problem = SelectiveProblem::new((p.0, p.1, p.2, p.3), p.4, p.5).map_err(to_py)?;
    Ok((dtype, problem))
}

fn seq_arg((address, (s0, s1, s2)): SeqArg) -> Seq<u64> {
    Strided {
        data: address,
        strides: [s0, s1, s2],
    }
}

fn bc_arg((address, groups, (s0, s1, s2, s3)): BcArg) -> Bc<u64, u64> {
    if groups == 0 {
        Bc::Constant(address)
    } else {
        Bc::Variable {
            tensor: Strided {
                data: address,
                strides: [s0, s1, s2, s3],
            },
            groups,
        }
    }
}

/// The inputs as device or host addresses (0 = absent).
#[allow(clippy::too_many_arguments)] // mirrors the operation's tensors one to one
fn selective_inputs(
    u: SeqArg,
    delta: SeqArg,
    a: u64,
    b: BcArg,
    c: BcArg,
    d: u64,
    z: SeqArg,
    delta_bias: u64,
    initial: u64,
) -> SelectiveInputs<u64, u64> {
    SelectiveInputs {
        u: seq_arg(u),
        delta: seq_arg(delta),
        a,
        b: bc_arg(b),
        c: bc_arg(c),
        d: opt(d),
        z: opt(z.0).map(|_| seq_arg(z)),
        delta_bias: opt(delta_bias),
        initial: opt(initial),
    }
}

/// A strided host tensor of `shape` at `address` as the slice it spans.
///
/// # Safety
/// As for [`host`], for the elements the shape and strides reach.
unsafe fn host_strided<'a, T, const R: usize>(
    arg: &'static str,
    tensor: Strided<u64, R>,
    shape: [usize; R],
) -> Result<Strided<&'a [T], R>, Error> {
    let extent = strided_extent(shape, tensor.strides)
        .ok_or_else(|| Error::invalid(arg, "strides whose span fits in memory"))?;
    // SAFETY: guaranteed by the caller.
    let data = unsafe { host(tensor.data as usize, extent) };
    Ok(Strided {
        data,
        strides: tensor.strides,
    })
}

/// Host slices for the inputs of `p` at their addresses.
///
/// # Safety
/// Every address points to a live host tensor of the shape and element type the problem gives
/// it (see [`host`]).
unsafe fn host_inputs<'a, T: Element>(
    p: &SelectiveProblem,
    x: SelectiveInputs<u64, u64>,
) -> Result<SelectiveInputs<&'a [T], &'a [T::Acc]>, Error> {
    let seq = [p.batch, p.dim, p.len];
    let weights = |addr: u64, n: usize| -> &'a [T::Acc] {
        // SAFETY: guaranteed by the caller.
        unsafe { host(addr as usize, n) }
    };
    let bc = |arg: &'static str, bc: Bc<u64, u64>| -> Result<Bc<&'a [T], &'a [T::Acc]>, Error> {
        Ok(match bc {
            Bc::Constant(addr) => Bc::Constant(weights(addr, p.param_numel())),
            Bc::Variable { tensor, groups } => {
                p.check_groups(arg, groups)?;
                let shape = [p.batch, groups, p.dstate, p.len * p.parts()];
                Bc::Variable {
                    // SAFETY: guaranteed by the caller.
                    tensor: unsafe { host_strided(arg, tensor, shape)? },
                    groups,
                }
            }
        })
    };
    // SAFETY: guaranteed by the caller.
    unsafe {
        Ok(SelectiveInputs {
            u: host_strided("u", x.u, seq)?,
            delta: host_strided("delta", x.delta, seq)?,
            a: weights(x.a, p.param_numel()),
            b: bc("B", x.b)?,
            c: bc("C", x.c)?,
            d: x.d.map(|a| weights(a, p.dim)),
            z: x.z.map(|z| host_strided("z", z, seq)).transpose()?,
            delta_bias: x.delta_bias.map(|a| weights(a, p.dim)),
            initial: x.initial.map(|a| weights(a, p.state_numel())),
        })
    }
}

/// # Safety
/// The addresses describe valid host buffers of `p`'s shapes (see [`host`]).
unsafe fn cpu_selective_forward<T: Element>(
    p: &SelectiveProblem,
    x: SelectiveInputs<u64, u64>,
    o: SelectiveOutputs<u64, u64>,
) -> Result<(), Error> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let inputs = host_inputs::<T>(p, x)?;
        let outputs = SelectiveOutputs {
            out: host_mut(o.out as usize, p.seq_numel()),
            last_state: o.last_state.map(|a| host_mut(a as usize, p.state_numel())),
            checkpoints: o
                .checkpoints
                .map(|a| host_mut(a as usize, p.checkpoint_numel())),
        };
        cpu::selective_scan_forward::<T>(p, inputs, outputs)
    }
}

/// # Safety
/// The addresses describe valid host buffers of `p`'s shapes (see [`host`]).
unsafe fn cpu_selective_backward<T: Element>(
    p: &SelectiveProblem,
    x: SelectiveInputs<u64, u64>,
    g: SelectiveGradInputs<u64, u64>,
    o: SelectiveGradOutputs<u64, u64>,
) -> Result<(), Error> {
    let groups = (x.b.groups(), x.c.groups());
    // SAFETY: guaranteed by the caller.
    unsafe {
        let inputs = host_inputs::<T>(p, x)?;
        let grads = SelectiveGradInputs {
            grad_out: host_strided("grad_out", g.grad_out, [p.batch, p.dim, p.len])?,
            grad_last: g.grad_last.map(|a| host(a as usize, p.state_numel())),
            checkpoints: host(g.checkpoints as usize, p.checkpoint_numel()),
        };
        let grad_bc = |g: BcGrad<u64, u64>, groups: Option<usize>| match g {
            BcGrad::Constant(a) => {
                BcGrad::Constant(host_mut::<T::Acc>(a as usize, p.param_numel()))
            }
            BcGrad::Variable(a) => BcGrad::Variable(host_mut::<T>(
                a as usize,
                p.variable_numel(groups.unwrap_or(0)),
            )),
        };
        let outputs = SelectiveGradOutputs {
            u: host_mut(o.u as usize, p.seq_numel()),
            delta: host_mut(o.delta as usize, p.seq_numel()),
            a: host_mut(o.a as usize, p.param_numel()),
            b: grad_bc(o.b, groups.0),
            c: grad_bc(o.c, groups.1),
            d: o.d.map(|a| host_mut(a as usize, p.dim)),
            z: o.z.map(|a| host_mut(a as usize, p.seq_numel())),
            delta_bias: o.delta_bias.map(|a| host_mut(a as usize, p.dim)),
            initial: o.initial.map(|a| host_mut(a as usize, p.state_numel())),
        };
        cpu::selective_scan_backward::<T>(p, inputs, grads, outputs)
    }
}

/// Gradient destinations of `B`/`C` of the same kind as the inputs.
fn grad_bc_of(input: &Bc<u64, u64>, address: u64) -> BcGrad<u64, u64> {
    match input {
        Bc::Constant(_) => BcGrad::Constant(address),
        Bc::Variable { .. } => BcGrad::Variable(address),
    }
}

/// Gradient outputs as addresses (0 = not wanted).
#[allow(clippy::too_many_arguments)] // mirrors the operation's gradients one to one
fn selective_grad_outputs(
    x: &SelectiveInputs<u64, u64>,
    u: u64,
    delta: u64,
    a: u64,
    b: u64,
    c: u64,
    d: u64,
    z: u64,
    delta_bias: u64,
    initial: u64,
) -> SelectiveGradOutputs<u64, u64> {
    SelectiveGradOutputs {
        u,
        delta,
        a,
        b: grad_bc_of(&x.b, b),
        c: grad_bc_of(&x.c, c),
        d: opt(d),
        z: opt(z),
        delta_bias: opt(delta_bias),
        initial: opt(initial),
    }
}

/// Selective scan forward of host buffers. `problem = (batch, dim, len, dstate, complex,
/// delta_softplus)`; sequences are `(address, strides)`, `B`/`C` are `(address, groups,
/// strides)` with `groups = 0` for constant weights; other addresses are `int`, 0 = absent.
#[pyfunction]
#[pyo3(signature = (dtype, problem, u, delta, a, b, c, d, z, delta_bias, initial, out, last_state, checkpoints))]
#[allow(clippy::too_many_arguments)] // mirrors the operation's tensors one to one
fn cpu_selective_scan_forward(
    py: Python<'_>,
    dtype: &str,
    problem: ProblemArg,
    u: SeqArg,
    delta: SeqArg,
    a: u64,
    b: BcArg,
    c: BcArg,
    d: u64,
    z: SeqArg,
    delta_bias: u64,
    initial: u64,
    out: u64,
    last_state: u64,
    checkpoints: u64,
) -> PyResult<()> {
    let (dtype, p) = selective_problem(dtype, problem)?;
    let x = selective_inputs(u, delta, a, b, c, d, z, delta_bias, initial);
    let o = SelectiveOutputs {
        out,
        last_state: opt(last_state),
        checkpoints: opt(checkpoints),
    };
    // SAFETY: the Python package passes CPU tensors of the shapes it validated, with their strides.
    run_detached(py, move || {
        with_element!(dtype, T, unsafe { cpu_selective_forward::<T>(&p, x, o) })
    })
}

/// Selective scan backward of host buffers; see `cpu_selective_scan_forward`. The gradient
/// addresses follow the inputs (0 = not wanted); gradients of `B`/`C` have the inputs' kind.
#[pyfunction]
#[pyo3(signature = (dtype, problem, u, delta, a, b, c, d, z, delta_bias, initial, grad_out, grad_last, checkpoints, grad_u, grad_delta, grad_a, grad_b, grad_c, grad_d, grad_z, grad_delta_bias, grad_initial))]
#[allow(clippy::too_many_arguments)] // mirrors the operation's tensors one to one
fn cpu_selective_scan_backward(
    py: Python<'_>,
    dtype: &str,
    problem: ProblemArg,
    u: SeqArg,
    delta: SeqArg,
    a: u64,
    b: BcArg,
    c: BcArg,
    d: u64,
    z: SeqArg,
    delta_bias: u64,
    initial: u64,
    grad_out: SeqArg,
    grad_last: u64,
    checkpoints: u64,
    grad_u: u64,
    grad_delta: u64,
    grad_a: u64,
    grad_b: u64,
    grad_c: u64,
    grad_d: u64,
    grad_z: u64,
    grad_delta_bias: u64,
    grad_initial: u64,
) -> PyResult<()> {
    let (dtype, p) = selective_problem(dtype, problem)?;
    let x = selective_inputs(u, delta, a, b, c, d, z, delta_bias, initial);
    let g = SelectiveGradInputs {
        grad_out: seq_arg(grad_out),
        grad_last: opt(grad_last),
        checkpoints,
    };
    let o = selective_grad_outputs(
        &x,
        grad_u,
        grad_delta,
        grad_a,
        grad_b,
        grad_c,
        grad_d,
        grad_z,
        grad_delta_bias,
        grad_initial,
    );
    // SAFETY: the Python package passes CPU tensors of the shapes it validated, with their strides.
    run_detached(py, move || {
        with_element!(dtype, T, unsafe {
            cpu_selective_backward::<T>(&p, x, g, o)
        })
    })
}

/// Scratch bytes the CUDA backward of this selective scan needs (`groups` 0 = constant B / C).
#[pyfunction]
fn cuda_selective_scratch_bytes(
    dtype: &str,
    problem: ProblemArg,
    b_groups: usize,
    c_groups: usize,
) -> PyResult<usize> {
    let (dtype, p) = selective_problem(dtype, problem)?;
    let groups = [opt(b_groups), opt(c_groups)];
    cuda::selective_scan::selective_backward_scratch_bytes(dtype, &p, groups).map_err(to_py)
}

/// Selective scan forward of device buffers on PyTorch's stream; arguments as for
/// `cpu_selective_scan_forward`.
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, problem, u, delta, a, b, c, d, z, delta_bias, initial, out, last_state, checkpoints))]
#[allow(clippy::too_many_arguments)] // mirrors the operation's tensors one to one
fn cuda_selective_scan_forward(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    problem: ProblemArg,
    u: SeqArg,
    delta: SeqArg,
    a: u64,
    b: BcArg,
    c: BcArg,
    d: u64,
    z: SeqArg,
    delta_bias: u64,
    initial: u64,
    out: u64,
    last_state: u64,
    checkpoints: u64,
) -> PyResult<()> {
    let (dtype, p) = selective_problem(dtype, problem)?;
    let x = selective_inputs(u, delta, a, b, c, d, z, delta_bias, initial);
    let o = SelectiveOutputs {
        out,
        last_state: opt(last_state),
        checkpoints: opt(checkpoints),
    };
    // SAFETY: the Python package passes PyTorch's live stream of this device and tensors of the
    // validated shapes and strides on it, kept alive by the caching allocator's stream semantics.
    unsafe {
        on_cuda(py, device, stream, move |dev, stream| {
            cuda::selective_scan::selective_scan_forward_raw(dev, stream, dtype, &p, x, o)
        })
    }
}

/// Selective scan backward of device buffers; arguments as for `cpu_selective_scan_backward`,
/// plus a scratch buffer of `cuda_selective_scratch_bytes` bytes.
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, problem, u, delta, a, b, c, d, z, delta_bias, initial, grad_out, grad_last, checkpoints, grad_u, grad_delta, grad_a, grad_b, grad_c, grad_d, grad_z, grad_delta_bias, grad_initial, scratch, scratch_bytes))]
#[allow(clippy::too_many_arguments)] // mirrors the operation's tensors one to one
fn cuda_selective_scan_backward(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    problem: ProblemArg,
    u: SeqArg,
    delta: SeqArg,
    a: u64,
    b: BcArg,
    c: BcArg,
    d: u64,
    z: SeqArg,
    delta_bias: u64,
    initial: u64,
    grad_out: SeqArg,
    grad_last: u64,
    checkpoints: u64,
    grad_u: u64,
    grad_delta: u64,
    grad_a: u64,
    grad_b: u64,
    grad_c: u64,
    grad_d: u64,
    grad_z: u64,
    grad_delta_bias: u64,
    grad_initial: u64,
    scratch: u64,
    scratch_bytes: usize,
) -> PyResult<()> {
    let (dtype, p) = selective_problem(dtype, problem)?;
    let x = selective_inputs(u, delta, a, b, c, d, z, delta_bias, initial);
    let g = SelectiveGradInputs {
        grad_out: seq_arg(grad_out),
        grad_last: opt(grad_last),
        checkpoints,
    };
    let o = selective_grad_outputs(
        &x,
        grad_u,
        grad_delta,
        grad_a,
        grad_b,
        grad_c,
        grad_d,
        grad_z,
        grad_delta_bias,
        grad_initial,
    );
    // SAFETY: as in `cuda_selective_scan_forward`.
    unsafe {
        on_cuda(py, device, stream, move |dev, stream| {
            cuda::selective_scan::selective_scan_backward_raw(
                dev,
                stream,
                dtype,
                &p,
                x,
                g,
                o,
                (scratch, scratch_bytes),
            )
        })
    }
}

/// The compiled extension module `ferroscan._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cpu_scan_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_scan_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_scan_scratch_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_scan_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_scan_backward, m)?)?;
    gated_scan::register(m)?;
    m.add_function(wrap_pyfunction!(cpu_selective_scan_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_selective_scan_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_selective_scratch_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_selective_scan_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_selective_scan_backward, m)?)?;
    m.add("SELECTIVE_CHECKPOINT_STEPS", CHECKPOINT_STEPS)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
