//! Launcher of the first-order scan kernels (`kernels/scan.cu`).
//!
//! Two entry levels: raw device addresses on a borrowed stream ([`scan_forward_raw`],
//! [`scan_backward_raw`]; what the Python package uses, with scratch it allocates), and cudarc
//! slices ([`scan_forward`], [`scan_backward`]; scratch allocated here).
//!
//! ```no_run
//! use ferroscan::args::{ScanInputs, ScanOutputs};
//! use ferroscan::cuda::{device, scan::scan_forward};
//! use ferroscan::{ScanProblem, ScanShape};
//!
//! let stream = device(0)?.context().default_stream();
//! let problem = ScanProblem { shape: ScanShape::new(4, 1024, 1)?, reverse: false };
//! let gates = stream.clone_htod(&vec![0.9f32; 4096]).unwrap();
//! let tokens = stream.clone_htod(&vec![1.0f32; 4096]).unwrap();
//! let mut hidden = stream.alloc_zeros::<f32>(4096).unwrap();
//! scan_forward(
//!     &stream,
//!     &problem,
//!     ScanInputs { gates: &gates, tokens: &tokens, initial: None },
//!     ScanOutputs { hidden: &mut hidden, final_state: None },
//! )?;
//! let h = stream.clone_dtoh(&hidden).unwrap(); // synchronizes
//! assert!((h[1023] - 10.0).abs() < 1e-3); // 1 + 0.9 + 0.81 + ... -> 1 / (1 - 0.9)
//! # Ok::<(), ferroscan::Error>(())
//! ```

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::compile::SCAN_SOURCE;
use super::device::{driver_error, Device};
use super::gated_scan::{self, GatedParams};
use super::launch::{check_required, grid_blocks, pass_state_through};
use crate::args::{ScanGradInputs, ScanGradOutputs, ScanInputs, ScanOutputs};
use crate::cpu::Element;
use crate::error::{Error, Result};
use crate::layout::{DType, ScanProblem, ScanShape};

/// Warps per block of the `rows` kernels (`FS_ROWS_WARPS` in scan.cu).
const ROWS_WARPS: usize = 4;
/// Threads per block of the `strided` kernels (`FS_STRIDED_THREADS` in scan.cu).
const STRIDED_THREADS: usize = 256;
/// Warps wanted per SM before the time axis is split (rows mapping).
const ROWS_WARPS_PER_SM: usize = 48;
/// Threads wanted per SM before the time axis is split (strided mapping).
const STRIDED_THREADS_PER_SM: usize = 2048;
/// Shortest chunk, in tiles (rows) or steps (strided): shorter chunks cost more than they win.
const MIN_ROWS_CHUNK_TILES: usize = 4;
const MIN_STRIDED_CHUNK: usize = 32;

/// Kernel parameters, passed by value; mirrors `struct ScanParams` in `kernels/scan.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ScanParams {
    gates: u64,
    tokens: u64,
    initial: u64,
    aux: u64,
    aux_state: u64,
    out0: u64,
    out1: u64,
    final_out: u64,
    maps: u64,
    outer: i64,
    len: i64,
    inner: i64,
    chunk_len: i64,
    n_chunks: i64,
}

// SAFETY: plain-old-data with the C layout of the kernel's `ScanParams` (u64 addresses, i64 sizes).
unsafe impl DeviceRepr for ScanParams {}

/// Which thread mapping a problem uses (see `kernels/scan.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// `inner == 1`: a warp per (row, chunk), items in registers, warp-shuffle scan.
    Rows,
    /// `inner > 1`: a thread per (outer, inner, chunk), coalesced across inner.
    Strided,
}

/// How a problem is cut and launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanPlan {
    /// Thread mapping.
    pub mapping: Mapping,
    /// Steps per chunk of the time axis.
    pub chunk_len: usize,
    /// Chunks per sequence (1: one pass, else reduce + apply).
    pub n_chunks: usize,
}

/// Elements a lane owns per tile in the rows mapping (`FS_ITEMS`): 32 bytes of storage.
pub fn items_per_lane(dtype: DType) -> usize {
    32 / dtype.size_bytes()
}

