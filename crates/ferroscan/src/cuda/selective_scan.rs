//! Launcher of the selective scan kernels (`kernels/selective_scan.cu`), on raw device addresses
//! and a borrowed stream (what the Python package uses; it allocates outputs and scratch).
//!
//! A problem runs with a *configuration* of `P` lanes per channel and `S` states per lane
//! (`P·S >= N`), and a *tile* of `ct` channels per block of 128 threads, all in one group of every
//! variable `B`/`C`. The forward is one kernel; the backward is one kernel, then
//! `selective_reduce_params` (∂A, ∂D, ∂delta_bias, constant ∂B/∂C summed over the batch and time
//! chunks) and one `selective_reduce_bc` per variable `B`/`C` (summed over the tiles of each
//! group), all in fixed orders: the gradients are deterministic. With too few rows (batch x dim) to
//! fill the GPU, the backward cuts the time axis into chunks, one block each, after a
//! `selective_carry` pass that finds the adjoint state each chunk starts from (see
//! [`BackwardPlan`]).
//!
//! Compiled by NVRTC in the CI's test suite for sm_80 and sm_90 (no GPU there); run and checked
//! against the float64 reference on an H100 by `scripts/test.sh -m cuda` (the README's GPU tests).

use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::compile::{KernelSource, SelectiveBuilds, SELECTIVE_COMPLEX, SELECTIVE_REAL};
use super::device::{driver_error, Device};
use super::launch::{check_required, grid_blocks, tuning_hook};
use crate::error::{Error, Result};
use crate::layout::DType;
use crate::selective::{
    Bc, BcGrad, SelectiveGradInputs, SelectiveGradOutputs, SelectiveInputs, SelectiveOutputs,
    SelectiveProblem, Seq,
};

/// Threads per block of the forward and backward kernels (`FS_SEL_THREADS`).
const THREADS: usize = 128;
/// Threads per block of the reduction kernels.
const REDUCE_THREADS: usize = 256;
/// Values of a variable ∂B/∂C each thread of `selective_reduce_bc` sums (`FS_SEL_REDUCE_RUN`; the
/// kernel loops over the grid, so a mismatch would cost speed, not correctness).
const REDUCE_BC_RUN: usize = 4;
/// Byte alignment of the scratch regions.
const SCRATCH_ALIGN: usize = 256;

/// Kernel parameters, passed by value; mirrors `struct SelParams` in the kernel source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SelectiveParams {
    u: u64,
    delta: u64,
    z: u64,
    dout: u64,
    a: u64,
    d: u64,
    bias: u64,
    initial: u64,
    grad_last: u64,
    b_const: u64,
    b_var: u64,
    c_const: u64,
    c_var: u64,
    out: u64,
    last: u64,
    ckpt: u64,
    du: u64,
    ddelta: u64,
    dz: u64,
    dinitial: u64,
    part_params: u64,
    part_b: u64,
    part_c: u64,
    part_carry: u64,
    batch: i64,
    dim: i64,
    len: i64,
    dstate: i64,
    n_ck: i64,
    chunks: i64,
    chunk_cks: i64,
    carry_pieces: i64,
    u_s: [i64; 3],
    delta_s: [i64; 3],
    z_s: [i64; 3],
    dout_s: [i64; 3],
    b_s: [i64; 4],
    c_s: [i64; 4],
    b_groups: i64,
    c_groups: i64,
    ct: i64,
    tiles: i64,
    softplus: i32,
    carry_split: i32,
}

// SAFETY: plain-old-data with the C layout of the kernel's `SelParams` (u64 addresses, i64 sizes
// and strides, two i32).
unsafe impl DeviceRepr for SelectiveParams {}

/// Parameters of the reduction kernels; mirrors `struct SelReduceParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SelectiveReduceParams {
    src: u64,
    da: u64,
    db: u64,
    dc: u64,
    dd: u64,
    dbias: u64,
    dvar: u64,
    batch: i64,
    dim: i64,
    len: i64,
    dstate: i64,
    groups: i64,
    tiles: i64,
    ct: i64,
}

// SAFETY: plain-old-data with the C layout of the kernel's `SelReduceParams`.
unsafe impl DeviceRepr for SelectiveReduceParams {}

/// The largest `N` the CUDA kernels take: 256 real / 128 complex states (128 / 64 in float64,
/// whose shared memory is twice as large). Mirrors which configurations of the kernel source fit
/// their shared memory (`BwdPlan<P, S>::fits`).
pub fn max_dstate(dtype: DType, complex: bool) -> usize {
    match (dtype == DType::F64, complex) {
        (false, false) => 256,
        (false, true) | (true, false) => 128,
        (true, true) => 64,
    }
}

/// Lanes per channel `P` and states per lane `S` for a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectiveConfig {
    /// Lanes per channel (4, 8, 16 or 32).
    pub lanes: usize,
    /// States per lane (4, or 8 for `N > 128`; 2 for `N <= 16` with few channels).
    pub states: usize,
}

