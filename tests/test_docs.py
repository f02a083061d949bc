"""The documentation holds together: every relative link in README.md, docs/*.md, benchmarks/README.md and
CONTRIBUTING.md resolves to a file of the repository (and a ``#fragment`` to a heading of that file), every
``benchmarks/results/*.json`` the pages name exists, the README stays a two-minute read with its quick start first,
and the README's test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
RESULT_JSON = re.compile(r"(?:benchmarks/)?results/[\w.\-<>{}]+\.json")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (a link inside code is not a link)."""
    return FENCE.sub("", _text(page))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", _prose(page), re.M)}


def test_the_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    for required in ("README.md", "CONTRIBUTING.md", "benchmarks/README.md", "docs/compression.md", "docs/methods.md",
                     "docs/checkpoints.md", "docs/distributed.md", "docs/gpu.md", "docs/evaluation.md",
                     "docs/deploy.md"):
        assert required in names, f"{required} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z][a-z0-9+.\-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or ROOT not in file.parents and file != ROOT:
            broken.append(f"{target} (no file {file})")
        elif fragment and file.suffix == ".md" and fragment not in _anchors(file):
            broken.append(f"{target} (no heading #{fragment} in {file.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_result_files_exist(page):
    missing = []
    for name in set(RESULT_JSON.findall(_text(page))):
        if any(c in name for c in "<>{}"):  # a pattern such as results/compression_quality_<targets><keep>_defaults.json
            pattern = re.sub(r"(?:<[^>]*>|\{[^}]*\})+", "*", name.removeprefix("benchmarks/"))
            if not list((ROOT / "benchmarks").glob(pattern)):
                missing.append(name)
        elif not (ROOT / "benchmarks" / name.removeprefix("benchmarks/")).is_file():
            missing.append(name)
    assert not missing, f"{page.relative_to(ROOT)} names result files that do not exist: {sorted(missing)}"


def test_readme_is_short_and_starts_with_the_quick_start():
    text = _text(ROOT / "README.md")
    words = len(text.split())
    assert words < 2000, f"README.md has {words} words; move detail into docs/ (the limit is 2,000)"
    first_screen = "\n".join(text.splitlines()[:60])
    assert "compress_model(model, 0.8, calibration=batches)" in first_screen
    assert "make demo" in text and "make test" in text


def test_readme_test_command_is_what_ci_runs():
    makefile = _text(ROOT / "Makefile")
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = _text(ROOT / ".ci" / "run")
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call the README's test command, `make test`"
