"""Evaluate compressed checkpoints with lm-evaluation-harness: ``python -m hf_lowrank.cli.commands.lm_eval``.

Stock ``lm_eval`` never imports hf-lowrank, so transformers does not know ``quant_method: hf_lowrank`` there and
the checkpoint's guard tensors make ``from_pretrained`` fail with a size mismatch. This entry point imports
``hf_lowrank`` (which registers the checkpoint format) and then runs lm-eval's own command line in the same process,
so every lm-eval argument works unchanged::

    python -m hf_lowrank.cli.commands.lm_eval --model hf --model_args pretrained=./compressed \\
        --tasks hf_lowrank_wordnet --limit 100 --batch_size 8

It also puts hf-lowrank's bundled offline tasks on lm-eval's ``--include_path`` (unless one is given):

- ``hf_lowrank_wordnet_ppl``: ``loglikelihood_rolling`` perplexity on the held-out WordNet prose paragraphs
  (:func:`hf_lowrank.demo.wordnet.prose_texts`, ``"test"``); word/byte perplexity and bits per byte.
- ``hf_lowrank_wordnet_category``: ``multiple_choice``, which of six kinds of thing a gloss describes
  (:func:`hf_lowrank.demo.wordnet.category_task`; balanced, chance 1/6; few-shot examples from the train split).
  Zero-shot SmolLM2-135M scores at chance on it: a check that the pipeline runs, not a quality reading.
- ``hf_lowrank_wordnet_word``: ``multiple_choice``, which of four words a noun gloss defines
  (:func:`hf_lowrank.demo.wordnet.word_choice_task`; chance 1/4), the multiple-choice task that separates models.
- the tag ``hf_lowrank_wordnet`` runs all three.

The task YAMLs ship as templates (``hf_lowrank/data/lm_eval_tasks/*.yaml.in``): lm-eval resolves ``data_files``
against the working directory, so :func:`bundled_task_dir` writes the JSON Lines data and the YAMLs with absolute
paths into hf-lowrank's cache folder once and reuses it. From Python::

    import hf_lowrank
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from hf_lowrank.cli.commands.lm_eval import bundled_task_dir

    simple_evaluate(model="hf", model_args="pretrained=./compressed", tasks=["hf_lowrank_wordnet"],
                    task_manager=TaskManager(include_path=str(bundled_task_dir())))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

from ...demo import wordnet
from ...demo.models import cache_root

__all__ = ["BUNDLED_TASKS", "CATEGORY_CHOICES", "bundled_task_dir", "main"]

BUNDLED_TASKS: tuple[str, ...] = ("hf_lowrank_wordnet_ppl", "hf_lowrank_wordnet_category", "hf_lowrank_wordnet_word")
BUNDLED_TAG = "hf_lowrank_wordnet"
CATEGORY_CHOICES: tuple[str, ...] = ("animal", "plant", "food", "object", "person", "place")
"""Answer words of ``hf_lowrank_wordnet_category``, in the order of :data:`hf_lowrank.demo.wordnet.DEFAULT_CATEGORIES`."""

_FEWSHOT_POOL = 120  # train examples the few-shot sampler draws from (20 per class)
_WORD_FEWSHOT_POOL = 200  # train items of the word task's few-shot sampler
_DATA_VERSION = 2  # bump when the generated files change
_PLACEHOLDER = "@DATA_DIR@"
_DONE = "hf_lowrank_tasks.json"


def _templates() -> dict[str, str]:
    folder = resources.files("hf_lowrank") / "data" / "lm_eval_tasks"
    return {f"{name}.yaml": (folder / f"{name}.yaml.in").read_text(encoding="utf-8") for name in BUNDLED_TASKS}


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_data(folder: Path) -> None:
    if len(CATEGORY_CHOICES) != len(wordnet.DEFAULT_CATEGORIES):
        raise AssertionError("CATEGORY_CHOICES must name one answer per wordnet.DEFAULT_CATEGORIES entry")
    _write_jsonl(folder / "prose_test.jsonl", [{"text": t} for t in wordnet.prose_texts("test")])
    for split, n in (("train", _FEWSHOT_POOL), ("test", None)):
        texts, labels, _ = wordnet.category_task(split, n=n)
        _write_jsonl(folder / f"category_{split}.jsonl", [{"text": t, "label": y} for t, y in zip(texts, labels)])
    for split, n in (("train", _WORD_FEWSHOT_POOL), ("test", None)):
        texts, candidates, labels = wordnet.word_choice_task(split, n=n)
        _write_jsonl(folder / f"word_{split}.jsonl",
                     [{"text": t, "choices": c, "label": y} for t, c, y in zip(texts, candidates, labels)])


def bundled_task_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder of hf-lowrank's lm-eval tasks (YAMLs and data), ready to pass as lm-eval's ``include_path``.

    Written once per hf-lowrank version under ``root`` (default: :func:`hf_lowrank.demo.models.cache_root`
    ``/lm_eval_tasks``) into a new temporary folder that is renamed into place, so concurrent callers never see a
    half-written folder; later calls return the existing one.

    Args:
        root: parent folder of the rendered task folders.

    Returns:
        The folder holding the YAMLs of :data:`BUNDLED_TASKS` and their data.
    """
    from ... import __version__

    templates = _templates()
    digest = hashlib.sha256(json.dumps([__version__, _DATA_VERSION, templates], sort_keys=True).encode()).hexdigest()
    parent = Path(root) if root is not None else cache_root() / "lm_eval_tasks"
    target = parent / f"wordnet-{digest[:16]}"
    if (target / _DONE).is_file():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        _write_data(tmp)
        for name, text in templates.items():
            # A JSON string is a valid double-quoted YAML scalar; strip the quotes the template already has.
            quoted = json.dumps(str(target))[1:-1]
            (tmp / name).write_text(text.replace(_PLACEHOLDER, quoted), encoding="utf-8")
        (tmp / _DONE).write_text(json.dumps({"version": __version__, "data_version": _DATA_VERSION}), "utf-8")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first (or a stale, unfinished folder is in the way)
            if not (target / _DONE).is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _with_include_path(argv: list[str]) -> list[str]:
    """``argv`` plus ``--include_path <bundled tasks>`` where lm-eval takes one and the user gave none."""
    if not argv or argv[0] in ("-h", "--help"):
        return argv
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    if argv[0] in ("ls", "list", "validate") or argv[0] == "run" or argv[0].startswith("-"):
        return [*argv, "--include_path", str(bundled_task_dir())]
    return argv


