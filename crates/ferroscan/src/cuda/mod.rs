//! CUDA backend (stub while writing)