impl SelectiveConfig {
    /// The configuration for `problem`, or an error naming `dstate` when `N` is beyond
    /// [`max_dstate`].
    pub fn new(dtype: DType, problem: &SelectiveProblem) -> Result<Self> {
        let n = problem.dstate;
        let most = max_dstate(dtype, problem.complex);
        if n > most {
            return Err(Error::invalid(
                "dstate",
                format!(
                    "at most {most} states per channel for {} {} on CUDA (the CPU takes any), got {n}",
                    if problem.complex { "complex" } else { "real" },
                    dtype.name()
                ),
            ));
        }
        let mut config = Self::narrowest(n);
        // Few channels: spread each channel's states over more lanes (fewer per lane), so that
        // more warps share the latency of each step's dependency chain.
        let channels = problem.batch * problem.dim;
        while channels * config.lanes < FILL_THREADS {
            let wider = SelectiveConfig {
                lanes: config.lanes * 2,
                states: config.states / 2,
            };
            if wider.states == 0 || !configs(problem.complex).contains(&wider) {
                break;
            }
            config = wider;
        }
        if let Some(lanes) = tuning_hook(LANES_ENV) {
            if let Some(forced) = configs(problem.complex)
                .into_iter()
                .filter(|c| c.lanes == lanes && c.lanes * c.states >= n)
                .min_by_key(|c| c.states)
            {
                config = forced;
            }
        }
        Ok(config)
    }

    /// The configuration with the fewest lanes (4 states a lane, 8 beyond 128 states) for `n`
    /// states.
    fn narrowest(n: usize) -> Self {
        if n <= 128 {
            SelectiveConfig {
                lanes: n.div_ceil(4).next_power_of_two().max(4),
                states: 4,
            }
        } else {
            SelectiveConfig {
                lanes: 32,
                states: 8,
            }
        }
    }

    /// The forward kernel's name.
    pub fn forward_kernel(&self) -> String {
        format!("selective_fwd_p{}_s{}", self.lanes, self.states)
    }

    /// The backward kernel's name.
    pub fn backward_kernel(&self) -> String {
        format!("selective_bwd_p{}_s{}", self.lanes, self.states)
    }

    /// The backward kernel's name for time chunks (each block one chunk of its rows).
    pub fn chunked_backward_kernel(&self) -> String {
        format!("selective_bwd_chunked_p{}_s{}", self.lanes, self.states)
    }

    /// The name of the backward's pass over time chunks (phase A, before the backward kernel).
    pub fn carry_kernel(&self) -> String {
        format!("selective_carry_p{}_s{}", self.lanes, self.states)
    }
}

/// How the backward runs: its configuration and channel tiles, and its time chunks.
///
/// The backward's blocks each walk their rows' whole time axis backwards unless, in the narrowest
/// configuration, the blocks of whole rows leave much of their wave of block slots empty (see
/// `chunks_for_full_waves`). Then, where the sequence is long enough for chunks of at least
/// `MIN_CHUNK_STEPS`, 256 steps, it keeps that configuration and cuts the time axis into chunks, a
/// block each: `selective_carry` first finds, for every piece of a chunk after the first, the
/// adjoint its own steps pass back from a zero adjoint after it, and its Σ Δ, from which each block
/// composes the adjoint it starts from. Otherwise it spreads the states over more lanes as the
/// forward does (fewer rows than `FILL_THREADS` threads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardPlan {
    /// Lanes and states per lane.
    pub config: SelectiveConfig,
    /// Channel tiles of the configuration.
    pub tiles: TilePlan,
    /// Time chunks per row (1: a block walks the whole sequence).
    pub chunks: usize,
    /// 16-step segments (checkpoints) per chunk; the last chunk may have fewer.
    pub chunk_cks: usize,
    /// `selective_carry`'s pieces per chunk (it runs a block per piece; `chunk_cks` is a multiple).
    pub carry_split: usize,
    /// `selective_carry`'s pieces per row, of `chunk_cks / carry_split` segments (the last may
    /// have fewer); it writes records for those after the first chunk.
    pub carry_pieces: usize,
}

/// Most time chunks per row: the adjoints a block composes grow with the count.
const MAX_CHUNKS: usize = 32;
/// Fewest steps per time chunk (whole checkpoint segments): `selective_carry` walks every chunk but
/// the first once more.
const MIN_CHUNK_STEPS: usize = 256;
/// Fewest segments per `selective_carry` piece: a piece is one block's serial walk, and each one
/// adds a record that the backward's blocks compose.
const MIN_PIECE_CKS: usize = 16;
/// Most `selective_carry` pieces per row: the records the first chunk's block composes.
const MAX_CARRY_PIECES: usize = 64;

/// Tuning hook: `selective_carry`'s pieces per chunk (a divisor of the chunk's segments; 1 walks
/// whole chunks), for measuring the split.
pub const CARRY_SPLIT_ENV: &str = "FERROSCAN_SELECTIVE_CARRY_SPLIT";

/// Tuning hook: time chunks for the backward (`FERROSCAN_SELECTIVE_CHUNKS=1` turns them off,
/// spreading states over more lanes instead), for measuring the plans against each other.
pub const CHUNKS_ENV: &str = "FERROSCAN_SELECTIVE_CHUNKS";

