"""Entry point: ``python -m ferroscan.bench <operation> [options]``."""

from __future__ import annotations

import importlib
import sys

#: Benchmark name -> module of this package with a ``main(argv) -> int``.
BENCHMARKS = {"scan": "scan", "gated": "gated", "selective": "selective", "distributed": "distributed"}


def main(argv: list[str]) -> int:
    names = ", ".join(BENCHMARKS)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + f"\n\noperations: {names}")
        return 0 if argv else 2
    op, rest = argv[0], argv[1:]
    if op not in BENCHMARKS:
        print(f"unknown benchmark {op!r}; operations: {names}", file=sys.stderr)
        return 2
    return importlib.import_module(f".{BENCHMARKS[op]}", __package__).main(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
