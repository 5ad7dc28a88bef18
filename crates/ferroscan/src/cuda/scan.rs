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

use super::compile::{kernel_define, SCAN_SOURCE};
use super::device::{driver_error, Device};
use super::gated_scan::{self, GatedKernel, GatedParams};
use super::launch::{check_required, fill_async, grid_blocks, pass_state_through};
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
/// Shortest chunk of the strided mapping, in steps: shorter chunks cost more than they win.
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
    ticket: u64,
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

/// One launch of a plan (see `kernels/scan.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Strided mapping, several chunks: store each chunk's affine map.
    Reduce,
    /// Scan each chunk from its incoming state (folding the earlier chunks' maps, if any).
    Apply,
    /// Rows mapping, several chunks: single pass with decoupled look-back.
    LookBack,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Reduce => "reduce",
            Phase::Apply => "apply",
            Phase::LookBack => "lookback",
        }
    }
}

impl Mapping {
    /// The phases that have kernels for this mapping.
    fn kernel_phases(self) -> &'static [Phase] {
        match self {
            Mapping::Rows => &[Phase::Apply, Phase::LookBack],
            Mapping::Strided => &[Phase::Reduce, Phase::Apply],
        }
    }
}

/// How a problem is cut and launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanPlan {
    /// Thread mapping.
    pub mapping: Mapping,
    /// Steps per chunk of the time axis.
    pub chunk_len: usize,
    /// Chunks per sequence (1: one pass; else look-back (rows) or reduce + apply (strided)).
    pub n_chunks: usize,
    /// Rows mapping, one chunk: the lanes that walk a row (32, or 16 or 8 for rows short enough,
    /// a warp then serving 2 or 4 rows); 32 otherwise.
    pub row_lanes: usize,
    /// Rows mapping: a block of warps per chunk (the `lookback` kernels, which look back when a
    /// row has several chunks), for rows too few to give every warp of the GPU one.
    pub block_per_chunk: bool,
}

/// Lanes per row the `apply` rows kernels are built for (`_w<lanes>` in their names).
const ROW_LANES: [usize; 3] = [8, 16, 32];

/// Where the parts of a scan's scratch buffer lie, in bytes from its start. Look-back: the
/// ticket counter (a `u64` at offset 0) and the records start with every bit set (the counter's
/// first ticket is then `u64::MAX`, the kernel's first item 0; each record word "unpublished").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScratchLayout {
    /// Reduce + apply: (A, B) per (sequence, chunk); look-back: (A, B, S, unused) per
    /// (row, chunk); accumulators of the dtype (`double` for float64, else `float`).
    pub maps: usize,
    /// The bytes from the start that must have every bit set when a launch begins (look-back:
    /// the counter and the records, one fill; 0 otherwise).
    pub all_ones: usize,
    /// Total bytes (0: no scratch).
    pub total: usize,
}

/// Elements a lane owns per tile in the rows mapping (`FS_ITEMS`): 32 bytes of storage.
pub fn items_per_lane(dtype: DType) -> usize {
    32 / dtype.size_bytes()
}

/// Tiles (of 32 lanes x [`items_per_lane`]) per look-back chunk (`FS_LOOKBACK_CHUNK_TILES`,
/// default 16), split over the warps of a block and held in registers.
/// `FS_LOOKBACK_CHUNK_TILES=N` in `$FERROSCAN_KERNEL_DEFINES` (a tuning hook) changes both.
pub fn lookback_chunk_tiles() -> usize {
    kernel_define("FS_LOOKBACK_CHUNK_TILES")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&t| t >= 1)
        .unwrap_or(16)
}

/// Warps per look-back block of a pass (`FS_LOOKBACK_WARPS_FWD`, default 4;
/// `FS_LOOKBACK_WARPS_BWD`, default 4, or 8 for 16-bit types). `FS_LOOKBACK_WARPS_FWD=N` or
/// `FS_LOOKBACK_WARPS_BWD=N` in `$FERROSCAN_KERNEL_DEFINES` (tuning hooks) change both.
pub fn lookback_warps(dtype: DType, backward: bool) -> usize {
    let (name, default) = match backward {
        false => ("FS_LOOKBACK_WARPS_FWD", 4),
        true if dtype.size_bytes() >= 4 => ("FS_LOOKBACK_WARPS_BWD", 4),
        true => ("FS_LOOKBACK_WARPS_BWD", 8),
    };
    kernel_define(name)
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&w| (1..=32).contains(&w))
        .unwrap_or(default)
}

