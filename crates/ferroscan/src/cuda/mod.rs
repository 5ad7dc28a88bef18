//! CUDA backend: device handles, NVRTC compilation with caches, and one launcher per operation.
//!
//! Builds without CUDA installed: the driver and NVRTC are opened at run time, and their absence
//! is an [`Error::CudaUnavailable`](crate::Error::CudaUnavailable) that says what to install.

pub mod compile;
mod device;
pub mod gated_scan;
mod launch;
pub mod scan;
pub mod selective_scan;

pub use device::{device, Device};
