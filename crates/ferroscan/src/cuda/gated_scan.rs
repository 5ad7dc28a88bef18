//! Launcher of the fused gated scan (`kernels/gated_scan.cu`):
//! `h[t] = a[t]·h[t-1] + b[t]·x[t]`, `y[t] = c[t]·h[t]`, `b` and `c` optional (1).
//!
//! The forward reads `x, a, b, c` and writes `y` (plus, when asked, the final state and the
//! checkpoints the backward needs: the state entering every [`CHECKPOINT_SPACING`] steps, in the
//! accumulator type). The backward reads `x, a, b, c, ∂y` and the checkpoints, recomputes `h`
//! segment by segment, and writes `∂x, ∂a, ∂b, ∂c` (and `∂h0`): nothing of size `len` is stored
//! between the passes besides the inputs.
//!
//! Raw device addresses on a borrowed stream, as [`super::scan::scan_forward_raw`]; tensors are
//! C-contiguous `(outer, len, inner)`, states `(outer, inner)`, checkpoints
//! [`checkpoint_shape`]. Any layout works; the kernels coalesce across `inner`, so they suit
//! `inner >= 32` best (channels-last).

use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::compile::{
    KernelSource, GATED_SCAN_16_WARPS_SOURCE, GATED_SCAN_4_WARPS_SOURCE, GATED_SCAN_CLUSTER_SOURCE,
    GATED_SCAN_ONE_STATE_SOURCE, GATED_SCAN_SOURCE, GATED_SCAN_STAGED_SOURCE,
};
use super::device::{driver_error, Device};
use super::launch::{
    check_required, grid_blocks, launch_clustered, pass_state_through, tuning_hook,
};
use crate::error::Result;
use crate::layout::{DType, ScanProblem, ScanShape};

/// Steps between two checkpoints (`FS_GATED_SEG` in gated_scan.cu).
pub const CHECKPOINT_SPACING: usize = 8;
/// States each lane owns (`FS_GATED_LANE_STATES` in gated_scan.cu). 32- and 64-bit types: one.
/// 16-bit types: two adjacent states (a warp's access then fills a 128-byte line; the kernel's
/// default for them), except for [`few_groups`] on GPUs without thread-block clusters
/// (`arch`), then one (the [`GATED_SCAN_ONE_STATE_SOURCE`] build; with clusters, the cluster
/// build spreads the groups instead). (H100, bfloat16 (4,8192,1536), 96 groups at two states
/// for 132 multiprocessors, forward / backward ms: two states 0.219 / 0.410, one 0.257 / 0.749.)
/// `$FERROSCAN_GATED_LANE_STATES` (1 or 2) forces the 16-bit choice, for tuning and for tests
/// of both paths. The kernel build and the launch grid both follow this one answer.
pub(super) fn lane_states(
    sm_count: usize,
    arch: (i32, i32),
    dtype: DType,
    shape: &ScanShape,
) -> usize {
    match dtype {
        DType::F32 | DType::F64 => 1,
        DType::F16 | DType::BF16 => {
            let forced = tuning_hook(LANE_STATES_ENV);
            match forced {
                Some(lanes @ (1 | 2)) => lanes,
                _ if few_groups(sm_count, shape.state_numel().div_ceil(64))
                    && arch < GATED_SCAN_CLUSTER_SOURCE.min_arch =>
                {
                    1
                }
                _ => 2,
            }
        }
    }
}

/// Whether `groups` blocks, one per group, would leave more than half the multiprocessors idle.
fn few_groups(sm_count: usize, groups: usize) -> bool {
    2 * groups < sm_count
}

/// Tuning hook: states per lane for 16-bit types, 1 or 2 (see [`lane_states`]).
pub const LANE_STATES_ENV: &str = "FERROSCAN_GATED_LANE_STATES";

/// Tuning hook: warps per block, 4, 8 or 16 (see [`warps`]).
pub const WARPS_ENV: &str = "FERROSCAN_GATED_WARPS";

/// Tuning hook: blocks per group, 1 or [`CLUSTER_BLOCKS`] (see [`cluster_candidate`]).
pub const CLUSTER_ENV: &str = "FERROSCAN_GATED_CLUSTER";

/// Blocks per group in the cluster build ([`GATED_SCAN_CLUSTER_SOURCE`], `FS_GATED_CLUSTER`).
const CLUSTER_BLOCKS: usize = 4;
/// Warps per block in the cluster build.
const CLUSTER_WARPS: usize = 4;

/// The kernels of `gated_scan.cu`, as far as their launch differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GatedKernel {
    /// `gated_fwd_*`.
    Forward { has_b: bool, has_c: bool },
    /// `gated_bwd_*`.
    Backward { has_b: bool, has_c: bool },
    /// `scan_blocks_bwd_*`: the plain scan's backward from its stored `h`.
    ScanBackward,
}