impl BackwardPlan {
    /// The plan for `problem` with the group counts of a variable `B` and `C`, on a device with
    /// `sm_count` multiprocessors.
    pub fn new(
        sm_count: usize,
        dtype: DType,
        problem: &SelectiveProblem,
        groups: [Option<usize>; 2],
    ) -> Result<Self> {
        let widened = SelectiveConfig::new(dtype, problem)?;
        let narrow = SelectiveConfig::narrowest(problem.dstate);
        let segments = problem.checkpoint_count();
        let row_blocks = problem.batch * TilePlan::new(problem, &narrow, groups).tiles;
        let slots = sm_count.max(1) * resident_backward_blocks(problem.complex);
        let mut chunks = if row_blocks == 0 || tuning_hook(LANES_ENV).is_some() {
            1
        } else {
            chunks_for_full_waves(row_blocks, slots, problem.len / MIN_CHUNK_STEPS)
        };
        if let Some(forced) = tuning_hook(CHUNKS_ENV) {
            chunks = forced.clamp(1, segments.max(1));
        }
        let chunk_cks = segments.div_ceil(chunks).max(1);
        let chunks = segments.div_ceil(chunk_cks).max(1);
        let config = if chunks > 1 { narrow } else { widened };
        // A chunk per block leaves phase A a few long serial walks (two chunks: one block per
        // 32 channels of a row); pieces of at least MIN_PIECE_CKS segments give it enough blocks.
        let divides = |split: usize| chunk_cks % split == 0;
        let mut carry_split = (1..=chunk_cks / MIN_PIECE_CKS)
            .filter(|&split| divides(split) && chunks * split <= MAX_CARRY_PIECES)
            .max()
            .unwrap_or(1);
        if let Some(forced) = tuning_hook(CARRY_SPLIT_ENV) {
            carry_split = (1..=forced.min(chunk_cks))
                .rev()
                .find(|&s| divides(s))
                .unwrap_or(1);
        }
        Ok(BackwardPlan {
            config,
            tiles: TilePlan::new(problem, &config, groups),
            chunks,
            chunk_cks,
            carry_split,
            carry_pieces: segments.div_ceil(chunk_cks / carry_split).max(1),
        })
    }
}

/// Backward blocks a multiprocessor holds at once: the kernels' `__launch_bounds__` minimum
/// (`FS_SEL_BWD_MIN_BLOCKS`: 3, or 2 with complex states), which their registers fill.
fn resident_backward_blocks(complex: bool) -> usize {
    if complex {
        2
    } else {
        3
    }
}

/// Least share of the last wave's block slots a grid must fill (see [`chunks_for_full_waves`]).
const WAVE_FILL: f64 = 0.9;

/// Time chunks for `row_blocks` blocks of whole rows on `slots` resident block slots, at most
/// `most` (then [`MAX_CHUNKS`]): 1 when the rows alone fill their waves, else the fewest chunks
/// whose blocks fill theirs (at least `WAVE_FILL` of the slots of every wave), else the count that
/// fills them best. A backward block is one long serial walk, so a wave's empty slots are lost for
/// its whole length. Measured on the H100 (forward+backward, N = 16, float32 / bfloat16):
/// (4,1536,8192) has 192 row blocks on 396 slots: 2 chunks 2.75 / 2.90 ms, 3 chunks (1.45
/// waves) 3.37 / 3.57 ms; (2,4096,4096) has 256: 1 chunk 1.974 / 2.074 ms, 2 chunks (1.29
/// waves) 2.25 / 2.45 ms, 3 chunks (1.94) 1.917 / 2.026 ms, 4 chunks 2.07 / 2.19 ms;
/// (8,1536,2048) has 384 (0.97 of a wave): 2 chunks 1.36 / 1.44 ms against 1.26 / 1.27 ms.
fn chunks_for_full_waves(row_blocks: usize, slots: usize, most: usize) -> usize {
    let fill = |chunks: usize| {
        let blocks = row_blocks * chunks;
        blocks as f64 / (blocks.div_ceil(slots) * slots) as f64
    };
    if fill(1) >= WAVE_FILL {
        return 1;
    }
    let counts = 1..=most.clamp(1, MAX_CHUNKS);
    counts
        .clone()
        .find(|&c| fill(c) >= WAVE_FILL)
        .unwrap_or_else(|| {
            // The fewest chunks among the fullest (ties: fewer carry passes).
            counts.fold(1, |best, c| if fill(c) > fill(best) { c } else { best })
        })
}

/// Below this many threads in the grid, [`SelectiveConfig::new`] uses twice the lanes per channel
/// (N <= 16 only). Measured on the H100 (N = 16, 2026-11-23): 8 lanes x 2 states beat 4 x 4 by
/// 1.3x (forward) and 1.4x (forward+backward) with 6144 channels (24576 threads at 4 lanes) but
/// lost by 1.1-1.2x with 8192 and 12288 channels; 16 lanes x 1 state lost everywhere, so there is
/// no such configuration. The backward of long enough rows cuts time into chunks instead (see
/// [`BackwardPlan`]).
const FILL_THREADS: usize = 1 << 15;

/// Tuning hook: lanes per channel to use when a configuration with that many lanes covers `N`
/// (e.g. `FERROSCAN_SELECTIVE_LANES=4`), for measuring the configurations against each other.
pub const LANES_ENV: &str = "FERROSCAN_SELECTIVE_LANES";

/// The builds of the kernel source for real or complex `A` (a module per configuration).
fn builds(complex: bool) -> &'static SelectiveBuilds {
    if complex {
        &SELECTIVE_COMPLEX
    } else {
        &SELECTIVE_REAL
    }
}

/// The configurations there are kernels for.
fn configs(complex: bool) -> Vec<SelectiveConfig> {
    builds(complex)
        .configs
        .iter()
        .map(|&(lanes, states)| SelectiveConfig { lanes, states })
        .collect()
}

/// The forward and backward modules of `config`.
fn sources(complex: bool, config: &SelectiveConfig) -> Result<(KernelSource, KernelSource)> {
    let builds = builds(complex);
    let at = builds
        .configs
        .iter()
        .position(|&c| c == (config.lanes, config.states))
        .ok_or_else(|| {
            Error::invalid(
                "dstate",
                format!(
                    "a configuration with kernels (got {} lanes x {} states)",
                    config.lanes, config.states
                ),
            )
        })?;
    Ok((builds.forward[at], builds.backward[at]))
}

