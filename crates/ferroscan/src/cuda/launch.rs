//! What every launcher shares: argument checks, the empty-time-axis state copy and grid sizing.

use cudarc::driver::{result as driver_result, CudaStream};

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
        return unsafe { zero_async(stream, dst, bytes) };
    }
    stream
        .context()
        .bind_to_thread()
        .map_err(driver_error("binding the context"))?;
    // SAFETY: guaranteed by the caller.
    unsafe { driver_result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
        .map_err(driver_error("copying the state of an empty scan"))
}

/// Zeroes `bytes` bytes at `dst` on the stream (asynchronously).
///
/// # Safety
/// `dst` must be a valid device buffer of `bytes` bytes on the stream's context.
pub(crate) unsafe fn zero_async(stream: &CudaStream, dst: u64, bytes: usize) -> Result<()> {
    stream
        .context()
        .bind_to_thread()
        .map_err(driver_error("binding the context"))?;
    // SAFETY: guaranteed by the caller.
    unsafe { driver_result::memset_d8_async(dst, 0, bytes, stream.cu_stream()) }
        .map_err(driver_error("zeroing device memory"))
}
