"""The README's commands are the ones the project runs: CI (``.ci/run``) runs the test command the
README gives, and the README documents both commands and every benchmark it quotes."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"^(bash scripts/test\.sh)\b", readme, re.MULTILINE)
    assert match, "README.md no longer gives the test command `bash scripts/test.sh`"
    runs_it = re.search(rf"^exec {re.escape(match.group(1))}\s*$", ci, re.MULTILINE)
    assert runs_it, ".ci/run must exec the README's test command"


def test_readme_documents_the_benchmarks_and_images_it_shows() -> None:
    readme = (ROOT / "README.md").read_text()
    for case_set in ("scan", "gated", "selective"):
        assert f"python -m ferroscan.bench {case_set}" in readme, case_set
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert images, "README.md shows no plots"
    for image in images:
        assert (ROOT / image).is_file(), image