impl GatedKernel {
    /// The kernel's name; must match `FS_GATED_KERNELS` / `FS_SCAN_BLOCKS_BWD` in
    /// `kernels/gated_scan.cu`.
    pub(super) fn name(self, reverse: bool) -> String {
        let (pass, has_b, has_c) = match self {
            GatedKernel::Forward { has_b, has_c } => ("fwd", has_b, has_c),
            GatedKernel::Backward { has_b, has_c } => ("bwd", has_b, has_c),
            GatedKernel::ScanBackward => return format!("scan_blocks_bwd_r{}", u8::from(reverse)),
        };
        format!(
            "gated_{pass}_r{}_b{}_c{}",
            u8::from(reverse),
            u8::from(has_b),
            u8::from(has_c)
        )
    }
}

/// Blocks of `warps` warps that one multiprocessor holds at once, for a kernel of `regs`
/// registers per thread (65536 registers per multiprocessor, given to warps in units of 256; at
/// most 64 warps).
fn blocks_per_multiprocessor(regs: usize, warps: usize) -> usize {
    let per_warp = (regs * 32).div_ceil(256) * 256;
    (65536 / (per_warp * warps)).min(64 / warps)
}

/// Warps per block (`FS_GATED_WARPS`; one build of `gated_scan.cu` each): the most of 16, 8 and
/// 4 with which every block of the grid is resident at once, else 8, for a kernel that takes
/// `regs` registers per thread in its 8-warp build. The blocks then share the memory system
/// evenly from start to end instead of some of them waiting for a second round, and no more of
/// them than needed split a window of the time axis. (The builds cap registers per thread alike,
/// 128 for most kernels, so the count carries over; the kernels left uncapped, 190-240
/// registers, fit no block of 16 warps.) H100, forward / backward ms with 16, 8, 4 warps:
/// bfloat16 (8,2048,1536), 192 blocks: 0.125, **0.103**, - / -, 0.219, **0.201**; bfloat16
/// (4,8192,1536), 96 blocks: **0.219**, 0.263, - / -, **0.410**, 0.541; float32
/// (8,2048,1536), 384 blocks: 0.183, 0.190, **0.180** / 0.348, 0.352, **0.344**; float32
/// (4,8192,1536), 192 blocks: 0.400, **0.357**, 0.428 / 0.779, **0.700**, 0.715. The
/// one-state build has 16 warps only: [`lane_states`] picks it when its blocks fit one per
/// multiprocessor. `$FERROSCAN_GATED_WARPS` (4, 8 or 16) forces the choice of the other builds,
/// for tuning and for tests of every build.
pub(super) fn warps(
    sm_count: usize,
    dtype: DType,
    lanes: usize,
    shape: &ScanShape,
    regs: usize,
) -> usize {
    if lanes == 1 && matches!(dtype, DType::F16 | DType::BF16) {
        return 16;
    }
    let forced = tuning_hook(WARPS_ENV);
    if let Some(warps @ (4 | 8 | 16)) = forced {
        return warps;
    }
    let blocks = shape.state_numel().div_ceil(32 * lanes);
    [16, 8, 4]
        .into_iter()
        .find(|&warps| blocks <= sm_count * blocks_per_multiprocessor(regs, warps))
        .unwrap_or(8)
}

/// Whether a problem of `groups` groups of `lanes` states per lane runs on the cluster build
/// ([`GATED_SCAN_CLUSTER_SOURCE`]: a group's windows split between [`CLUSTER_BLOCKS`]
/// multiprocessors): `Some` when decided, `None` when it does if all the cluster build's blocks
/// are resident at once (the launcher checks with [`fits_at_once`]). A candidate has
/// [`few_groups`], a GPU with clusters (sm_90 and newer), and the two-state or the 32/64-bit
/// build. With more groups, the blocks already cover the GPU and the exchange of maps between
/// blocks costs more than it gains. H100, forward / backward ms, one block per group against
/// clusters (16-bit: one state per lane against two with clusters): bfloat16 (1,8192,1536)
/// 0.164 / 0.336 against 0.126 / 0.174; (2,8192,1536) 0.192 / 0.418 against 0.149 / 0.212;
/// (1,8192,512) 0.149 / 0.318 against 0.109 / 0.134; float32 (1,8192,1536) 0.173 / 0.291
/// against 0.135 / 0.249; (1,8192,512) 0.133 / 0.224 against 0.102 / 0.155; but with more
/// groups, bfloat16 (4,8192,1536) 0.223 / 0.409 against 0.283 / 0.422 and float32
/// (2,8192,1536) 0.195 / 0.387 against 0.255 / 0.495. `$FERROSCAN_GATED_CLUSTER` (1 or 4)
/// forces the choice where the build exists, for tuning and for tests of both paths.
pub(super) fn cluster_candidate(
    sm_count: usize,
    arch: (i32, i32),
    dtype: DType,
    lanes: usize,
    groups: usize,
) -> Option<bool> {
    let possible = arch >= GATED_SCAN_CLUSTER_SOURCE.min_arch
        && !(lanes == 1 && matches!(dtype, DType::F16 | DType::BF16));
    if !possible {
        return Some(false);
    }
    let forced = tuning_hook(CLUSTER_ENV);
    match forced {
        Some(1) => Some(false),
        Some(CLUSTER_BLOCKS) => Some(true),
        _ if few_groups(sm_count, groups) => None,
        _ => Some(false),
    }
}