impl ScanPlan {
    /// The plan for `shape` on a device with `sm_count` multiprocessors.
    pub fn new(sm_count: usize, dtype: DType, shape: &ScanShape) -> Self {
        let len = shape.len.max(1);
        if shape.inner == 1 {
            // Rows fill the GPU: a warp per row. Else single-pass look-back over chunks of a
            // fixed number of tiles (what a look-back block's warps hold in registers).
            let items = items_per_lane(dtype);
            let tile = 32 * items;
            let chunk = tile * lookback_chunk_tiles();
            let wanted = (sm_count * ROWS_WARPS_PER_SM).div_ceil(shape.outer.max(1));
            // Rows of one chunk (more than a tile) get a block each too: its warps load the row at
            // once instead of one warp tile by tile (H100, (2,256,4096) forward: float32 0.0227
            // -> 0.0149 ms, bfloat16 0.0143-0.0148 -> 0.0131 ms, with no scratch to fill).
            let single_chunk_blocks = len > tile;
            if wanted > 1 && (len > chunk || single_chunk_blocks) {
                let chunk_len = chunk.min(len.div_ceil(tile) * tile);
                return ScanPlan {
                    mapping: Mapping::Rows,
                    chunk_len,
                    n_chunks: len.div_ceil(chunk_len),
                    row_lanes: 32,
                    block_per_chunk: true,
                };
            }
            // The fewest lanes whose tile holds the row, so that short rows leave fewer empty.
            let row_lanes = ROW_LANES
                .into_iter()
                .find(|&lanes| lanes * items >= len)
                .unwrap_or(32);
            ScanPlan {
                mapping: Mapping::Rows,
                chunk_len: len.div_ceil(row_lanes * items) * row_lanes * items,
                n_chunks: 1,
                row_lanes,
                block_per_chunk: false,
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
                row_lanes: 32,
                block_per_chunk: false,
            }
        }
    }

    /// The launches, in order: one pass; or a block per chunk, looking back (rows); or reduce,
    /// then apply (strided).
    pub fn phases(&self) -> &'static [Phase] {
        match self.mapping {
            Mapping::Rows if self.block_per_chunk => &[Phase::LookBack],
            Mapping::Strided if self.n_chunks > 1 => &[Phase::Reduce, Phase::Apply],
            _ => &[Phase::Apply],
        }
    }

    /// Where the plan's scratch lies (offsets from an 8-byte aligned start: multiples of 8).
    pub fn scratch_layout(&self, dtype: DType, shape: &ScanShape) -> ScratchLayout {
        let acc = dtype.accumulator_bytes();
        let chunks = shape.state_numel() * self.n_chunks;
        match self.phases() {
            // Rows of a single chunk look back on nothing (the kernel takes its block index).
            [Phase::LookBack] if self.n_chunks == 1 => ScratchLayout::default(),
            [Phase::LookBack] => {
                let total = 16 + chunks * 4 * acc;
                ScratchLayout {
                    maps: 16,
                    all_ones: total,
                    total,
                }
            }
            [Phase::Reduce, Phase::Apply] => ScratchLayout {
                total: chunks * 2 * acc,
                ..ScratchLayout::default()
            },
            _ => ScratchLayout::default(),
        }
    }

    /// Scratch bytes the plan needs (see [`ScanPlan::scratch_layout`]).
    pub fn scratch_bytes(&self, dtype: DType, shape: &ScanShape) -> usize {
        self.scratch_layout(dtype, shape).total
    }
}

/// Scratch bytes a scan (forward or backward) of `problem` needs on `device`; pass a buffer at
/// least this large (and 8-byte aligned) to the raw entry points.
pub fn scan_scratch_bytes(device: &Device, dtype: DType, problem: &ScanProblem) -> usize {
    if gated_scan::uses_blocks(device.sm_count(), &problem.shape) {
        return 0;
    }
    ScanPlan::new(device.sm_count(), dtype, &problem.shape).scratch_bytes(dtype, &problem.shape)
}

