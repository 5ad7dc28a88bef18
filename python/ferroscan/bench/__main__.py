"""Entry point: ``python -m ferroscan.bench <operation> [options]``."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\noperations: scan, selective")
        return 0 if argv else 2
    op, rest = argv[0], argv[1:]
    if op == "scan":
        from .scan import main as scan_main

        return scan_main(rest)
    if op == "selective":
        from .selective import main as selective_main

        return selective_main(rest)
    print(f"unknown benchmark {op!r}; operations: scan, selective", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