/// Whether `blocks` blocks of `warps` warps, `regs` registers per thread, are all resident on
/// `sm_count` multiprocessors at once.
fn fits_at_once(blocks: usize, sm_count: usize, regs: usize, warps: usize) -> bool {
    blocks <= sm_count * blocks_per_multiprocessor(regs, warps)
}

/// Bytes of dynamic shared memory per block that keep a multiprocessor of `shared_per_mp` bytes
/// from holding more than `blocks` blocks of `static_shared` bytes each (0 when none are
/// needed). The cluster scheduler otherwise packs as many blocks on a multiprocessor as fit
/// (measured on the H100: four on some, none on others), and the fullest set the pace. Every
/// block also holds 1 KiB of shared memory for the system (sm_80 and newer).
fn shared_padding(blocks: usize, shared_per_mp: usize, static_shared: usize) -> usize {
    const RESERVED_PER_BLOCK: usize = 1024;
    let per_block = (shared_per_mp / (blocks + 1) + 1).saturating_sub(RESERVED_PER_BLOCK);
    per_block.saturating_sub(static_shared)
}

/// The kernel build for `lanes` states per lane and `warps` warps per block (see
/// [`lane_states`], [`warps`]); [`GATED_SCAN_CLUSTER_SOURCE`] is chosen apart.
fn source(dtype: DType, lanes: usize, warps: usize) -> KernelSource {
    match (dtype, warps) {
        (DType::F16 | DType::BF16, _) if lanes == 1 => GATED_SCAN_ONE_STATE_SOURCE,
        (_, 4) => GATED_SCAN_4_WARPS_SOURCE,
        (_, 16) => GATED_SCAN_16_WARPS_SOURCE,
        _ => GATED_SCAN_SOURCE,
    }
}

/// Tuning hook: the staged forward for 16-bit types, 0 or 1 (see [`staged_forward`]).
pub const STAGED_ENV: &str = "FERROSCAN_GATED_STAGED";
/// Warps per block of [`GATED_SCAN_STAGED_SOURCE`] (`FS_GATED_WARPS`).
const STAGED_WARPS: usize = 16;
/// Stages of shared memory of [`GATED_SCAN_STAGED_SOURCE`] (`FS_GATED_STAGES`).
const STAGED_STAGES: usize = 2;
/// The oldest architecture with asynchronous copies into shared memory (`cp.async`).
const ASYNC_COPY_ARCH: (i32, i32) = (8, 0);

/// The bytes of dynamic shared memory `kernel` takes when it runs on
/// [`GATED_SCAN_STAGED_SOURCE`] (the launcher checks that they fit a block), or `None` when it
/// runs on the build of [`warps`]: a forward in 16-bit types with two states per lane whose
/// blocks take the 16-warp build (at most one block per multiprocessor). Those forwards load a
/// window ahead into registers, capped at 128 per thread, which the two-state forward with `b`
/// and `c` exceeds (it spills); the staged build copies the window ahead into shared memory in
/// 16-byte pieces instead (a quarter of the copy instructions; copies in flight hold no
/// registers). It needs sm_80 or newer (`cp.async`; older GPUs would copy at once). H100,
/// bfloat16 (4,8192,1536) with `b` and `c`, 96 blocks, forward ms: 0.223 in registers, 0.189
/// staged (2 stages; 3 stages 0.222, 8 warps with 3 or 4 stages 0.214, float32 8 warps 0.41
/// against 0.36 in registers). `$FERROSCAN_GATED_STAGED` (0 or 1) forces the choice for
/// 16-bit two-state forwards, for tuning and for tests of both paths.
fn staged_forward(
    kernel: GatedKernel,
    arch: (i32, i32),
    dtype: DType,
    lanes: usize,
    warps: usize,
) -> Option<usize> {
    let GatedKernel::Forward { has_b, has_c } = kernel else {
        return None;
    };
    if arch < ASYNC_COPY_ARCH || lanes != 2 || !matches!(dtype, DType::F16 | DType::BF16) {
        return None;
    }
    let forced = tuning_hook(STAGED_ENV);
    let staged = match forced {
        Some(0) => false,
        Some(1) => true,
        _ => warps == STAGED_WARPS,
    };
    staged.then(|| staged_shared_bytes(lanes, dtype, has_b, has_c))
}

