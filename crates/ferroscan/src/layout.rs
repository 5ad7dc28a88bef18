//! Validated descriptions of a scan problem: element type, shape and time axis.
//!
//! Every backend sees a tensor as `(outer, len, inner)`, C-contiguous: `len` is the
//! time axis, `outer` the product of the dimensions before it and `inner` the product
//! of those after it. `(B, D, L)` with the time axis last is `(B·D, L, 1)`;
//! channels-last `(B, L, D)` is `(B, L, D)`. The state of one time step (the initial
//! and final states) is `(outer, inner)`.

use crate::error::{Error, Result};

/// Element types ferroscan reads and writes. Half types are storage only: every
/// backend accumulates them in `f32`; `f64` accumulates in `f64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
}

impl DType {
    /// All supported element types.
    pub const ALL: [DType; 4] = [DType::F16, DType::BF16, DType::F32, DType::F64];

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }

    /// Bytes per element of the accumulator type (`f64` for `f64`, else `f32`).
    pub fn accumulator_bytes(self) -> usize {
        match self {
            DType::F64 => 8,
            _ => 4,
        }
    }

    /// The short name used in kernel names and by the Python package.
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    /// Parses the names returned by [`DType::name`].
    pub fn parse(name: &str) -> Result<Self> {
        DType::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| {
                Error::invalid(
                    "dtype",
                    format!("one of float16, bfloat16, float32, float64, got {name:?}"),
                )
            })
    }
}

/// The shape of a scan problem as `(outer, len, inner)`; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScanShape {
    /// Product of the dimensions before the time axis.
    pub outer: usize,
    /// Length of the time axis.
    pub len: usize,
    /// Product of the dimensions after the time axis.
    pub inner: usize,
}

impl ScanShape {
    /// A shape whose element count fits in `usize` (and in `i64`, for device indexing).
    pub fn new(outer: usize, len: usize, inner: usize) -> Result<Self> {
        let numel = outer
            .checked_mul(len)
            .and_then(|n| n.checked_mul(inner))
            .filter(|&n| n <= i64::MAX as usize);
        match numel {
            Some(_) => Ok(ScanShape { outer, len, inner }),
            None => Err(Error::invalid(
                "shape",
                format!("an element count below 2^63, got {outer} x {len} x {inner}"),
            )),
        }
    }

    /// Collapses a tensor shape around its time axis `dim` (already normalized to
    /// `0..dims.len()`).
    pub fn from_dims(dims: &[usize], dim: usize) -> Result<Self> {
        if dim >= dims.len() {
            return Err(Error::invalid(
                "dim",
                format!(
                    "a time axis in 0..{} for a tensor of rank {}, got {dim}",
                    dims.len(),
                    dims.len()
                ),
            ));
        }
        let product = |ds: &[usize]| {
            ds.iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| Error::invalid("shape", "an element count below 2^63"))
        };
        ScanShape::new(
            product(&dims[..dim])?,
            dims[dim],
            product(&dims[dim + 1..])?,
        )
    }

    /// Elements of one full tensor (`outer · len · inner`).
    pub fn numel(&self) -> usize {
        self.outer * self.len * self.inner
    }

    /// Elements of one time step: the size of the initial and final states.
    pub fn state_numel(&self) -> usize {
        self.outer * self.inner
    }

    /// Checks that a buffer called `arg` holds exactly `expected` elements.
    pub fn check_len(arg: &'static str, got: usize, expected: usize) -> Result<()> {
        if got == expected {
            Ok(())
        } else {
            Err(Error::invalid(
                arg,
                format!("{expected} elements, got {got}"),
            ))
        }
    }
}

/// A first-order scan problem: shape and direction.
///
/// Forward: `h[t] = a[t]·h[t-1] + x[t]` with `h[-1] = h0`.
/// Reverse: `h[t] = a[t]·h[t+1] + x[t]` with `h[L] = h0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScanProblem {
    /// The `(outer, len, inner)` shape shared by gates, tokens and outputs.
    pub shape: ScanShape,
    /// Scan from the end of the time axis.
    pub reverse: bool,
}
