//! Bindings of the selective scan: problem and tensors as tuples of sizes, strides and
//! addresses (see `ops/selective_scan.py`), converted to the core's argument structs.

use ferroscan::cpu::{self, Element};
use ferroscan::selective::{
    strided_extent, Bc, BcGrad, SelectiveGradInputs, SelectiveGradOutputs, SelectiveInputs,
    SelectiveOutputs, SelectiveProblem, Seq, Strided, CHECKPOINT_STEPS,
};
use ferroscan::{cuda, DType, Error};
use pyo3::prelude::*;

use super::{host, host_mut, on_cuda, opt, run_detached, to_py};

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

/// Scratch bytes the CUDA backward of this selective scan needs on device `device` (`groups` 0 =
/// constant B / C).
#[pyfunction]
fn cuda_selective_scratch_bytes(
    py: Python<'_>,
    device: usize,
    dtype: &str,
    problem: ProblemArg,
    b_groups: usize,
    c_groups: usize,
) -> PyResult<usize> {
    let (dtype, p) = selective_problem(dtype, problem)?;
    let groups = [opt(b_groups), opt(c_groups)];
    run_detached(py, move || {
        let dev = cuda::device(device)?;
        cuda::selective_scan::selective_backward_scratch_bytes(&dev, dtype, &p, groups)
    })
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

/// Adds the selective scan's functions and constants to the extension module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cpu_selective_scan_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_selective_scan_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_selective_scratch_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_selective_scan_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_selective_scan_backward, m)?)?;
    m.add("SELECTIVE_CHECKPOINT_STEPS", CHECKPOINT_STEPS)?;
    Ok(())
}