/// Bytes of dynamic shared memory of the staged forward (`StagedWindows` in gated_scan.cu):
/// [`STAGED_STAGES`] stages, each holding every warp's segment of [`CHECKPOINT_SPACING`] steps of
/// the tensors it reads (`x`, `a`, and `b`, `c` where present), `lanes` states per lane.
fn staged_shared_bytes(lanes: usize, dtype: DType, has_b: bool, has_c: bool) -> usize {
    let tensors = 2 + usize::from(has_b) + usize::from(has_c);
    STAGED_STAGES * STAGED_WARPS * 32 * CHECKPOINT_SPACING * tensors * lanes * dtype.size_bytes()
}

/// `(segments, states)`: the checkpoint buffer's shape, in accumulator elements
/// ([`DType::accumulator_bytes`] each).
pub fn checkpoint_shape(shape: &ScanShape) -> (usize, usize) {
    (shape.len.div_ceil(CHECKPOINT_SPACING), shape.state_numel())
}

/// Kernel parameters, passed by value; mirrors `struct GatedParams` in `kernels/gated_scan.cu`
/// (addresses, 0 = absent; the sizes are filled in by [`launch`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct GatedParams {
    pub(super) x: u64,
    pub(super) a: u64,
    pub(super) b: u64,
    pub(super) c: u64,
    pub(super) initial: u64,
    pub(super) grad_y: u64,
    pub(super) grad_final: u64,
    pub(super) hidden: u64,
    pub(super) y: u64,
    pub(super) final_out: u64,
    pub(super) checkpoints: u64,
    pub(super) grad_x: u64,
    pub(super) grad_a: u64,
    pub(super) grad_b: u64,
    pub(super) grad_c: u64,
    pub(super) grad_initial: u64,
    pub(super) outer: i64,
    pub(super) len: i64,
    pub(super) inner: i64,
}

// SAFETY: plain-old-data with the C layout of the kernel's `GatedParams` (u64 addresses, i64 sizes).
unsafe impl DeviceRepr for GatedParams {}

/// The buffers of a forward call (device addresses; `None` = absent).
#[derive(Clone, Copy, Debug)]
pub struct GatedForwardBuffers {
    /// Inputs `x`, `a` (required), `b`, `c` (absent: 1), `h0` (absent: zeros).
    pub x: u64,
    /// Gates `a`.
    pub a: u64,
    /// Input gates `b`.
    pub b: Option<u64>,
    /// Output gates `c`.
    pub c: Option<u64>,
    /// Initial state `h0`, `(outer, inner)`.
    pub initial: Option<u64>,
    /// Output `y`.
    pub y: u64,
    /// The state after the last step, `(outer, inner)`.
    pub final_state: Option<u64>,
    /// Checkpoints for the backward ([`checkpoint_shape`], accumulator type).
    pub checkpoints: Option<u64>,
}

/// The buffers of a backward call (device addresses; `None` = absent).
#[derive(Clone, Copy, Debug)]
pub struct GatedBackwardBuffers {
    /// `x` as given to the forward.
    pub x: u64,
    /// `a` as given to the forward.
    pub a: u64,
    /// `b` as given to the forward (absent: 1; then `grad_b` must be absent too).
    pub b: Option<u64>,
    /// `c` as given to the forward (absent: 1; then `grad_c` must be absent too).
    pub c: Option<u64>,
    /// The checkpoints the forward wrote.
    pub checkpoints: u64,
    /// Gradient of the loss with respect to `y`.
    pub grad_y: u64,
    /// Gradient with respect to the final state (absent: zeros).
    pub grad_final: Option<u64>,
    /// Outputs `∂x`, `∂a`.
    pub grad_x: u64,
    /// `∂a`.
    pub grad_a: u64,
    /// `∂b` (exactly when `b` is present).
    pub grad_b: Option<u64>,
    /// `∂c` (exactly when `c` is present).
    pub grad_c: Option<u64>,
    /// `∂h0` (absent: not computed).
    pub grad_initial: Option<u64>,
}

