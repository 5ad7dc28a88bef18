//! What every launcher shares: argument checks, the empty-time-axis state copy and grid sizing.

use cudarc::driver::{
    result as driver_result, sys as driver_sys, CudaFunction, CudaStream, DeviceRepr, LaunchConfig,
};

use super::device::driver_error;
use crate::error::{Error, Result};

/// `Err` naming `arg` when a required device address is null.
pub(crate) fn check_required(arg: &'static str, ptr: u64) -> Result<()> {
    if ptr == 0 {
        Err(Error::invalid(arg, "a device address, got null"))
    } else {
        Ok(())
    }
}

/// A one-dimensional grid of `blocks` blocks, or `Err` when the driver cannot launch that many.
pub(crate) fn grid_blocks(blocks: usize) -> Result<u32> {
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b < i32::MAX as u32)
        .map(|b| b.max(1))
        .ok_or_else(|| {
            Error::invalid(
                "shape",
                format!("fewer than 2^31 thread blocks of work, got {blocks}"),
            )
        })
}

/// Copies (or zeroes, when `src` is absent) one state buffer on the stream: what a scan over an
/// empty time axis does to its state (or to the state's gradient).
///
/// # Safety
/// `dst` and `src` must be valid device buffers of `bytes` bytes on the stream's context.
pub(crate) unsafe fn pass_state_through(
    stream: &CudaStream,
    dst: u64,
    src: u64,
    bytes: usize,
) -> Result<()> {
    if dst == 0 || bytes == 0 {
        return Ok(());
    }
    if src == 0 {
        // SAFETY: guaranteed by the caller.
        return unsafe { fill_async(stream, dst, bytes, 0) };
    }
    stream
        .context()
        .bind_to_thread()
        .map_err(driver_error("binding the context"))?;
    // SAFETY: guaranteed by the caller.
    unsafe { driver_result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
        .map_err(driver_error("copying the state of an empty scan"))
}

/// Sets `bytes` bytes at `dst` to `value` on the stream (asynchronously).
///
/// # Safety
/// `dst` must be a valid device buffer of `bytes` bytes on the stream's context.
pub(crate) unsafe fn fill_async(
    stream: &CudaStream,
    dst: u64,
    bytes: usize,
    value: u8,
) -> Result<()> {
    stream
        .context()
        .bind_to_thread()
        .map_err(driver_error("binding the context"))?;
    // SAFETY: guaranteed by the caller.
    unsafe { driver_result::memset_d8_async(dst, value, bytes, stream.cu_stream()) }
        .map_err(driver_error("filling device memory"))
}

/// Launches `function` with one by-value parameter in thread-block clusters of `cluster` blocks
/// along x (sm_90 and newer; cudarc's launch builder has no cluster attribute).
///
/// # Safety
/// `params` must be what the kernel takes, and every device address in it valid for what the
/// kernel does with it; `cfg.grid_dim.0` must be a multiple of `cluster`.
pub(crate) unsafe fn launch_clustered<P: DeviceRepr>(
    stream: &CudaStream,
    function: &CudaFunction,
    cfg: LaunchConfig,
    cluster: u32,
    params: &P,
) -> Result<()> {
    stream
        .context()
        .bind_to_thread()
        .map_err(driver_error("binding the context"))?;
    // SAFETY: an all-zero attribute is valid plain data (a union of integers); id and value set next.
    let mut attribute: driver_sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = driver_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attribute.value.clusterDim.x = cluster;
    attribute.value.clusterDim.y = 1;
    attribute.value.clusterDim.z = 1;
    let config = driver_sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: 1,
    };
    let mut arg = params as *const P as *mut std::ffi::c_void;
    // SAFETY: `config` and `arg` outlive the call (the driver copies the parameter); the rest is
    // guaranteed by the caller.
    unsafe {
        driver_sys::cuLaunchKernelEx(
            &config,
            function.cu_function(),
            &mut arg,
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(driver_error("launching a kernel in thread-block clusters"))
}

/// The number a tuning hook's environment variable holds (`None`: unset or not a number).
pub(super) fn tuning_hook(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}
