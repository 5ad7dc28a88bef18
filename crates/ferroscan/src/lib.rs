//! # ferroscan
//!
//! Linear recurrences ("parallel scans") on the CPU and on CUDA GPUs, forward and
//! backward. The first operation is the first-order scan
//! `h[t] = a[t]·h[t-1] + x[t]` along one axis of a tensor, with an optional initial
//! state, an optional final state, and a reverse direction.
//!
//! Tensors are described as `(outer, len, inner)` (see [`layout`]); gates, tokens
//! and outputs share that shape; states are `(outer, inner)`.
//!
//! ```
//! use ferroscan::cpu::scan::{scan_forward, ScanInputs, ScanOutputs};
//! use ferroscan::{ScanProblem, ScanShape};
//!
//! // Two sequences of length 4, time axis last: (outer = 2, len = 4, inner = 1).
//! let problem = ScanProblem { shape: ScanShape::new(2, 4, 1)?, reverse: false };
//! let gates = vec![0.5f32; 8];
//! let tokens = vec![1.0f32; 8];
//! let initial = [2.0f32, 0.0];
//! let mut hidden = vec![0.0f32; 8];
//! let mut last = [0.0f32; 2];
//! scan_forward(
//!     &problem,
//!     ScanInputs { gates: &gates, tokens: &tokens, initial: Some(&initial) },
//!     ScanOutputs { hidden: &mut hidden, final_state: Some(&mut last) },
//! )?;
//! assert_eq!(&hidden[..4], &[2.0, 2.0, 2.0, 2.0]);
//! assert_eq!(last, [2.0, 1.875]);
//! # Ok::<(), ferroscan::Error>(())
//! ```
//!
//! The second is Mamba's selective scan (S6): see [`selective`] for the recurrence and the
//! buffer layouts, [`cpu::selective_scan`] and [`cuda::selective_scan`] for the backends.
//!
//! The CUDA backend ([`cuda`]) runs the same operations on device memory: kernels
//! are compiled at run time by NVRTC for the device's exact architecture and cached.

pub mod args;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod layout;
pub mod selective;

pub use error::{Error, Result};
pub use layout::{DType, ScanProblem, ScanShape};
pub use selective::SelectiveProblem;