/// Whether the plain scan of `shape` runs on these kernels (forward: the gated forward without
/// `b` and `c`; backward: [`GatedKernel::ScanBackward`]) rather than on `scan.cu`'s: when the
/// time axis is not innermost and there are enough states for a block of 32 per
/// multiprocessor. (With fewer states, `scan.cu` splits the time axis across blocks instead.)
pub(super) fn uses_blocks(sm_count: usize, shape: &ScanShape) -> bool {
    shape.inner > 1 && shape.state_numel().div_ceil(32) >= sm_count
}

/// Every kernel name of `gated_scan.cu` (for compile checks).
pub fn all_kernel_names() -> Vec<String> {
    let mut kernels = vec![GatedKernel::ScanBackward];
    for has_b in [false, true] {
        for has_c in [false, true] {
            kernels.push(GatedKernel::Forward { has_b, has_c });
            kernels.push(GatedKernel::Backward { has_b, has_c });
        }
    }
    kernels
        .into_iter()
        .flat_map(|kernel| [kernel.name(false), kernel.name(true)])
        .collect()
}

/// Launches `kernel` of `gated_scan.cu` over the whole problem (in its direction).
///
/// # Safety
/// Every non-zero address in `params` must be valid for the shape it describes.
pub(super) unsafe fn launch(
    device: &Device,
    stream: &CudaStream,
    dtype: DType,
    kernel: GatedKernel,
    problem: &ScanProblem,
    mut params: GatedParams,
) -> Result<()> {
    let shape = &problem.shape;
    params.outer = shape.outer as i64;
    params.len = shape.len as i64;
    params.inner = shape.inner as i64;
    let sm_count = device.sm_count();
    let lanes = lane_states(sm_count, device.arch(), dtype, shape);
    let name = kernel.name(problem.reverse);
    let groups = shape.state_numel().div_ceil(32 * lanes);
    let clustered_blocks = groups * CLUSTER_BLOCKS;
    let cluster_kernel = match cluster_candidate(sm_count, device.arch(), dtype, lanes, groups) {
        Some(false) => None,
        Some(true) => Some(device.loaded(GATED_SCAN_CLUSTER_SOURCE, dtype, &name)?),
        None => Some(device.loaded(GATED_SCAN_CLUSTER_SOURCE, dtype, &name)?)
            .filter(|k| fits_at_once(clustered_blocks, sm_count, k.registers, CLUSTER_WARPS)),
    };
    if let Some(kernel) = cluster_kernel {
        let padding = shared_padding(
            clustered_blocks.div_ceil(sm_count),
            device.shared_per_multiprocessor(),
            kernel.static_shared,
        );
        device.allow_dynamic_shared(&kernel, padding)?;
        let cfg = LaunchConfig {
            grid_dim: (grid_blocks(clustered_blocks)?, 1, 1),
            block_dim: ((CLUSTER_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: padding as u32,
        };
        let cluster = CLUSTER_BLOCKS as u32;
        // SAFETY: the kernel touches only the buffers in `params`, valid as the caller guarantees;
        // the grid is whole clusters.
        return unsafe { launch_clustered(stream, &kernel.function, cfg, cluster, &params) };
    }
    let regs = device.registers(source(dtype, lanes, 8), dtype, &name)?;
    let warps = warps(sm_count, dtype, lanes, shape, regs);
    let staged = match staged_forward(kernel, device.arch(), dtype, lanes, warps) {
        Some(bytes) => Some((
            device.loaded(GATED_SCAN_STAGED_SOURCE, dtype, &name)?,
            bytes,
        ))
        .filter(|(k, bytes)| k.static_shared + bytes <= device.shared_per_block()),
        None => None,
    };
    let (kernel_build, warps, dynamic_shared) = match staged {
        Some((k, bytes)) => (k, STAGED_WARPS, bytes),
        None => (
            device.loaded(source(dtype, lanes, warps), dtype, &name)?,
            warps,
            0,
        ),
    };
    device.allow_dynamic_shared(&kernel_build, dynamic_shared)?;
    let cfg = LaunchConfig {
        grid_dim: (grid_blocks(groups)?, 1, 1),
        block_dim: ((warps * 32) as u32, 1, 1),
        shared_mem_bytes: dynamic_shared as u32,
    };
    let function = kernel_build.function;
    let mut builder = stream.launch_builder(&function);
    builder.arg(&params);
    // SAFETY: the kernel touches only the buffers in `params`, valid as the caller guarantees, and
    // (the staged build) the dynamic shared memory it indexes, `staged_shared_bytes` of it.
    unsafe { builder.launch(cfg) }.map_err(driver_error("launching a gated scan kernel"))?;
    Ok(())
}

/// Fused gated-scan forward on raw device addresses, queued on `stream`.
///
/// # Safety
/// Every present address must point to device memory of `device` holding a C-contiguous buffer
/// of the shape the problem gives it (tensors `(outer, len, inner)` of `dtype`, states
/// `(outer, inner)` of `dtype`, checkpoints [`checkpoint_shape`] of the accumulator type), alive
/// until the stream has run the kernel; outputs must not overlap inputs; `stream` must belong to
/// `device`'s primary context.
pub unsafe fn gated_scan_forward_raw(
    device: &Device,
    stream: &CudaStream,
    dtype: DType,
    problem: &ScanProblem,
    buffers: GatedForwardBuffers,
) -> Result<()> {
    let shape = problem.shape;
    if shape.len == 0 {
        let bytes = shape.state_numel() * dtype.size_bytes();
        let (dst, src) = (
            buffers.final_state.unwrap_or(0),
            buffers.initial.unwrap_or(0),
        );
        // SAFETY: forwarded from the caller.
        return unsafe { pass_state_through(stream, dst, src, bytes) };
    }
    if shape.numel() == 0 {
        return Ok(());
    }
    for (arg, address) in [("x", buffers.x), ("a", buffers.a), ("y", buffers.y)] {
        check_required(arg, address)?;
    }
    let params = GatedParams {
        x: buffers.x,
        a: buffers.a,
        b: buffers.b.unwrap_or(0),
        c: buffers.c.unwrap_or(0),
        initial: buffers.initial.unwrap_or(0),
        y: buffers.y,
        final_out: buffers.final_state.unwrap_or(0),
        checkpoints: buffers.checkpoints.unwrap_or(0),
        ..GatedParams::default()
    };
    let kernel = GatedKernel::Forward {
        has_b: buffers.b.is_some(),
        has_c: buffers.c.is_some(),
    };
    // SAFETY: forwarded from the caller.
    unsafe { launch(device, stream, dtype, kernel, problem, params) }
}

/// Fused, recomputing gated-scan backward on raw device addresses; see
/// [`gated_scan_forward_raw`] for the contract.
///
/// # Safety
/// As for [`gated_scan_forward_raw`]; `checkpoints` must be what the forward of the same inputs
/// wrote.
pub unsafe fn gated_scan_backward_raw(
    device: &Device,
    stream: &CudaStream,
    dtype: DType,
    problem: &ScanProblem,
    buffers: GatedBackwardBuffers,
) -> Result<()> {
    let shape = problem.shape;
    if shape.len == 0 {
        // h_final = h0, so the gradient passes straight through.
        let bytes = shape.state_numel() * dtype.size_bytes();
        let (dst, src) = (
            buffers.grad_initial.unwrap_or(0),
            buffers.grad_final.unwrap_or(0),
        );
        // SAFETY: forwarded from the caller.
        return unsafe { pass_state_through(stream, dst, src, bytes) };
    }
    if shape.numel() == 0 {
        return Ok(());
    }
    for (arg, address) in [
        ("x", buffers.x),
        ("a", buffers.a),
        ("checkpoints", buffers.checkpoints),
        ("grad_y", buffers.grad_y),
        ("grad_x", buffers.grad_x),
        ("grad_a", buffers.grad_a),
    ] {
        check_required(arg, address)?;
    }
    for (present, arg, grad) in [
        (buffers.b.is_some(), "grad_b", buffers.grad_b),
        (buffers.c.is_some(), "grad_c", buffers.grad_c),
    ] {
        if present != grad.is_some() {
            return Err(crate::Error::invalid(
                arg,
                if present {
                    "a device address (its gate was given)"
                } else {
                    "absent (its gate was not given)"
                },
            ));
        }
    }
    let params = GatedParams {
        x: buffers.x,
        a: buffers.a,
        b: buffers.b.unwrap_or(0),
        c: buffers.c.unwrap_or(0),
        grad_y: buffers.grad_y,
        grad_final: buffers.grad_final.unwrap_or(0),
        checkpoints: buffers.checkpoints,
        grad_x: buffers.grad_x,
        grad_a: buffers.grad_a,
        grad_b: buffers.grad_b.unwrap_or(0),
        grad_c: buffers.grad_c.unwrap_or(0),
        grad_initial: buffers.grad_initial.unwrap_or(0),
        ..GatedParams::default()
    };
    let kernel = GatedKernel::Backward {
        has_b: buffers.b.is_some(),
        has_c: buffers.c.is_some(),
    };
    // SAFETY: forwarded from the caller.
    unsafe { launch(device, stream, dtype, kernel, problem, params) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`lane_states`] restates `FS_GATED_LANE_STATES`; this pins the kernel's definition (and
    /// the one-state build's override) so that changing one side alone fails here rather than as
    /// wrong results on a GPU.
    #[test]
    fn lane_states_match_the_kernel() {
        let kernel = GATED_SCAN_SOURCE.text;
        assert!(kernel.contains(
            "#ifndef FS_GATED_LANE_STATES\n#if FS_DTYPE == 0 || FS_DTYPE == 1\n#define FS_GATED_LANE_STATES 2\n#else\n#define FS_GATED_LANE_STATES 1\n#endif"
        ));
        assert!(kernel.contains("#define FS_GATED_BLOCK_STATES (FS_WARP * FS_GATED_LS)"));
        assert!(GATED_SCAN_ONE_STATE_SOURCE
            .text
            .starts_with("#define FS_GATED_LANE_STATES 1\n#define FS_GATED_WARPS 16\n"));
        // 132 multiprocessors: without clusters (sm_80), two states per lane from 66 groups of
        // 64 states; with them (sm_90), always two for 16-bit types.
        let shape = |outer| ScanShape::new(outer, 16, 64).unwrap();
        for (dtype, few, many, clusters) in [
            (DType::F16, 1, 2, 2),
            (DType::BF16, 1, 2, 2),
            (DType::F32, 1, 1, 1),
            (DType::F64, 1, 1, 1),
        ] {
            assert_eq!(lane_states(132, (8, 0), dtype, &shape(65)), few);
            assert_eq!(lane_states(132, (8, 0), dtype, &shape(66)), many);
            assert_eq!(lane_states(132, (9, 0), dtype, &shape(1)), clusters);
        }
    }

    /// [`warps`] and [`GatedKernel::blocks_per_multiprocessor`] restate the builds and the
    /// `__launch_bounds__` of gated_scan.cu; this pins both sides and the measured choices.
    #[test]
    fn warps_fill_one_wave_with_the_largest_blocks() {
        let kernel = GATED_SCAN_SOURCE.text;
        assert!(kernel.contains("#ifndef FS_GATED_WARPS\n#define FS_GATED_WARPS 8\n#endif"));
        assert!(kernel.contains("#define FS_GATED_FWD_BOUNDS FS_GATED_CAPPED(128)"));
        assert!(kernel.contains("#define FS_GATED_BWD_BOUNDS_11 FS_GATED_UNCAPPED"));
        assert!(kernel.contains("#define FS_GATED_SCAN_BWD_BOUNDS FS_GATED_CAPPED(80)"));
        for (warps, build) in [
            (4, GATED_SCAN_4_WARPS_SOURCE),
            (16, GATED_SCAN_16_WARPS_SOURCE),
        ] {
            assert!(build
                .text
                .starts_with(&format!("#define FS_GATED_WARPS {warps}\n")));
            assert_eq!(source(DType::F32, 1, warps), build);
            assert_eq!(source(DType::BF16, 2, warps), build);
        }
        assert_eq!(source(DType::BF16, 2, 8), GATED_SCAN_SOURCE);
        assert_eq!(source(DType::BF16, 1, 8), GATED_SCAN_ONE_STATE_SOURCE);

        let bld = |b, l, d| ScanShape::new(b, l, d).unwrap();
        // The H100 cases of the issue (132 multiprocessors), with the registers of the 8-warp
        // builds (forward, backward with b and c), as measured best.
        for (dtype, shape, (fwd_regs, bwd_regs), fwd_warps, bwd_warps) in [
            (DType::BF16, bld(8, 2048, 1536), (128, 236), 8, 4),
            (DType::BF16, bld(4, 8192, 1536), (128, 236), 16, 8),
            (DType::F32, bld(8, 2048, 1536), (119, 128), 4, 4),
            (DType::F32, bld(4, 8192, 1536), (119, 128), 8, 8),
        ] {
            let lanes = lane_states(132, (9, 0), dtype, &shape);
            assert_eq!(
                warps(132, dtype, lanes, &shape, fwd_regs),
                fwd_warps,
                "{dtype:?} {shape:?}"
            );
            assert_eq!(
                warps(132, dtype, lanes, &shape, bwd_regs),
                bwd_warps,
                "{dtype:?} {shape:?}"
            );
        }
        // The plain scan's forward in float32 (79 registers) fits three blocks of 8 warps.
        assert_eq!(blocks_per_multiprocessor(79, 8), 3);
        assert_eq!(warps(132, DType::F32, 1, &bld(8, 2048, 1536), 79), 8);
        // 236 registers fit no block of 16 warps; beyond one wave, 8.
        assert_eq!(blocks_per_multiprocessor(236, 16), 0);
        assert_eq!(warps(132, DType::F32, 1, &bld(64, 8, 1536), 128), 8);
        // Few 16-bit states without clusters: the one-state build, 16 warps.
        assert_eq!(warps(132, DType::BF16, 1, &bld(1, 8, 64), 236), 16);
    }

    /// [`cluster_candidate`], [`fits_at_once`] and [`shared_padding`] against the cluster build
    /// and the H100 (132 multiprocessors of 228 KiB of shared memory).
    #[test]
    fn clusters_for_few_groups_on_sm90() {
        let kernel = GATED_SCAN_CLUSTER_SOURCE.text;
        assert!(kernel.starts_with(&format!(
            "#define FS_GATED_CLUSTER {CLUSTER_BLOCKS}\n#define FS_GATED_WARPS {CLUSTER_WARPS}\n"
        )));
        assert_eq!(GATED_SCAN_CLUSTER_SOURCE.min_arch, (9, 0));
        // Fewer groups than half the multiprocessors: a candidate on sm_90, never on sm_80 nor
        // for the one-state 16-bit build.
        for (arch, dtype, lanes, groups, want) in [
            ((9, 0), DType::BF16, 2, 48, None),
            ((9, 0), DType::F32, 1, 65, None),
            ((9, 0), DType::F32, 1, 66, Some(false)),
            ((9, 0), DType::BF16, 2, 96, Some(false)),
            ((8, 0), DType::F32, 1, 8, Some(false)),
            ((9, 0), DType::BF16, 1, 8, Some(false)),
        ] {
            assert_eq!(
                cluster_candidate(132, arch, dtype, lanes, groups),
                want,
                "sm_{arch:?} {dtype:?} {lanes} states per lane, {groups} groups"
            );
        }
        // 268 blocks of 4 warps: resident at 155 registers (three per multiprocessor), not at
        // 255 (two).
        assert!(fits_at_once(268, 132, 155, CLUSTER_WARPS));
        assert!(!fits_at_once(268, 132, 255, CLUSTER_WARPS));
        // Padding keeps three blocks, not four, on a multiprocessor (1 KiB reserved per block).
        let h100 = 228 * 1024;
        for static_shared in [8208, 16400] {
            let per_block = static_shared + shared_padding(3, h100, static_shared) + 1024;
            assert!(
                3 * per_block <= h100 && 4 * per_block > h100,
                "{static_shared}"
            );
        }
        assert_eq!(
            shared_padding(3, h100, 60 * 1024),
            0,
            "large enough already"
        );
    }

    #[test]
    fn staged_forward_for_16_bit_blocks_of_16_warps() {
        assert!(GATED_SCAN_STAGED_SOURCE.text.starts_with(&format!(
            "#define FS_GATED_WARPS {STAGED_WARPS}\n#define FS_GATED_STAGES {STAGED_STAGES}\n"
        )));
        let forward = |has_b, has_c| GatedKernel::Forward { has_b, has_c };
        const H100: (i32, i32) = (9, 0);
        // Two stages of 16 warps' segments of 8 steps, 4 bytes per lane and tensor: 128 KiB
        // with b and c (x, a, b, c), 64 KiB without.
        assert_eq!(
            staged_forward(forward(true, true), H100, DType::BF16, 2, 16),
            Some(128 * 1024)
        );
        assert_eq!(
            staged_forward(forward(false, false), H100, DType::F16, 2, 16),
            Some(64 * 1024)
        );
        // Blocks of fewer warps, 32-bit types, one state per lane, backwards, no cp.async before
        // sm_80: in registers.
        let backward = GatedKernel::Backward {
            has_b: true,
            has_c: true,
        };
        for (kernel, arch, dtype, lanes, warps) in [
            (forward(true, true), H100, DType::BF16, 2, 8),
            (forward(true, true), H100, DType::F32, 1, 16),
            (forward(true, true), H100, DType::BF16, 1, 16),
            (backward, H100, DType::BF16, 2, 16),
            (forward(false, false), (7, 5), DType::BF16, 2, 16),
        ] {
            assert_eq!(
                staged_forward(kernel, arch, dtype, lanes, warps),
                None,
                "{kernel:?} sm_{arch:?} {dtype:?} {lanes} states per lane, {warps} warps"
            );
        }
        // The bfloat16 (4,8192,1536) forward takes 16 warps on an H100 (96 blocks).
        let shape = ScanShape::new(4, 8192, 1536).unwrap();
        assert_eq!(warps(132, DType::BF16, 2, &shape, 128), STAGED_WARPS);
    }

    #[test]
    fn blocks_need_a_block_per_multiprocessor() {
        let shape = |outer, inner| ScanShape::new(outer, 16, inner).unwrap();
        // 132 multiprocessors: 132 groups of 32 states.
        assert!(uses_blocks(132, &shape(132, 32)));
        assert!(!uses_blocks(132, &shape(131, 32)));
        assert!(!uses_blocks(1, &shape(64, 1)), "time innermost: scan.cu");
    }
}
