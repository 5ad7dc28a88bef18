//! Arguments of the first-order scan, shared by every backend.
//!
//! Each struct is generic over how a buffer is passed: host slices (`&[T]` / `&mut [T]`) for the
//! CPU backend, `&CudaSlice<T>` / `&mut CudaSlice<T>` for the typed CUDA API, and raw device
//! addresses (`u64`) for the pointer-level CUDA API. Tensors are `(outer, len, inner)`, states
//! `(outer, inner)` (see [`crate::layout`]). An absent optional state means zeros (inputs) or
//! "not wanted" (outputs).

/// Inputs of the forward scan `h[t] = a[t]·h[t-1] + x[t]`.
#[derive(Clone, Copy, Debug)]
pub struct ScanInputs<B> {
    /// `a`.
    pub gates: B,
    /// `x`.
    pub tokens: B,
    /// `h0`.
    pub initial: Option<B>,
}

/// Outputs of the forward scan.
#[derive(Debug)]
pub struct ScanOutputs<B> {
    /// `h`.
    pub hidden: B,
    /// The state after the last step scanned.
    pub final_state: Option<B>,
}

/// Inputs of the backward scan.
#[derive(Clone, Copy, Debug)]
pub struct ScanGradInputs<B> {
    /// `a` as given to the forward.
    pub gates: B,
    /// `h` as returned by the forward.
    pub hidden: B,
    /// `h0` as given to the forward.
    pub initial: Option<B>,
    /// Gradient of the loss with respect to `h`.
    pub grad_hidden: B,
    /// Gradient with respect to the final state.
    pub grad_final: Option<B>,
}

/// Outputs of the backward scan.
#[derive(Debug)]
pub struct ScanGradOutputs<B> {
    /// Gradient with respect to `a`.
    pub grad_gates: B,
    /// Gradient with respect to `x`.
    pub grad_tokens: B,
    /// Gradient with respect to `h0`.
    pub grad_initial: Option<B>,
}