def _requested_tasks(argv: Sequence[str]) -> list[str]:
    names: list[str] = []
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in ("--tasks", "-t") and i + 1 < len(argv) else None
        if arg.startswith("--tasks="):
            value = arg.split("=", 1)[1]
        if value is not None:
            names += [n.strip() for n in value.split(",") if n.strip()]
    return names


@contextlib.contextmanager
def _bundled_index_only(argv: Sequence[str]) -> Iterator[None]:
    """While lm-eval runs only bundled tasks, skip indexing its ~26k built-in task YAMLs (tens of seconds per run).

    The CLI has no switch for ``TaskManager(include_defaults=False)``; its config reads ``lm_eval.tasks.TaskManager``
    at call time, so a subclass with that default stands in for the duration of the call.
    """
    requested = _requested_tasks(argv)
    if not requested or not set(requested) <= {*BUNDLED_TASKS, BUNDLED_TAG}:
        yield
        return
    import lm_eval.tasks

    original = lm_eval.tasks.TaskManager

    class _BundledTaskManager(original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("include_defaults", False)
            super().__init__(*args, **kwargs)

    lm_eval.tasks.TaskManager = _BundledTaskManager
    try:
        yield
    finally:
        lm_eval.tasks.TaskManager = original


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's command line (``lm_eval ...``) with hf-lowrank imported and its bundled tasks included.

    Args:
        argv: lm-eval arguments (default ``sys.argv[1:]``), e.g. ``["--model", "hf", "--model_args",
            "pretrained=./compressed", "--tasks", "hf_lowrank_wordnet", "--limit", "50"]``.

    Returns:
        0 on success (lm-eval raises or exits on failure).
    """
    import hf_lowrank  # noqa: F401  (registers quant_method "hf_lowrank" with transformers)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "lm-evaluation-harness is not installed: pip install 'hf-lowrank[test]' (or pip install lm-eval)"
        ) from exc
    args = _with_include_path(list(sys.argv[1:] if argv is None else argv))
    saved = sys.argv
    sys.argv = ["lm-eval", *args]  # lm-eval's HarnessCLI reads sys.argv itself
    try:
        with _bundled_index_only(args):
            cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
