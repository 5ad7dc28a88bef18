//! CPU backend: one file per operation, generic over the element type, parallel with rayon.

mod chunked;
mod element;
mod fused;
pub mod scan;

pub use element::{Accumulator, Element};
pub use scan::{scan_backward, scan_forward};
