"""``python -m ferroscan.bench distributed``: weak scaling of context parallelism (placeholder)."""

from __future__ import annotations


def comm_bytes(world: int, state_numel: int, elem_bytes: int) -> dict[str, int]:
    """Bytes each rank contributes to (``*_sent``) and receives from (``*_received``) the one
    ``all_gather`` of each pass: the stacked pair (P, E) forward, (B, grad of the final state)
    backward, each ``2 * state_numel`` elements of the transfer dtype."""
    payload = 2 * state_numel * elem_bytes
    return {
        "fwd_sent": payload,
        "fwd_received": (world - 1) * payload,
        "bwd_sent": payload,
        "bwd_received": (world - 1) * payload,
    }