/// The kernel name for a pass; must match the `FS_*_KERNEL*` macros of `kernels/scan.cu`.
pub fn kernel_name(
    mapping: Mapping,
    backward: bool,
    phase: Phase,
    reverse: bool,
    vectorized: bool,
    row_lanes: usize,
) -> String {
    let rows = mapping == Mapping::Rows;
    format!(
        "scan_{}_{}_{}_r{}{}{}",
        if rows { "rows" } else { "strided" },
        if backward { "bwd" } else { "fwd" },
        phase.name(),
        u8::from(reverse),
        if vectorized && rows { "_vec" } else { "" },
        if rows && phase == Phase::Apply {
            format!("_w{row_lanes}")
        } else {
            String::new()
        }
    )
}

/// Every kernel name of `scan.cu` (for compile checks).
pub fn all_kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for mapping in [Mapping::Rows, Mapping::Strided] {
        for backward in [false, true] {
            for &phase in mapping.kernel_phases() {
                for reverse in [false, true] {
                    for vectorized in [false, true] {
                        for lanes in ROW_LANES {
                            let name =
                                kernel_name(mapping, backward, phase, reverse, vectorized, lanes);
                            if !names.contains(&name) {
                                names.push(name);
                            }
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

/// Launches the plan's phases of the (backward?, reverse?) scan, first setting every bit of the
/// look-back's counter and records.
///
/// # Safety
/// Every non-zero address in `params` must be valid for the shape it describes; `scratch`
/// (`params.maps` etc. point into it) must hold the plan's scratch.
unsafe fn launch(
    device: &Device,
    stream: &CudaStream,
    dtype: DType,
    plan: &ScanPlan,
    (backward, reverse): (bool, bool),
    (params, scratch): (&ScanParams, (u64, &ScratchLayout)),
    data_addresses: &[u64],
) -> Result<()> {
    let shape_len = params.len as usize;
    let vectorized = plan.mapping == Mapping::Rows
        && shape_len % items_per_lane(dtype) == 0
        && data_addresses.iter().all(|&a| a % 16 == 0);
    let (work, per_block, threads) = match (plan.mapping, plan.phases()) {
        // One block per look-back chunk, or one warp per row.
        (_, [Phase::LookBack]) => (
            params.outer as usize * plan.n_chunks,
            1,
            lookback_warps(dtype, backward) * 32,
        ),
        (Mapping::Rows, _) => (
            params.outer as usize,
            ROWS_WARPS * (32 / plan.row_lanes),
            ROWS_WARPS * 32,
        ),
        (Mapping::Strided, _) => (
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
    if scratch.1.all_ones > 0 {
        // SAFETY: the caller guarantees the scratch holds the layout.
        unsafe { fill_async(stream, scratch.0, scratch.1.all_ones, 0xff) }?;
    }
    for &phase in plan.phases() {
        let name = kernel_name(
            plan.mapping,
            backward,
            phase,
            reverse,
            vectorized,
            plan.row_lanes,
        );
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
    let (kernel, gated) = if backward {
        (
            GatedKernel::ScanBackward,
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
            GatedKernel::Forward {
                has_b: false,
                has_c: false,
            },
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
    unsafe { gated_scan::launch(device, stream, dtype, kernel, problem, gated) }
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
    if gated_scan::uses_blocks(device.sm_count(), &shape) {
        // SAFETY: forwarded from the caller.
        return unsafe { run_on_blocks(device, stream, dtype, (backward, problem), &params) };
    }
    let plan = ScanPlan::new(device.sm_count(), dtype, &shape);
    check_scratch(&plan, dtype, &shape, scratch, scratch_bytes)?;
    let layout = plan.scratch_layout(dtype, &shape);
    if layout.total > 0 {
        params.maps = scratch + layout.maps as u64;
        params.ticket = scratch;
    }
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
            (&params, (scratch, &layout)),
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

#[cfg(test)]
mod tests {
    use super::*;

    const SMS: usize = 132;

    fn shape(outer: usize, len: usize, inner: usize) -> ScanShape {
        ScanShape::new(outer, len, inner).unwrap()
    }

    /// [`lookback_chunk_tiles`], [`lookback_warps`] and [`items_per_lane`] restate kernel
    /// constants; this pins them so that changing one side alone fails here rather than as wrong
    /// results on a GPU.
    #[test]
    fn tile_constants_match_the_kernel() {
        let kernel = SCAN_SOURCE.text;
        assert!(kernel.contains("#define FS_ITEMS (32 / (int)sizeof(storage_t))"));
        assert!(kernel.contains("#define FS_ROWS_WARPS 4"));
        for define in [
            "#ifndef FS_LOOKBACK_CHUNK_TILES\n#define FS_LOOKBACK_CHUNK_TILES 16\n#endif",
            "#ifndef FS_LOOKBACK_WARPS_FWD\n#define FS_LOOKBACK_WARPS_FWD 4\n#endif",
            "#ifndef FS_LOOKBACK_WARPS_BWD\n#define FS_LOOKBACK_WARPS_BWD (sizeof(storage_t) >= 4 ? 4 : 8)\n#endif",
        ] {
            assert!(kernel.contains(define), "{define}");
        }
        assert_eq!(lookback_chunk_tiles(), 16);
        assert_eq!(ROWS_WARPS, 4);
        for (dtype, items, bwd_warps) in [
            (DType::F16, 16, 8),
            (DType::BF16, 16, 8),
            (DType::F32, 8, 4),
            (DType::F64, 4, 4),
        ] {
            assert_eq!(items_per_lane(dtype), items);
            assert_eq!(lookback_warps(dtype, false), 4);
            assert_eq!(lookback_warps(dtype, true), bwd_warps);
        }
    }

    #[test]
    fn few_long_rows_use_the_look_back() {
        // (1, 64, 2^20) as a time-last tensor: 64 rows; float32 chunks of 16 tiles of 256.
        let s = shape(64, 1 << 20, 1);
        let plan = ScanPlan::new(SMS, DType::F32, &s);
        assert_eq!(plan.mapping, Mapping::Rows);
        assert_eq!((plan.chunk_len, plan.n_chunks), (4096, 256));
        assert_eq!(plan.phases(), &[Phase::LookBack]);
        let records = 64 * 256;
        assert_eq!(
            plan.scratch_layout(DType::F32, &s),
            ScratchLayout {
                maps: 16,
                all_ones: 16 + 16 * records,
                total: 16 + 16 * records,
            }
        );
        // float64: 16 tiles of 128, records of four doubles; bfloat16: 16 tiles of 512.
        let plan = ScanPlan::new(SMS, DType::F64, &s);
        assert_eq!((plan.chunk_len, plan.n_chunks), (2048, 512));
        let layout = plan.scratch_layout(DType::F64, &s);
        assert_eq!(layout.total, layout.maps + 32 * 64 * 512);
        let plan = ScanPlan::new(SMS, DType::BF16, &s);
        assert_eq!((plan.chunk_len, plan.n_chunks), (8192, 128));
        assert_eq!(plan.scratch_bytes(DType::BF16, &s), 16 + 16 * (records / 2));
    }

    #[test]
    fn look_back_scratch_is_aligned_and_covers_every_record() {
        for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64] {
            for (outer, len) in [(1, 8193), (3, 16000), (5, 65537), (4, 1 << 26)] {
                let s = shape(outer, len, 1);
                let plan = ScanPlan::new(SMS, dtype, &s);
                assert_eq!(plan.phases(), &[Phase::LookBack], "{dtype:?} {outer}x{len}");
                assert_eq!(plan.chunk_len % (32 * items_per_lane(dtype)), 0);
                assert!(plan.chunk_len * plan.n_chunks >= len);
                assert!(plan.chunk_len * (plan.n_chunks - 1) < len);
                let records = outer * plan.n_chunks;
                let l = plan.scratch_layout(dtype, &s);
                assert_eq!(l.maps, 16, "records after the counter, 16-byte aligned");
                assert_eq!(l.total, l.maps + records * 4 * dtype.accumulator_bytes());
                assert_eq!(l.all_ones, l.total, "counter and records are one fill");
            }
        }
    }

    #[test]
    fn many_or_short_rows_take_one_warp_each() {
        // Enough rows to fill the GPU: one chunk, no scratch.
        let s = shape(8 * 1536, 2048, 1);
        let plan = ScanPlan::new(SMS, DType::F32, &s);
        assert_eq!((plan.n_chunks, plan.chunk_len), (1, 2048));
        assert_eq!(plan.phases(), &[Phase::Apply]);
        assert_eq!(plan.scratch_bytes(DType::F32, &s), 0);
        // Too few rows for a warp each, no longer than one chunk: a block of warps per row, no
        // look-back (so no scratch: no counter, no records); a row of one tile stays with one
        // warp.
        let s = shape(4, 4096, 1);
        let plan = ScanPlan::new(SMS, DType::F32, &s);
        assert_eq!((plan.n_chunks, plan.chunk_len), (1, 4096));
        assert_eq!(plan.phases(), &[Phase::LookBack]);
        assert_eq!(
            plan.scratch_layout(DType::F32, &s),
            ScratchLayout::default()
        );
        let plan = ScanPlan::new(SMS, DType::F32, &shape(512, 1000, 1));
        assert_eq!((plan.n_chunks, plan.chunk_len), (1, 1024));
        assert_eq!(plan.phases(), &[Phase::LookBack]);
        let plan = ScanPlan::new(SMS, DType::F32, &shape(512, 256, 1));
        assert_eq!(plan.phases(), &[Phase::Apply]);
        let plan = ScanPlan::new(SMS, DType::BF16, &shape(512, 4096, 1));
        assert_eq!((plan.n_chunks, plan.chunk_len), (1, 4096));
        assert_eq!(plan.phases(), &[Phase::LookBack]);
        let plan = ScanPlan::new(SMS, DType::BF16, &shape(512, 512, 1));
        assert_eq!(plan.phases(), &[Phase::Apply]);
        let s = shape(4, 4097, 1);
        let plan = ScanPlan::new(SMS, DType::F32, &s);
        assert_eq!((plan.n_chunks, plan.chunk_len), (2, 4096));
        // A partial tile: the chunk is rounded up to whole tiles.
        let s = shape(100_000, 300, 1);
        assert_eq!(ScanPlan::new(SMS, DType::F32, &s).chunk_len, 512);
        // Short rows take the fewest lanes whose tile holds them (a warp serves several rows).
        for (dtype, len, lanes, chunk_len) in [
            (DType::BF16, 128, 8, 128),
            (DType::BF16, 129, 16, 256),
            (DType::BF16, 512, 32, 512),
            (DType::F32, 128, 16, 128),
            (DType::F32, 64, 8, 64),
            (DType::F32, 1, 8, 64),
            (DType::F32, 257, 32, 512),
            (DType::F64, 100, 32, 128),
        ] {
            let plan = ScanPlan::new(SMS, dtype, &shape(8 * 1536, len, 1));
            assert_eq!(
                (plan.n_chunks, plan.row_lanes, plan.chunk_len),
                (1, lanes, chunk_len),
                "{dtype:?} L = {len}"
            );
        }
        // Split rows and the strided mapping keep whole warps.
        assert_eq!(
            ScanPlan::new(SMS, DType::F32, &shape(4, 4097, 1)).row_lanes,
            32
        );
        assert_eq!(
            ScanPlan::new(SMS, DType::F32, &shape(4, 100, 3)).row_lanes,
            32
        );
    }

    #[test]
    fn strided_keeps_reduce_and_apply() {
        let s = shape(2, 1 << 16, 8);
        let plan = ScanPlan::new(SMS, DType::F32, &s);
        assert_eq!(plan.mapping, Mapping::Strided);
        assert!(plan.n_chunks > 1);
        assert_eq!(plan.phases(), &[Phase::Reduce, Phase::Apply]);
        assert_eq!(
            plan.scratch_layout(DType::F64, &s),
            ScratchLayout {
                total: 16 * plan.n_chunks * 2 * 8,
                ..ScratchLayout::default()
            }
        );
        let s = shape(64, 16, 1024);
        let plan = ScanPlan::new(SMS, DType::F32, &s);
        assert_eq!((plan.mapping, plan.n_chunks), (Mapping::Strided, 1));
        assert_eq!(plan.phases(), &[Phase::Apply]);
    }

    #[test]
    fn kernel_names_cover_every_phase_of_each_mapping() {
        let names = all_kernel_names();
        assert_eq!(names.len(), 8 * 3 + 8 + 8);
        for name in [
            "scan_rows_fwd_lookback_r0_vec",
            "scan_rows_bwd_lookback_r1",
            "scan_rows_fwd_apply_r1_vec_w32",
            "scan_rows_bwd_apply_r0_w8",
            "scan_rows_fwd_apply_r0_vec_w16",
            "scan_strided_bwd_reduce_r1",
            "scan_strided_fwd_apply_r0",
        ] {
            assert!(names.iter().any(|n| n == name), "{name}");
        }
        assert!(!names
            .iter()
            .any(|n| n.starts_with("scan_rows") && n.contains("reduce")));
        assert!(!names
            .iter()
            .any(|n| n.contains("strided") && n.contains("lookback")));
    }
}
