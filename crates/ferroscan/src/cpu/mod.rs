//! CPU backend: one file per operation, generic over the element type, parallel with rayon.

mod chunked;
mod element;
mod fused;
pub mod scan;
pub mod selective_scan;

pub use element::{Accumulator, Element, Real};
pub use scan::{scan_backward, scan_forward};
pub use selective_scan::{selective_scan_backward, selective_scan_forward};