impl ScanPlan {
    /// The plan for `shape` on a device with `sm_count` multiprocessors.
    pub fn new(sm_count: usize, dtype: DType, shape: &ScanShape) -> Self {
        let len = shape.len.max(1);
        if shape.inner == 1 {
            let tile = 32 * items_per_lane(dtype);
            let wanted = (sm_count * ROWS_WARPS_PER_SM).div_ceil(shape.outer.max(1));
            let most = len.div_ceil(tile * MIN_ROWS_CHUNK_TILES);
            let n = wanted.min(most).max(1);
            let chunk_len = len.div_ceil(n).div_ceil(tile) * tile;
            ScanPlan {
                mapping: Mapping::Rows,
                chunk_len,
                n_chunks: len.div_ceil(chunk_len),
            }
        } else {
            let wanted = (sm_count * STRIDED_THREADS_PER_SM).div_ceil(shape.state_numel().max(1));
            let most = len.div_ceil(MIN_STRIDED_CHUNK);
            let n = wanted.min(most).max(1);
            let chunk_len = len.div_ceil(n);
            ScanPlan {
                mapping: Mapping::Strided,
                chunk_len,
                n_chunks: len.div_ceil(chunk_len),
            }
        }
    }

    /// Scratch bytes the plan needs: one affine map (two accumulators) per (sequence, chunk).
    pub fn scratch_bytes(&self, dtype: DType, shape: &ScanShape) -> usize {
        if self.n_chunks > 1 {
            shape.state_numel() * self.n_chunks * 2 * dtype.accumulator_bytes()
        } else {
            0
        }
    }
}

/// Scratch bytes a scan (forward or backward) of `problem` needs on `device`; pass a buffer at
/// least this large (and 8-byte aligned) to the raw entry points.
pub fn scan_scratch_bytes(device: &Device, dtype: DType, problem: &ScanProblem) -> usize {
    if gated_scan::uses_blocks(device.sm_count(), dtype, &problem.shape) {
        return 0;
    }
    ScanPlan::new(device.sm_count(), dtype, &problem.shape).scratch_bytes(dtype, &problem.shape)
}

/// The kernel name for a pass; must match the `FS_*_KERNEL` macros of `kernels/scan.cu`.
pub fn kernel_name(
    mapping: Mapping,
    backward: bool,
    reduce: bool,
    reverse: bool,
    vectorized: bool,
) -> String {
    format!(
        "scan_{}_{}_{}_r{}{}",
        match mapping {
            Mapping::Rows => "rows",
            Mapping::Strided => "strided",
        },
        if backward { "bwd" } else { "fwd" },
        if reduce { "reduce" } else { "apply" },
        u8::from(reverse),
        if vectorized && mapping == Mapping::Rows {
            "_vec"
        } else {
            ""
        }
    )
}

/// Every kernel name of `scan.cu` (for compile checks).
pub fn all_kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for mapping in [Mapping::Rows, Mapping::Strided] {
        for backward in [false, true] {
            for reduce in [false, true] {
                for reverse in [false, true] {
                    for vectorized in [false, true] {
                        let name = kernel_name(mapping, backward, reduce, reverse, vectorized);
                        if !names.contains(&name) {
                            names.push(name);
                        }
                    }
                }
            }
        }
    }
    names
}

fn check_scratch(
    plan: &ScanPlan,
    dtype: DType,
    shape: &ScanShape,
    scratch: u64,
    scratch_bytes: usize,
) -> Result<()> {
    let need = plan.scratch_bytes(dtype, shape);
    if need > 0 && (scratch == 0 || scratch_bytes < need || scratch % 8 != 0) {
        return Err(Error::invalid(
            "scratch",
            format!("an 8-byte aligned device buffer of at least {need} bytes (scan_scratch_bytes), got {scratch_bytes} bytes at {scratch:#x}"),
        ));
    }
    Ok(())
}

