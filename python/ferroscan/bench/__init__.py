"""Benchmarks of ferroscan against the memory roofline and its peers.

    python -m ferroscan.bench scan [--quick] [--dtypes float32 bfloat16] [--out DIR] [--no-peers]
    python -m ferroscan.bench scan --device cpu
    python -m ferroscan.bench gated [--dtypes float32 bfloat16] [--out DIR]             (CUDA)
    python -m ferroscan.bench distributed --ranks 1 2 4 8 [--op gated_scan] [--device cpu]
    python -m ferroscan.bench selective [--quick] [--dtypes float32 bfloat16] [--out DIR] [--no-peers]
    python -m ferroscan.bench selective --device cpu

Each case is timed in one process: ferroscan forward and forward+backward (through autograd),
the roofline (a plain PyTorch elementwise kernel moving the same bytes, measured right after),
and the peers that are importable (each in a child process, so a peer that faults is reported,
not fatal). Results: a printed markdown table, JSON, and PNG plots.

``distributed`` is the weak-scaling benchmark of :mod:`ferroscan.distributed` (per-rank length
fixed, 1..N ranks in spawned process groups; time and bytes communicated per rank).
"""