/// Every selective scan source with the kernel names it must contain (for compile checks).
pub fn all_kernel_names() -> Vec<(KernelSource, Vec<String>)> {
    let mut out = Vec::new();
    for builds in [&SELECTIVE_REAL, &SELECTIVE_COMPLEX] {
        for (at, &(lanes, states)) in builds.configs.iter().enumerate() {
            let config = SelectiveConfig { lanes, states };
            out.push((builds.forward[at], vec![config.forward_kernel()]));
            out.push((
                builds.backward[at],
                vec![
                    config.backward_kernel(),
                    config.chunked_backward_kernel(),
                    config.carry_kernel(),
                    "selective_reduce_params".into(),
                    "selective_reduce_bc".into(),
                ],
            ));
        }
    }
    out
}

/// How the channels are cut into tiles of one block each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TilePlan {
    /// Channels per tile (at most `128 / P`; dividing the channels of every variable group).
    pub ct: usize,
    /// Tiles per batch element.
    pub tiles: usize,
}

impl TilePlan {
    /// The plan for `problem` with configuration `config` and the group counts of a variable
    /// `B` and `C` (`None` when constant).
    pub fn new(
        problem: &SelectiveProblem,
        config: &SelectiveConfig,
        groups: [Option<usize>; 2],
    ) -> Self {
        let most = THREADS / config.lanes;
        let span = problem.group_span(groups);
        let ct = if span == 0 {
            most
        } else {
            (1..=most.min(span))
                .rev()
                .find(|r| span % r == 0)
                .unwrap_or(1)
        };
        TilePlan {
            ct,
            tiles: problem.dim.div_ceil(ct),
        }
    }
}

/// Byte offsets of the backward's scratch regions: per-(batch, chunk, channel) parameter
/// partials, per-tile partials of a variable `B` and `C`, and with time chunks the
/// per-(batch, carry piece, channel) records of `selective_carry`.
#[derive(Clone, Copy, Debug)]
struct ScratchLayout {
    params: usize,
    part_b: Option<usize>,
    part_c: Option<usize>,
    carry: Option<usize>,
    total: usize,
}

impl ScratchLayout {
    fn new(
        dtype: DType,
        problem: &SelectiveProblem,
        plan: &BackwardPlan,
        groups: [Option<usize>; 2],
    ) -> Self {
        let acc = dtype.accumulator_bytes();
        let round = |n: usize| n.div_ceil(SCRATCH_ALIGN) * SCRATCH_ALIGN;
        let rows = problem.batch * plan.chunks * problem.dim;
        let params = round(rows * problem.param_slots() * acc);
        let per_var = round(
            problem.batch * plan.tiles.tiles * problem.dstate * problem.len * problem.parts() * acc,
        );
        let records = problem.batch * plan.carry_pieces * problem.dim;
        let carry = round(records * (problem.dstate * problem.parts() + 1) * acc);
        let mut total = params;
        let mut next = |present: bool, bytes: usize| {
            present.then(|| {
                let at = total;
                total += bytes;
                at
            })
        };
        let part_b = next(groups[0].is_some(), per_var);
        let part_c = next(groups[1].is_some(), per_var);
        let carry = next(plan.chunks > 1, carry);
        ScratchLayout {
            params: 0,
            part_b,
            part_c,
            carry,
            total,
        }
    }
}

fn groups_of<X, W>(b: &Bc<X, W>, c: &Bc<X, W>) -> [Option<usize>; 2] {
    [b.groups(), c.groups()]
}

/// Scratch bytes the backward of `problem` needs, with `groups` the group counts of a variable
/// `B` and `C` (`None` when constant). Pass a 256-byte aligned buffer at least this large.
pub fn selective_backward_scratch_bytes(
    device: &Device,
    dtype: DType,
    problem: &SelectiveProblem,
    groups: [Option<usize>; 2],
) -> Result<usize> {
    let plan = BackwardPlan::new(device.sm_count(), dtype, problem, groups)?;
    Ok(ScratchLayout::new(dtype, problem, &plan, groups).total)
}

fn strides<const R: usize>(s: [usize; R]) -> Result<[i64; R]> {
    let mut out = [0i64; R];
    for (o, v) in out.iter_mut().zip(s) {
        *o = i64::try_from(v).map_err(|_| Error::invalid("strides", "strides below 2^63"))?;
    }
    Ok(out)
}

fn seq_strides(seq: Option<&Seq<u64>>) -> Result<[i64; 3]> {
    seq.map_or(Ok([0; 3]), |s| strides(s.strides))
}