/// Launches the reduce (if chunked) and apply passes of the (backward?, reverse?) scan.
///
/// # Safety
/// Every non-zero address in `params` must be valid for the shape it describes.
unsafe fn launch(
    device: &Device,
    stream: &CudaStream,
    dtype: DType,
    plan: &ScanPlan,
    (backward, reverse): (bool, bool),
    params: &ScanParams,
    data_addresses: &[u64],
) -> Result<()> {
    let shape_len = params.len as usize;
    let vectorized = plan.mapping == Mapping::Rows
        && shape_len % items_per_lane(dtype) == 0
        && data_addresses.iter().all(|&a| a % 16 == 0);
    let (work, per_block, threads) = match plan.mapping {
        Mapping::Rows => (
            params.outer as usize * plan.n_chunks,
            ROWS_WARPS,
            ROWS_WARPS * 32,
        ),
        Mapping::Strided => (
            params.outer as usize * params.inner as usize * plan.n_chunks,
            STRIDED_THREADS,
            STRIDED_THREADS,
        ),
    };
    let grid = grid_blocks(work.div_ceil(per_block))?;
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let phases: &[bool] = if plan.n_chunks > 1 {
        &[true, false]
    } else {
        &[false]
    };
    for &reduce in phases {
        let name = kernel_name(plan.mapping, backward, reduce, reverse, vectorized);
        let function = device.function(SCAN_SOURCE, dtype, &name)?;
        let mut builder = stream.launch_builder(&function);
        builder.arg(params);
        // SAFETY: the kernel reads and writes only the buffers in `params`, which the caller
        // guarantees are valid for the described shape.
        unsafe { builder.launch(cfg) }.map_err(driver_error("launching a scan kernel"))?;
    }
    Ok(())
}

/// A pass on the block kernels of `gated_scan.cu` (see [`gated_scan::uses_blocks`]): the roles of
/// `params` (as in `kernels/scan.cu`) given to the gated kernels' parameters.
///
/// # Safety
/// As for [`scan_forward_raw`].
unsafe fn run_on_blocks(
    device: &Device,
    stream: &CudaStream,
    dtype: DType,
    (backward, problem): (bool, &ScanProblem),
    params: &ScanParams,
) -> Result<()> {
    let (name, gated) = if backward {
        (
            gated_scan::scan_backward_kernel_name(problem.reverse),
            GatedParams {
                a: params.gates,
                grad_y: params.tokens,
                grad_final: params.initial,
                hidden: params.aux,
                initial: params.aux_state,
                grad_a: params.out0,
                grad_x: params.out1,
                grad_initial: params.final_out,
                ..GatedParams::default()
            },
        )
    } else {
        (
            gated_scan::kernel_name(false, problem.reverse, false, false),
            GatedParams {
                a: params.gates,
                x: params.tokens,
                initial: params.initial,
                y: params.out0,
                final_out: params.final_out,
                ..GatedParams::default()
            },
        )
    };
    // SAFETY: forwarded from the caller.
    unsafe { gated_scan::launch(device, stream, dtype, &name, &problem.shape, gated) }
}

