//! Checks shared by the launchers: required device addresses and grid sizes.

use crate::error::{Error, Result};

/// Errors unless a required device address is present (non-zero).
pub(crate) fn check_required(arg: &'static str, ptr: u64) -> Result<()> {
    if ptr == 0 {
        Err(Error::invalid(arg, "a device address, got null"))
    } else {
        Ok(())
    }
}

/// The x-dimension of a grid of `blocks` thread blocks (below 2^31, at least 1).
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
