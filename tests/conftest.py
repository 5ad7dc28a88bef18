"""Shared pytest set-up: the devices every test runs on, and the ``cuda`` / ``large`` markers.

* ``DEVICES`` / the ``devices`` fixture: ``["cpu"]``, plus ``"cuda"`` when
  ``torch.cuda.is_available()``.
* The ``device`` fixture is parametrized over them; its CUDA case carries ``pytest.mark.cuda``,
  so ``-m "not cuda"`` leaves only CPU cases.
* Tests marked ``cuda`` are skipped without a CUDA device; tests marked ``large`` are skipped
  unless CUDA is there with at least ``LARGE_MIN_TOTAL_BYTES`` of memory (each such test also
  checks the free memory it needs before it allocates).
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()

#: The devices tests run on: the CPU always, CUDA where there is one.
DEVICES: list[str] = ["cpu"] + (["cuda"] if CUDA else [])

#: The least total GPU memory on which ``large`` tests are attempted at all.
LARGE_MIN_TOTAL_BYTES = 40 * 2**30


def _device_params() -> list:
    return [pytest.param(d, marks=[pytest.mark.cuda], id=d) if d == "cuda" else d for d in DEVICES]


@pytest.fixture(scope="session")
def devices() -> list[str]:
    """All devices available here (``["cpu"]`` or ``["cpu", "cuda"]``)."""
    return list(DEVICES)


@pytest.fixture(params=_device_params())
def device(request: pytest.FixtureRequest) -> str:
    """Each available device in turn; the CUDA case is marked ``cuda``."""
    return request.param


def _large_skip_reason() -> str | None:
    if not CUDA:
        return "large tests need a CUDA device"
    total = torch.cuda.get_device_properties(0).total_memory
    if total < LARGE_MIN_TOTAL_BYTES:
        need, have = LARGE_MIN_TOTAL_BYTES / 2**30, total / 2**30
        return f"large tests need >= {need:.0f} GiB of GPU memory, this GPU has {have:.1f} GiB"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    large_reason = None
    for item in items:
        if item.get_closest_marker("large") is not None:
            if large_reason is None:
                large_reason = _large_skip_reason() or ""
            if large_reason:
                item.add_marker(pytest.mark.skip(reason=large_reason))
        elif item.get_closest_marker("cuda") is not None and not CUDA:
            item.add_marker(no_cuda)