/// What both passes share: the empty cases, the required addresses, the plan, the scratch
/// check and the launch. `params` holds the pass's addresses (roles as in `kernels/scan.cu`);
/// `required` names the tensors that must be present (also the ones vector loads touch).
///
/// # Safety
/// As for [`scan_forward_raw`].
unsafe fn run_pass(
    device: &Device,
    stream: &CudaStream,
    dtype: DType,
    (backward, problem): (bool, &ScanProblem),
    mut params: ScanParams,
    required: &[(&'static str, u64)],
    (scratch, scratch_bytes): (u64, usize),
) -> Result<()> {
    let shape = problem.shape;
    if shape.len == 0 {
        // The final state (or its gradient) is the initial one (or its gradient).
        let bytes = shape.state_numel() * dtype.size_bytes();
        // SAFETY: forwarded from the caller.
        return unsafe { pass_state_through(stream, params.final_out, params.initial, bytes) };
    }
    if shape.numel() == 0 {
        return Ok(());
    }
    for &(arg, address) in required {
        check_required(arg, address)?;
    }
    if gated_scan::uses_blocks(device.sm_count(), dtype, &shape) {
        // SAFETY: forwarded from the caller.
        return unsafe { run_on_blocks(device, stream, dtype, (backward, problem), &params) };
    }
    let plan = ScanPlan::new(device.sm_count(), dtype, &shape);
    check_scratch(&plan, dtype, &shape, scratch, scratch_bytes)?;
    params.maps = scratch;
    params.outer = shape.outer as i64;
    params.len = shape.len as i64;
    params.inner = shape.inner as i64;
    params.chunk_len = plan.chunk_len as i64;
    params.n_chunks = plan.n_chunks as i64;
    let vector_buffers: Vec<u64> = required.iter().map(|&(_, address)| address).collect();
    // SAFETY: forwarded from the caller.
    unsafe {
        launch(
            device,
            stream,
            dtype,
            &plan,
            (backward, problem.reverse),
            &params,
            &vector_buffers,
        )
    }
}

/// Forward scan on raw device addresses (`0` = absent optional) of element type `dtype`, on
/// `stream`. Asynchronous: returns once the kernels are queued.
///
/// # Safety
/// Every non-zero address must point to device memory of `device` holding a C-contiguous
/// buffer of the shape the problem gives it (tensors `(outer, len, inner)`, states
/// `(outer, inner)`), alive until the stream has run the kernels; outputs must not overlap
/// inputs; `scratch` must hold `scratch_bytes` bytes (see [`scan_scratch_bytes`]); `stream`
/// must belong to `device`'s primary context.
pub unsafe fn scan_forward_raw(
    device: &Device,
    stream: &CudaStream,
    dtype: DType,
    problem: &ScanProblem,
    inputs: ScanInputs<u64>,
    outputs: ScanOutputs<u64>,
    scratch: (u64, usize),
) -> Result<()> {
    let params = ScanParams {
        gates: inputs.gates,
        tokens: inputs.tokens,
        initial: inputs.initial.unwrap_or(0),
        out0: outputs.hidden,
        final_out: outputs.final_state.unwrap_or(0),
        ..ScanParams::default()
    };
    let required = [
        ("gates", inputs.gates),
        ("tokens", inputs.tokens),
        ("hidden", outputs.hidden),
    ];
    // SAFETY: forwarded from the caller.
    unsafe {
        run_pass(
            device,
            stream,
            dtype,
            (false, problem),
            params,
            &required,
            scratch,
        )
    }
}

/// Backward scan on raw device addresses; see [`scan_forward_raw`] for the contract.
/// Produces `∂a`, `∂x` and (when asked) `∂h0` from `a`, `h`, `h0`, `∂h` and `∂h_final`.
///
/// # Safety
/// As for [`scan_forward_raw`].
pub unsafe fn scan_backward_raw(
    device: &Device,
    stream: &CudaStream,
    dtype: DType,
    problem: &ScanProblem,
    inputs: ScanGradInputs<u64>,
    outputs: ScanGradOutputs<u64>,
    scratch: (u64, usize),
) -> Result<()> {
    let params = ScanParams {
        gates: inputs.gates,
        tokens: inputs.grad_hidden,
        initial: inputs.grad_final.unwrap_or(0),
        aux: inputs.hidden,
        aux_state: inputs.initial.unwrap_or(0),
        out0: outputs.grad_gates,
        out1: outputs.grad_tokens,
        final_out: outputs.grad_initial.unwrap_or(0),
        ..ScanParams::default()
    };
    let required = [
        ("gates", inputs.gates),
        ("grad_hidden", inputs.grad_hidden),
        ("hidden", inputs.hidden),
        ("grad_gates", outputs.grad_gates),
        ("grad_tokens", outputs.grad_tokens),
    ];
    // SAFETY: forwarded from the caller.
    unsafe {
        run_pass(
            device,
            stream,
            dtype,
            (true, problem),
            params,
            &required,
            scratch,
        )
    }
}

/// Element types the typed CUDA API accepts.
pub trait DeviceElement: Element + DeviceRepr {}
impl<T: Element + DeviceRepr> DeviceElement for T {}

fn check_slice<T>(arg: &'static str, slice: &CudaSlice<T>, expected: usize) -> Result<()> {
    ScanShape::check_len(arg, slice.len(), expected)
}

/// The device behind a stream, checking that it is the one a slice lives on.
fn device_of(stream: &Arc<CudaStream>) -> Result<Arc<Device>> {
    super::device::device(stream.context().ordinal())
}

fn scratch_for(
    stream: &Arc<CudaStream>,
    device: &Device,
    dtype: DType,
    problem: &ScanProblem,
) -> Result<CudaSlice<u64>> {
    let words = scan_scratch_bytes(device, dtype, problem)
        .div_ceil(8)
        .max(1);
    stream
        .alloc_zeros::<u64>(words)
        .map_err(driver_error("allocating scratch"))
}

/// Forward scan on cudarc slices (C-contiguous `(outer, len, inner)`), queued on `stream`.
pub fn scan_forward<T: DeviceElement>(
    stream: &Arc<CudaStream>,
    problem: &ScanProblem,
    inputs: ScanInputs<&CudaSlice<T>>,
    outputs: ScanOutputs<&mut CudaSlice<T>>,
) -> Result<()> {
    let shape = problem.shape;
    check_slice("gates", inputs.gates, shape.numel())?;
    check_slice("tokens", inputs.tokens, shape.numel())?;
    check_slice("hidden", outputs.hidden, shape.numel())?;
    if let Some(s) = inputs.initial {
        check_slice("initial", s, shape.state_numel())?;
    }
    if let Some(s) = outputs.final_state.as_deref() {
        check_slice("final_state", s, shape.state_numel())?;
    }
    let device = device_of(stream)?;
    let scratch = scratch_for(stream, &device, T::DTYPE, problem)?;
    let (scratch_ptr, _s) = scratch.device_ptr(stream);
    let (gates, _g) = inputs.gates.device_ptr(stream);
    let (tokens, _t) = inputs.tokens.device_ptr(stream);
    let initial = inputs.initial.map(|s| s.device_ptr(stream));
    let (hidden, _h) = outputs.hidden.device_ptr(stream);
    let final_state = outputs.final_state.as_deref().map(|s| s.device_ptr(stream));
    // SAFETY: every address comes from a live CudaSlice whose length was checked above.
    unsafe {
        scan_forward_raw(
            &device,
            stream,
            T::DTYPE,
            problem,
            ScanInputs {
                gates,
                tokens,
                initial: initial.as_ref().map(|p| p.0),
            },
            ScanOutputs {
                hidden,
                final_state: final_state.as_ref().map(|p| p.0),
            },
            (scratch_ptr, scratch.num_bytes()),
        )
    }
}

/// Backward scan on cudarc slices, queued on `stream`.
pub fn scan_backward<T: DeviceElement>(
    stream: &Arc<CudaStream>,
    problem: &ScanProblem,
    inputs: ScanGradInputs<&CudaSlice<T>>,
    outputs: ScanGradOutputs<&mut CudaSlice<T>>,
) -> Result<()> {
    let shape = problem.shape;
    for (arg, s) in [
        ("gates", inputs.gates),
        ("hidden", inputs.hidden),
        ("grad_hidden", inputs.grad_hidden),
    ] {
        check_slice(arg, s, shape.numel())?;
    }
    check_slice("grad_gates", outputs.grad_gates, shape.numel())?;
    check_slice("grad_tokens", outputs.grad_tokens, shape.numel())?;
    for (arg, s) in [
        ("initial", inputs.initial),
        ("grad_final", inputs.grad_final),
    ] {
        if let Some(s) = s {
            check_slice(arg, s, shape.state_numel())?;
        }
    }
    if let Some(s) = outputs.grad_initial.as_deref() {
        check_slice("grad_initial", s, shape.state_numel())?;
    }
    let device = device_of(stream)?;
    let scratch = scratch_for(stream, &device, T::DTYPE, problem)?;
    let (scratch_ptr, _s) = scratch.device_ptr(stream);
    let ptr = |s: &CudaSlice<T>| s.device_ptr(stream).0;
    // SAFETY: every address comes from a live CudaSlice whose length was checked above; the
    // slices stay borrowed until this call returns, and their drop synchronizes with the stream.
    unsafe {
        scan_backward_raw(
            &device,
            stream,
            T::DTYPE,
            problem,
            ScanGradInputs {
                gates: ptr(inputs.gates),
                hidden: ptr(inputs.hidden),
                initial: inputs.initial.map(ptr),
                grad_hidden: ptr(inputs.grad_hidden),
                grad_final: inputs.grad_final.map(ptr),
            },
            ScanGradOutputs {
                grad_gates: ptr(outputs.grad_gates),
                grad_tokens: ptr(outputs.grad_tokens),
                grad_initial: outputs.grad_initial.as_deref().map(ptr),
            },
            (scratch_ptr, scratch.num_bytes()),
        )
    }
}