/// The parameter block shared by both passes: inputs, shape, tiles.
fn base_params(
    problem: &SelectiveProblem,
    x: &SelectiveInputs<u64, u64>,
    tiles: &TilePlan,
) -> Result<SelectiveParams> {
    // Empty tensors may sit at address 0; only non-empty ones are required.
    let required = |arg: &'static str, address: u64, numel: usize| {
        if numel > 0 {
            check_required(arg, address)
        } else {
            Ok(())
        }
    };
    required("u", x.u.data, problem.seq_numel())?;
    required("delta", x.delta.data, problem.seq_numel())?;
    required("A", x.a, problem.param_numel())?;
    let mut q = SelectiveParams {
        u: x.u.data,
        delta: x.delta.data,
        z: x.z.map_or(0, |z| z.data),
        a: x.a,
        d: x.d.unwrap_or(0),
        bias: x.delta_bias.unwrap_or(0),
        initial: x.initial.unwrap_or(0),
        batch: problem.batch as i64,
        dim: problem.dim as i64,
        len: problem.len as i64,
        dstate: problem.dstate as i64,
        n_ck: problem.checkpoint_count() as i64,
        u_s: strides(x.u.strides)?,
        delta_s: strides(x.delta.strides)?,
        z_s: seq_strides(x.z.as_ref())?,
        ct: tiles.ct as i64,
        tiles: tiles.tiles as i64,
        softplus: i32::from(problem.delta_softplus),
        ..SelectiveParams::default()
    };
    for (arg, bc, konst, var, st, groups) in [
        (
            "B",
            &x.b,
            &mut q.b_const,
            &mut q.b_var,
            &mut q.b_s,
            &mut q.b_groups,
        ),
        (
            "C",
            &x.c,
            &mut q.c_const,
            &mut q.c_var,
            &mut q.c_s,
            &mut q.c_groups,
        ),
    ] {
        match bc {
            Bc::Constant(address) => {
                required(arg, *address, problem.param_numel())?;
                *konst = *address;
            }
            Bc::Variable { tensor, groups: g } => {
                problem.check_groups(arg, *g)?;
                required(arg, tensor.data, problem.variable_numel(*g))?;
                *var = tensor.data;
                *st = strides(tensor.strides)?;
                *groups = *g as i64;
            }
        }
    }
    Ok(q)
}

