//! Bindings of the fused gated scan (CUDA only; the CPU runs the composed scan in Python).

use ferroscan::cuda;
use ferroscan::cuda::gated_scan::{GatedBackwardBuffers, GatedForwardBuffers};
use pyo3::prelude::*;

use super::{on_cuda, opt, parse};

/// Fused gated-scan forward of device buffers on PyTorch's stream `stream`; addresses are
/// `int`, 0 = absent.
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, shape, reverse, x, a, b, c, initial, y, final_state, checkpoints))]
#[allow(clippy::too_many_arguments)] // mirrors the operation's tensors one to one
fn cuda_gated_scan_forward(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    shape: (usize, usize, usize),
    reverse: bool,
    x: u64,
    a: u64,
    b: u64,
    c: u64,
    initial: u64,
    y: u64,
    final_state: u64,
    checkpoints: u64,
) -> PyResult<()> {
    let (dtype, problem) = parse(dtype, shape, reverse)?;
    let buffers = GatedForwardBuffers {
        x,
        a,
        b: opt(b),
        c: opt(c),
        initial: opt(initial),
        y,
        final_state: opt(final_state),
        checkpoints: opt(checkpoints),
    };
    // SAFETY: the Python package passes PyTorch's live stream of this device and contiguous
    // tensors of the validated shapes on it, kept alive by the caching allocator's stream
    // semantics until the kernel ran.
    unsafe {
        on_cuda(py, device, stream, move |dev, stream| {
            cuda::gated_scan::gated_scan_forward_raw(dev, stream, dtype, &problem, buffers)
        })
    }
}

/// Fused, recomputing gated-scan backward of device buffers; see `cuda_gated_scan_forward`.
#[pyfunction]
#[pyo3(signature = (device, stream, dtype, shape, reverse, x, a, b, c, checkpoints, grad_y, grad_final, grad_x, grad_a, grad_b, grad_c, grad_initial))]
#[allow(clippy::too_many_arguments)] // mirrors the operation's tensors one to one
fn cuda_gated_scan_backward(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    shape: (usize, usize, usize),
    reverse: bool,
    x: u64,
    a: u64,
    b: u64,
    c: u64,
    checkpoints: u64,
    grad_y: u64,
    grad_final: u64,
    grad_x: u64,
    grad_a: u64,
    grad_b: u64,
    grad_c: u64,
    grad_initial: u64,
) -> PyResult<()> {
    let (dtype, problem) = parse(dtype, shape, reverse)?;
    let buffers = GatedBackwardBuffers {
        x,
        a,
        b: opt(b),
        c: opt(c),
        checkpoints,
        grad_y,
        grad_final: opt(grad_final),
        grad_x,
        grad_a,
        grad_b: opt(grad_b),
        grad_c: opt(grad_c),
        grad_initial: opt(grad_initial),
    };
    // SAFETY: as in `cuda_gated_scan_forward`.
    unsafe {
        on_cuda(py, device, stream, move |dev, stream| {
            cuda::gated_scan::gated_scan_backward_raw(dev, stream, dtype, &problem, buffers)
        })
    }
}

/// Adds this module's functions to the extension module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Steps between checkpoints: the checkpoint buffer is (ceil(len / spacing), outer * inner).
    m.add(
        "GATED_CHECKPOINT_SPACING",
        cuda::gated_scan::CHECKPOINT_SPACING,
    )?;
    m.add_function(wrap_pyfunction!(cuda_gated_scan_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gated_scan_backward, m)?)?;
    Ok(())
}
