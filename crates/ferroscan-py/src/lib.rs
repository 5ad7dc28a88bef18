//! Python bindings of ferroscan: argument conversion only.
//!
//! Tensors arrive as addresses (`int`, 0 for an absent optional) of C-contiguous buffers that
//! the Python package allocated and validated; shapes arrive as `(outer, len, inner)`. Errors
//! become `ValueError` (bad argument) or `RuntimeError` (CUDA/NVRTC/driver); a Rust panic is
//! caught and reported as `RuntimeError`, never unwound into Python.

use std::panic::{catch_unwind, AssertUnwindSafe};

use ferroscan::args::{ScanGradInputs, ScanGradOutputs, ScanInputs, ScanOutputs};
use ferroscan::cpu::{self, Element};
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

mod selective;

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

/// The compiled extension module `ferroscan._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cpu_scan_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_scan_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_scan_scratch_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_scan_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_scan_backward, m)?)?;
    gated_scan::register(m)?;
    selective::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