/// Launches `name` of `source` with `params` on `blocks` blocks of `threads`.
///
/// # Safety
/// Every address in `params` must be valid for the shapes it describes, on `stream`.
unsafe fn launch<P: DeviceRepr>(
    device: &Device,
    stream: &CudaStream,
    (source, dtype, name): (KernelSource, DType, &str),
    params: &P,
    (blocks, threads): (usize, usize),
) -> Result<()> {
    if blocks == 0 {
        return Ok(());
    }
    let function = device.function(source, dtype, name)?;
    let cfg = LaunchConfig {
        grid_dim: (grid_blocks(blocks)?, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut builder = stream.launch_builder(&function);
    builder.arg(params);
    // SAFETY: the kernel reads and writes only the buffers in `params`, which the caller
    // guarantees are valid for the described shapes.
    unsafe { builder.launch(cfg) }.map_err(driver_error("launching a selective scan kernel"))?;
    Ok(())
}

/// Forward selective scan on raw device addresses (`0` = absent optional) with input element
/// type `dtype` (weights in its accumulator type), queued on `stream`. Writes `out`, and the last
/// state and the checkpoints when their addresses are given.
///
/// # Safety
/// Every non-zero address must point to device memory of `device` holding the tensor the
/// problem describes (inputs with their strides; outputs C-contiguous), alive until the stream has
/// run the kernels; outputs must not overlap inputs; `stream` must belong to `device`'s primary
/// context.
pub unsafe fn selective_scan_forward_raw(
    device: &Device,
    stream: &CudaStream,
    dtype: DType,
    problem: &SelectiveProblem,
    inputs: SelectiveInputs<u64, u64>,
    outputs: SelectiveOutputs<u64, u64>,
) -> Result<()> {
    let config = SelectiveConfig::new(dtype, problem)?;
    let groups = groups_of(&inputs.b, &inputs.c);
    let tiles = TilePlan::new(problem, &config, groups);
    let mut q = base_params(problem, &inputs, &tiles)?;
    if problem.seq_numel() > 0 {
        check_required("out", outputs.out)?;
    }
    q.out = outputs.out;
    q.last = outputs.last_state.unwrap_or(0);
    q.ckpt = outputs.checkpoints.unwrap_or(0);
    let (source, _) = sources(problem.complex, &config)?;
    let name = config.forward_kernel();
    // SAFETY: forwarded from the caller.
    unsafe {
        launch(
            device,
            stream,
            (source, dtype, &name),
            &q,
            (problem.batch * tiles.tiles, THREADS),
        )
    }
}

/// Backward selective scan on raw device addresses: every gradient from the forward's inputs,
/// its checkpoints and the gradients of `out` and the last state. `scratch` must hold
/// [`selective_backward_scratch_bytes`] bytes, 256-byte aligned.
///
/// # Safety
/// As for [`selective_scan_forward_raw`]; gradient outputs are C-contiguous.
#[allow(clippy::too_many_arguments)] // the pass's inputs, gradients, outputs and scratch
pub unsafe fn selective_scan_backward_raw(
    device: &Device,
    stream: &CudaStream,
    dtype: DType,
    problem: &SelectiveProblem,
    inputs: SelectiveInputs<u64, u64>,
    grads: SelectiveGradInputs<u64, u64>,
    outputs: SelectiveGradOutputs<u64, u64>,
    (scratch, scratch_bytes): (u64, usize),
) -> Result<()> {
    let groups = groups_of(&inputs.b, &inputs.c);
    let plan = BackwardPlan::new(device.sm_count(), dtype, problem, groups)?;
    let layout = ScratchLayout::new(dtype, problem, &plan, groups);
    if layout.total > 0
        && (scratch == 0 || scratch_bytes < layout.total || scratch % SCRATCH_ALIGN as u64 != 0)
    {
        return Err(Error::invalid(
            "scratch",
            format!(
                "a {SCRATCH_ALIGN}-byte aligned device buffer of at least {} bytes \
                 (selective_backward_scratch_bytes), got {scratch_bytes} bytes at {scratch:#x}",
                layout.total
            ),
        ));
    }
    let mut q = base_params(problem, &inputs, &plan.tiles)?;
    let rows_present = problem.batch * problem.dim > 0;
    if rows_present && problem.len > 0 {
        for (arg, address) in [
            ("grad_out", grads.grad_out.data),
            ("checkpoints", grads.checkpoints),
            ("grad_u", outputs.u),
            ("grad_delta", outputs.delta),
        ] {
            check_required(arg, address)?;
        }
    }
    if problem.param_numel() > 0 {
        check_required("grad_A", outputs.a)?;
    }
    let optional = [
        ("grad_D", inputs.d.is_some(), outputs.d),
        ("grad_z", inputs.z.is_some(), outputs.z),
        (
            "grad_delta_bias",
            inputs.delta_bias.is_some(),
            outputs.delta_bias,
        ),
        ("grad_initial", inputs.initial.is_some(), outputs.initial),
    ];
    for (arg, present, grad) in optional {
        if grad.is_some() && !present {
            return Err(Error::invalid(
                arg,
                "no gradient buffer: the matching input is absent",
            ));
        }
    }
    let grad_bc =
        |arg: &'static str, input: &Bc<u64, u64>, grad: &BcGrad<u64, u64>| match (input, grad) {
            (Bc::Constant(_), BcGrad::Constant(a)) => {
                let need = problem.param_numel() > 0;
                (if need {
                    check_required(arg, *a)
                } else {
                    Ok(())
                })
                .map(|_| (*a, 0))
            }
            (Bc::Variable { groups, .. }, BcGrad::Variable(a)) => {
                let need = problem.variable_numel(*groups) > 0;
                (if need {
                    check_required(arg, *a)
                } else {
                    Ok(())
                })
                .map(|_| (0, *a))
            }
            _ => Err(Error::invalid(
                arg,
                "a gradient of the same kind (constant or variable) as the input",
            )),
        };
    let (db_const, db_var) = grad_bc("grad_B", &inputs.b, &outputs.b)?;
    let (dc_const, dc_var) = grad_bc("grad_C", &inputs.c, &outputs.c)?;

    q.dout = grads.grad_out.data;
    q.dout_s = strides(grads.grad_out.strides)?;
    q.grad_last = grads.grad_last.unwrap_or(0);
    q.ckpt = grads.checkpoints;
    q.du = outputs.u;
    q.ddelta = outputs.delta;
    q.dz = outputs.z.unwrap_or(0);
    q.dinitial = outputs.initial.unwrap_or(0);
    q.part_params = scratch + layout.params as u64;
    q.part_b = layout.part_b.map_or(0, |at| scratch + at as u64);
    q.part_c = layout.part_c.map_or(0, |at| scratch + at as u64);
    q.part_carry = layout.carry.map_or(0, |at| scratch + at as u64);
    q.chunks = plan.chunks as i64;
    q.chunk_cks = plan.chunk_cks as i64;
    q.carry_split = plan.carry_split as i32;
    q.carry_pieces = plan.carry_pieces as i64;

    let (_, source) = sources(problem.complex, &plan.config)?;
    let row_blocks = problem.batch * plan.tiles.tiles;
    if plan.chunks > 1 {
        // SAFETY: forwarded from the caller; the scratch regions lie inside the checked buffer.
        unsafe {
            launch(
                device,
                stream,
                (source, dtype, &plan.config.carry_kernel()),
                &q,
                (row_blocks * (plan.carry_pieces - plan.carry_split), THREADS),
            )?;
        }
    }
    let name = if plan.chunks > 1 {
        plan.config.chunked_backward_kernel()
    } else {
        plan.config.backward_kernel()
    };
    // SAFETY: as above.
    unsafe {
        launch(
            device,
            stream,
            (source, dtype, &name),
            &q,
            (row_blocks * plan.chunks, THREADS),
        )?;
    }
    let reduce = SelectiveReduceParams {
        src: q.part_params,
        da: outputs.a,
        db: db_const,
        dc: dc_const,
        dd: outputs.d.unwrap_or(0),
        dbias: outputs.delta_bias.unwrap_or(0),
        batch: q.batch * q.chunks, // the partials of every (batch element, time chunk)
        dim: q.dim,
        len: q.len,
        dstate: q.dstate,
        tiles: q.tiles,
        ct: q.ct,
        ..SelectiveReduceParams::default()
    };
    let work = problem.dim * problem.param_slots();
    // SAFETY: as above.
    unsafe {
        launch(
            device,
            stream,
            (source, dtype, "selective_reduce_params"),
            &reduce,
            (work.div_ceil(REDUCE_THREADS), REDUCE_THREADS),
        )?;
    }
    for (src, dvar, g) in [(q.part_b, db_var, groups[0]), (q.part_c, dc_var, groups[1])] {
        let Some(g) = g else { continue };
        let params = SelectiveReduceParams {
            src,
            dvar,
            groups: g as i64,
            batch: q.batch,
            ..reduce
        };
        let work = problem.variable_numel(g).div_ceil(REDUCE_BC_RUN);
        // SAFETY: as above.
        unsafe {
            launch(
                device,
                stream,
                (source, dtype, "selective_reduce_bc"),
                &params,
                (work.div_ceil(REDUCE_THREADS), REDUCE_THREADS),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selective::CHECKPOINT_STEPS;

    /// Multiprocessors of the H100 the plans were measured on.
    const SMS: usize = 132;

    fn problem(dim: usize, dstate: usize, complex: bool) -> SelectiveProblem {
        SelectiveProblem::new((2, dim, 100, dstate), complex, true).unwrap()
    }

    #[test]
    fn parameter_blocks_have_the_kernel_layout() {
        // `static_assert`s in kernels/selective_scan.cu pin the same sizes.
        assert_eq!(std::mem::size_of::<SelectiveParams>(), 456);
        assert_eq!(std::mem::size_of::<SelectiveReduceParams>(), 112);
        assert_eq!(std::mem::offset_of!(SelectiveParams, batch), 24 * 8);
        assert_eq!(
            std::mem::offset_of!(SelectiveParams, b_groups),
            24 * 8 + 8 * 8 + 20 * 8
        );
        assert_eq!(std::mem::offset_of!(SelectiveParams, softplus), 448);
    }

    #[test]
    fn configurations_cover_the_states() {
        for n in 1..=256 {
            let c = SelectiveConfig::new(DType::F32, &problem(8, n, false)).unwrap();
            assert!(c.lanes * c.states >= n && c.lanes <= 32, "N = {n}: {c:?}");
            assert!(configs(false).contains(&c));
        }
        for n in 1..=128 {
            let c = SelectiveConfig::new(DType::BF16, &problem(8, n, true)).unwrap();
            assert!(c.lanes * c.states >= n && configs(true).contains(&c));
        }
        let err = SelectiveConfig::new(DType::F32, &problem(8, 257, false)).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { arg: "dstate", .. }));
        let err = SelectiveConfig::new(DType::F64, &problem(8, 65, true)).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { arg: "dstate", .. }));
    }

    #[test]
    fn kernel_source_lists_the_same_configurations() {
        // What the kernel file compiles without FS_SEL_CONFIGS (scripts, the CPU emulation) is
        // what the launcher has modules for.
        let text = include_str!("../../kernels/selective_scan.cu");
        for (complex, builds) in [(false, &SELECTIVE_REAL), (true, &SELECTIVE_COMPLEX)] {
            let listed: String = builds
                .configs
                .iter()
                .map(|(p, s)| format!("X({p}, {s})"))
                .collect::<Vec<_>>()
                .join(" ");
            let line = format!("#define FS_SEL_CONFIGS(X) {listed}\n");
            assert!(
                text.contains(&line),
                "complex {complex}: {line:?} not in the source"
            );
        }
        for (source, names) in all_kernel_names() {
            assert!(source.text.contains("#define FS_SEL_CONFIGS(X) X("));
            assert!(source
                .file
                .contains(&names[0][names[0].find("_p").unwrap()..]));
        }
    }

    #[test]
    fn few_channels_spread_states_over_more_lanes() {
        let config = |batch, dim| {
            let p = SelectiveProblem::new((batch, dim, 100, 16), false, true).unwrap();
            let c = SelectiveConfig::new(DType::F32, &p).unwrap();
            (c.lanes, c.states)
        };
        assert_eq!(config(2, 4096), (4, 4)); // 8192 channels x 4 lanes: enough threads
        assert_eq!(config(4, 1536), (8, 2)); // 6144 channels x 4 lanes: too few
        assert_eq!(config(1, 64), (8, 2)); // no configuration wider than 8 x 2
        let p = SelectiveProblem::new((1, 64, 100, 64), false, true).unwrap();
        let c = SelectiveConfig::new(DType::F32, &p).unwrap();
        assert_eq!(
            (c.lanes, c.states),
            (16, 4),
            "no wider configuration for N = 64"
        );
    }

    /// The float32 backward plan of Mamba's case (N = 16, variable B and C in one group).
    fn mamba_backward_plan(batch: usize, dim: usize, len: usize) -> BackwardPlan {
        let p = SelectiveProblem::new((batch, dim, len, 16), false, true).unwrap();
        BackwardPlan::new(SMS, DType::F32, &p, [Some(1), Some(1)]).unwrap()
    }

    #[test]
    fn few_rows_cut_the_backward_into_time_chunks() {
        let plan = |batch, dim, len| {
            let b = mamba_backward_plan(batch, dim, len);
            (b.config.lanes, b.config.states, b.chunks, b.chunk_cks)
        };
        assert_eq!(plan(8, 1536, 2048), (4, 4, 1, 128)); // 384 row blocks: 0.97 of a wave
        assert_eq!(plan(4, 1536, 8192), (4, 4, 2, 256)); // 192: two chunks, 0.97 of a wave
        assert_eq!(plan(2, 4096, 4096), (4, 4, 3, 86)); // 256: 0.65 waves; two, 1.29; three, 1.94
        assert_eq!(
            plan(1, 64, 1 << 20),
            (4, 4, MAX_CHUNKS, (1 << 16) / MAX_CHUNKS)
        );
        assert_eq!(plan(1, 64, 1000), (4, 4, 3, 21)); // chunks of >= 256 steps: 3
        assert_eq!(plan(4, 1536, 300), (8, 2, 1, 19)); // too short: more lanes instead
                                                       // The last chunk is the short one; none is empty.
        let (_, _, chunks, cks) = plan(1, 64, 1000);
        let segments = 1000usize.div_ceil(CHECKPOINT_STEPS);
        assert!((chunks - 1) * cks < segments && chunks * cks >= segments);
    }

    #[test]
    fn chunks_fill_whole_waves() {
        assert_eq!(chunks_for_full_waves(384, 396, 8), 1);
        assert_eq!(chunks_for_full_waves(192, 396, 32), 2);
        assert_eq!(chunks_for_full_waves(256, 396, 16), 3);
        assert_eq!(
            chunks_for_full_waves(256, 396, 2),
            1,
            "no count fills better than one"
        );
        assert_eq!(
            chunks_for_full_waves(2, 396, 3),
            3,
            "none fills: the fullest"
        );
        assert_eq!(chunks_for_full_waves(2, 396, 1000), MAX_CHUNKS);
        assert_eq!(
            chunks_for_full_waves(5000, 396, 16),
            1,
            "many waves: nothing to gain"
        );
    }

    #[test]
    fn phase_a_walks_pieces_that_end_on_chunk_ends() {
        let plan = |batch, dim, len| {
            let b = mamba_backward_plan(batch, dim, len);
            (b.chunks, b.chunk_cks, b.carry_split, b.carry_pieces)
        };
        // Two chunks of 256 segments: pieces of 16, 16 a chunk (32 in all, 16 after chunk 0).
        assert_eq!(plan(4, 1536, 8192), (2, 256, 16, 32));
        // 32 chunks of 2048 segments: two pieces each, MAX_CARRY_PIECES in all.
        assert_eq!(plan(1, 64, 1 << 20), (32, 2048, 2, MAX_CARRY_PIECES));
        // 21 segments a chunk: too few to split; the last chunk (and piece) is the short one.
        assert_eq!(plan(1, 64, 1000), (3, 21, 1, 3));
        // No chunks: one piece, which selective_carry never walks.
        assert_eq!(plan(8, 1536, 2048), (1, 128, 8, 8));
        for (batch, dim, len) in [
            (4, 1536, 8192),
            (1, 64, 1 << 20),
            (1, 64, 1000),
            (2, 4096, 4097),
        ] {
            let (chunks, cks, split, pieces) = plan(batch, dim, len);
            let segments = len.div_ceil(CHECKPOINT_STEPS);
            assert_eq!(cks % split, 0, "a chunk ends on a piece's end");
            assert!((pieces - 1) * (cks / split) < segments && pieces * (cks / split) >= segments);
            assert!(pieces > chunks * split - split && pieces <= MAX_CARRY_PIECES);
        }
    }

    #[test]
    fn tiles_stay_inside_groups() {
        let p = problem(1536, 16, false);
        let c = SelectiveConfig {
            lanes: 4,
            states: 4,
        };
        assert_eq!(
            TilePlan::new(&p, &c, [None, None]),
            TilePlan { ct: 32, tiles: 48 }
        );
        assert_eq!(
            TilePlan::new(&p, &c, [Some(1), Some(1)]),
            TilePlan { ct: 32, tiles: 48 }
        );
        let t = TilePlan::new(&p, &c, [Some(3), Some(8)]); // groups of 512 and 192 channels
        assert_eq!(t.ct, 32);
        let p = problem(100, 16, false);
        let t = TilePlan::new(&p, &c, [Some(4), None]); // groups of 25 channels
        assert_eq!((t.ct, t.tiles), (25, 4));
        let t = TilePlan::new(&p, &c, [None, None]);
        assert_eq!((t.ct, t.tiles), (32, 4)); // the last tile is partial
        let p = problem(7 * 33, 16, false);
        let t = TilePlan::new(&p, &c, [Some(7), None]); // groups of 33: 11 channels a tile
        assert_eq!((t.ct, 33 % t.ct), (11, 0));
    }

    #[test]
    fn scratch_regions_do_not_overlap() {
        let p = problem(64, 16, true);
        let groups = [Some(2), Some(1)];
        let plan = BackwardPlan::new(SMS, DType::BF16, &p, groups).unwrap();
        assert_eq!(plan.chunks, 1, "100 steps: too short for chunks");
        let l = ScratchLayout::new(DType::BF16, &p, &plan, groups);
        let bytes = l.total;
        let params = 2 * 64 * (3 * 16 * 2 + 2) * 4;
        let per_var = 2 * plan.tiles.tiles * 16 * 100 * 2 * 4;
        assert!(l.part_b.unwrap() >= params && l.part_c.unwrap() >= l.part_b.unwrap() + per_var);
        assert!(bytes >= l.part_c.unwrap() + per_var && l.carry.is_none());
        assert_eq!(l.part_b.unwrap() % SCRATCH_ALIGN, 0);
        // With time chunks: parameter partials per chunk, then a carry record per piece.
        let p = SelectiveProblem::new((6, 1024, 8192, 16), false, true).unwrap();
        let plan = BackwardPlan::new(SMS, DType::F32, &p, groups).unwrap();
        assert!(
            plan.chunks > 1 && plan.carry_pieces > plan.chunks,
            "{plan:?}"
        );
        let l = ScratchLayout::new(DType::F32, &p, &plan, groups);
        let rows = 6 * plan.chunks * 1024;
        let per_var = 6 * plan.tiles.tiles * 16 * 8192 * 4;
        assert!(l.part_b.unwrap() >= rows * (3 * 16 + 2) * 4);
        assert_eq!(l.carry.unwrap(), l.part_c.unwrap() + per_var);
        assert_eq!(
            l.total,
            l.carry.unwrap() + 6 * plan.carry_pieces * 1024 * 17 * 4
        );
    }
}
