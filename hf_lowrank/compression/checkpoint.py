"""Factorized checkpoints that round-trip through ``save_pretrained`` / ``from_pretrained``.

A compressed model's ``config.json`` carries ``quantization_config = {"quant_method": "hf_lowrank", "ranks":
{module: rank}, ...}``. hf-lowrank registers a transformers quantizer plugin for that method, which rebuilds the
``LowRankLinear`` modules on the meta device before the weights load. No ``trust_remote_code`` and nothing unusual in
the repo files, so the same checkpoint works from a local folder or the Hub, once ``hf_lowrank`` is imported.

Without the import, transformers only logs "Unknown quantization type" and loads random weights into dense
layers; :func:`load_compressed` (and the CLI) always import the plugin and also verify that every factor loaded.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..io import read_safetensors_header
from ..modules import LowRankLinear, is_conv1d, linear_shape, set_submodule

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "CompressedCheckpointError",
    "LowRankConfig",
    "LowRankHfQuantizer",
    "decompress_model",
    "load_compressed",
    "check_compressed_checkpoint",
    "check_safetensors_file",
    "mark_compressed",
    "save_compressed",
]

QUANT_METHOD = "hf_lowrank"
FORMAT_VERSION = 1


class CompressedCheckpointError(ValueError):
    """A factorized checkpoint is missing, truncated, inconsistent or from an incompatible format."""


class LowRankConfig(QuantizationConfigMixin):
    """``quantization_config`` of a factorized checkpoint.

    Args:
        ranks: ``{module_name: rank}`` of every ``LowRankLinear`` in the model.
        method: how the factors were obtained (``"svd"``, ``"fwsvd"``, ``"welore"``, ...), informational.
        format_version: version of this layout; a newer major version is refused with a clear message.
    """

    def __init__(
        self, ranks: dict[str, int] | None = None, method: str = "svd", format_version: int = FORMAT_VERSION, **kwargs
    ):
        self.quant_method = QUANT_METHOD
        self.ranks = _checked_ranks(ranks)
        if not isinstance(method, str):
            raise CompressedCheckpointError(
                f"quantization_config.method in config.json must be a string (e.g. 'svd'), got {method!r}: the "
                "config.json was edited or corrupted. Restore it from the original save."
            )
        self.method = method
        self.format_version = _checked_version(format_version)
        extra = kwargs.pop("extra", None)
        if extra is not None and not isinstance(extra, dict):
            raise CompressedCheckpointError(
                f"quantization_config.extra in config.json must be a JSON object ({{}} when empty), got {extra!r}: "
                "the config.json was edited or corrupted. Restore it from the original save (or set it to {})."
            )
        self.extra = dict(extra or {})
        if self.format_version > FORMAT_VERSION:
            raise CompressedCheckpointError(
                f"This checkpoint uses hf-lowrank format version {self.format_version}, newer than the version "
                f"{FORMAT_VERSION} this installation reads. Upgrade hf-lowrank (pip install -U hf-lowrank)."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "ranks": dict(self.ranks),
            "method": self.method,
            "format_version": self.format_version,
            "extra": dict(self.extra),
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _checked_ranks(ranks: Any) -> dict[str, int]:
    """``quantization_config.ranks`` as ``{module name: positive int}``, or a clear error naming what is wrong."""
    if ranks is None:
        return {}
    if not isinstance(ranks, dict):
        raise CompressedCheckpointError(
            f"quantization_config.ranks in config.json must be a JSON object {{module name: rank}}, got a "
            f"{type(ranks).__name__} ({str(ranks)[:80]}): the config.json was edited or corrupted. Restore it from "
            "the original save, or re-create the checkpoint with save_compressed."
        )
    out = {}
    for name, rank in ranks.items():
        if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
            rank = int(rank)  # a numpy integer; stored as a plain int so that config.json serialises
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise CompressedCheckpointError(
                f"Rank {rank!r} recorded for '{name}' in quantization_config.ranks is not a positive integer: the "
                "config.json was edited or corrupted. Restore it from the original save, or re-create the checkpoint."
            )
        out[str(name)] = rank
    return out


def _checked_version(version: Any) -> int:
    if isinstance(version, str) and version.isdecimal():
        version = int(version)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CompressedCheckpointError(
            f"quantization_config.format_version in config.json must be a positive integer (this hf-lowrank writes "
            f"{FORMAT_VERSION}), got {version!r}: the config.json was edited or corrupted. Restore it from the "
            "original save."
        )
    return version


def _resolve_name(model: nn.Module, name: str) -> str | None:
    """Map a recorded module name onto ``model`` (also when saved with / loaded without the task head wrapper)."""
    names = dict(model.named_modules())
    if name in names:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in names:
        return name[len(prefix) + 1 :]
    if prefix and f"{prefix}.{name}" in names:
        return f"{prefix}.{name}"
    return None


def _replace_with_factorized(model: nn.Module, ranks: dict[str, int]) -> None:
    for recorded, rank in ranks.items():
        name = _resolve_name(model, recorded)
        if name is None:
            raise CompressedCheckpointError(
                f"The checkpoint records a factorized module '{recorded}' that this model class does not have: it "
                "was saved from another architecture. Load it with the model class it was saved from."
            )
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            continue
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise CompressedCheckpointError(f"Module '{name}' is a {type(module).__name__}, not a Linear layer.")
        out_features, in_features = linear_shape(module)
        limit = min(in_features, out_features)
        if not 1 <= rank <= limit:
            raise CompressedCheckpointError(
                f"Rank {rank} recorded for '{name}' is out of bounds for its ({out_features}, "
                f"{in_features}) weight (must be in [1, {limit}]): config.json was edited or belongs to "
                "another model. Re-create the checkpoint."
            )
        device = module.weight.device
        dtype = module.weight.dtype
        new = LowRankLinear(in_features, out_features, rank, bias=module.bias is not None, device=device, dtype=dtype)
        set_submodule(model, name, new)


# ---- guard against stock transformers ------------------------------------------------------------------------
# A process that never imported hf_lowrank (or where it is not installed: a checkpoint downloaded from the Hub)
# skips the unknown quantization_config with a warning and builds the dense model. Without a guard the factors are
# unexpected keys and every factorized Linear keeps its random initialisation. So every save also writes, for each
# LowRankLinear, a one-element tensor under the dense name ``<module>.weight``: stock transformers finds its shape
# different from the dense ``(out, in)`` weight and raises (a size mismatch is an error unless
# ``ignore_mismatched_sizes=True``); its load report also lists ``STOCK_GUARD_KEY``, whose name says what to do. With
# hf_lowrank imported those names are not parameters of the rebuilt model (LowRankLinear has factors only) and are
# ignored. Nothing else in the layout changes, so earlier checkpoints still load.

STOCK_GUARD_KEY = "hf_lowrank_factorized_checkpoint.import_hf_lowrank_before_from_pretrained"
STOCK_GUARD_NOTE = "hf_lowrank factorized checkpoint: run `import hf_lowrank` before from_pretrained"


def _with_stock_guard(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear) and f"{name}.weight" not in state:
            factor = module.down.weight
            state[f"{name}.weight"] = torch.zeros(1, dtype=factor.dtype, device=factor.device)
    state[STOCK_GUARD_KEY] = torch.zeros(1)
    return state


def _ignore_stock_guard(model: nn.Module) -> None:
    import re

    names = [re.escape(n) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    patterns = {rf"(^|\.){re.escape(STOCK_GUARD_KEY)}$"}
    if names:
        patterns.add(rf"^(?:{'|'.join(names)})\.weight$")
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns


class LowRankHfQuantizer(HfQuantizer):
    """transformers quantizer plugin that rebuilds ``LowRankLinear`` modules before the weights load."""

    requires_calibration = False

    def __init__(self, quantization_config: LowRankConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs) -> None:
        return None

    def _process_model_before_weight_loading(self, model, **kwargs):
        _replace_with_factorized(model, self.quantization_config.ranks)
        _ignore_stock_guard(model)
        return model

    def get_state_dict_and_metadata(self, model):
        return _with_stock_guard(model), {"hf_lowrank": STOCK_GUARD_NOTE}

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        return decompress_model(model)


def _register() -> None:
    # Idempotent: transformers raises on a second registration of the same name.
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LowRankConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(LowRankConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LowRankHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(LowRankHfQuantizer)


_register()


def mark_compressed(model: nn.Module, ranks: dict[str, int], *, method: str = "svd", extra: dict | None = None) -> None:
    """Record ``ranks`` in ``model.config.quantization_config`` so ``save_pretrained`` writes a factorized checkpoint.

    Merges with ranks already recorded (a model compressed twice). A plain ``nn.Module`` without a transformers
    config is left alone.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    previous = getattr(model, "hf_quantizer", None)
    merged: dict[str, int] = {}
    if previous is not None and isinstance(previous.quantization_config, LowRankConfig):
        merged.update(previous.quantization_config.ranks)
    # Record every LowRankLinear actually present (names as in this model), so the map is always complete.
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            merged[name] = module.rank
    merged.update(ranks)
    if not merged:
        return
    qconfig = LowRankConfig(ranks=merged, method=method, extra=extra)
    config.quantization_config = qconfig
    model.hf_quantizer = LowRankHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def decompress_model(model: nn.Module) -> nn.Module:
    """Replace every ``LowRankLinear`` by a dense ``nn.Linear`` (``up @ down``) and drop the quantization config."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            set_submodule(model, name, module.to_dense())
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model


def _check_files(path: Path) -> None:
    if not path.exists():
        raise CompressedCheckpointError(f"No checkpoint at '{path}': the folder does not exist. Check the path.")
    if not (path / "config.json").is_file():
        raise CompressedCheckpointError(
            f"'{path}' has no config.json, so it is not a saved model. Save with model.save_pretrained('{path}')."
        )
    shards = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
    if not shards:
        raise CompressedCheckpointError(
            f"'{path}' has no *.safetensors weights (missing, or saved with pickle). Re-save with "
            "model.save_pretrained(path) (safetensors is the default)."
        )
    headers = {shard: check_safetensors_file(shard) for shard in shards}
    model_files = _check_index(path, headers)
    _check_factor_headers(path, {shard: headers[shard] for shard in model_files})


INDEX_NAME = "model.safetensors.index.json"


def _check_index(path: Path, headers: dict[Path, dict]) -> list[Path]:
    """The model's weight files: those the index names (each a plain file name in ``path`` whose header holds the
    tensors the index places there), else ``model.safetensors``, else every ``*.safetensors``."""
    from ..io import check_plain_name, read_json

    index_path = path / INDEX_NAME
    if not index_path.is_file():
        single = path / "model.safetensors"
        return [single] if single in headers else list(headers)
    index = read_json(index_path, what="weights index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CompressedCheckpointError(
            f"'{index_path}' has no 'weight_map' object {{tensor name: file name}}: it was edited or truncated. "
            "Restore it from the original save (or re-save the model)."
        )
    listed: dict[Path, set[str]] = {}
    for key, name in weight_map.items():
        check_plain_name(name, field=f"weight_map[{key!r}]", where=index_path, error=CompressedCheckpointError)
        listed.setdefault(path / name, set()).add(key)
    for shard, keys in listed.items():
        if shard not in headers:
            raise CompressedCheckpointError(
                f"'{index_path}' places tensors (e.g. '{min(keys)}') in '{shard.name}', which is not in '{path}': the "
                "download or copy is incomplete, or the index was edited. Copy every file of the save again."
            )
        stored = {k for k in headers[shard] if k != "__metadata__"}
        if keys - stored or stored - keys:
            odd = min(keys - stored) if keys - stored else min(stored - keys)
            raise CompressedCheckpointError(
                f"'{index_path}' and the header of '{shard.name}' disagree about '{odd}' (the index "
                f"{'places it there but the file lacks it' if odd in keys else 'does not list it'}): the index or "
                "the file was edited or comes from another save. Copy both from the same save_pretrained."
            )
    return sorted(listed)


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_PARTS = ("down", "up")


def _strip_first(name: str) -> str | None:
    return name.split(".", 1)[1] if "." in name else None


def _check_parameter_dtypes(headers: dict[Path, dict]) -> None:
    """Every ``*.weight`` / ``*.bias`` tensor must be stored as a float type.

    An integer dtype of the same width (``I32`` for ``F32``) passes the size checks, and transformers casts it to
    float on load: the model would come back with garbage weights and no error.
    """
    for shard, header in headers.items():
        for key, entry in header.items():
            if key == "__metadata__" or not key.endswith((".weight", ".bias")) or not isinstance(entry, dict):
                continue
            dtype = entry.get("dtype")
            if dtype not in _FLOAT_DTYPES:
                raise CompressedCheckpointError(
                    f"Tensor '{key}' in '{shard}' is stored as {dtype}, not a float type "
                    f"({', '.join(sorted(_FLOAT_DTYPES))}): loading would cast its bytes to float and give a different model. The file was altered or "
                    "written by another tool; copy it again from the original save, or re-save the model."
                )


def _check_factor_headers(path: Path, headers: dict[Path, dict]) -> None:
    """The rank map and the factor tensors must account for each other, and each factor must be a 2-D float tensor
    whose shared side is the recorded rank.

    A factor pair (``X.down.weight`` and ``X.up.weight``) that ``quantization_config.ranks`` does not record would be
    dropped as an unexpected key and ``X`` rebuilt dense with random weights; a recorded rank without its factors
    would leave a factorized module uninitialized. Both are refused, naming the module. Read from the safetensors
    headers alone (no tensor data), before transformers would silently cast an integer factor to float or stop at a
    size mismatch without saying which file is wrong. A recorded name may differ from the stored one by the task
    model's prefix (``model.``), as when a model is loaded with another head class.
    """
    from ..io import read_json

    _check_parameter_dtypes(headers)
    config = read_json(path / "config.json", what="model config")
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if quant is not None and not (isinstance(quant, dict) and isinstance(quant.get("quant_method"), str)):
        raise CompressedCheckpointError(
            f"quantization_config in '{path / 'config.json'}' is not an object with a 'quant_method' string (got "
            f"{str(quant)[:80]}): the config.json was edited or corrupted. Restore it from the original save."
        )
    if quant is None or quant.get("quant_method") != QUANT_METHOD:
        if any(STOCK_GUARD_KEY in header for header in headers.values()):  # else the size-mismatch guard fires
            raise CompressedCheckpointError(
                f"'{path}' holds factorized weights but its config.json has no hf_lowrank quantization_config, so "
                "they cannot be loaded. Restore config.json from the original save."
            )
        return
    ranks = LowRankConfig(**{k: v for k, v in quant.items() if k != "quant_method"}).ranks  # clear field errors
    where = {key: (shard, entry) for shard, header in headers.items() for key, entry in header.items()}
    parts: dict[str, set[str]] = {}
    for key in where:
        for part in _PARTS:
            if key.endswith(f".{part}.weight"):
                parts.setdefault(key[: -len(f".{part}.weight")], set()).add(part)
    short = {_strip_first(n) for n in ranks}
    stripped = {_strip_first(m): m for m in parts if _strip_first(m)}
    for module, found in sorted(parts.items()):
        if len(found) == 2 and not (module in ranks or _strip_first(module) in ranks or module in short):
            shard = where[f"{module}.down.weight"][0]
            raise CompressedCheckpointError(
                f"'{shard}' holds the factors of '{module}' ({module}.down.weight, {module}.up.weight) but "
                "quantization_config.ranks in config.json has no entry for it, so it would be rebuilt as a dense "
                "layer with random weights. Restore config.json from the same save as the weights (or re-save the "
                "compressed model with save_compressed)."
            )
    for name, rank in ranks.items():
        module = name if name in parts else _strip_first(name) if _strip_first(name) in parts else stripped.get(name)
        missing = [f"{name}.{p}.weight" for p in _PARTS if module is None or p not in parts[module]]
        if missing:
            raise CompressedCheckpointError(
                f"config.json records rank {rank} for '{name}' but the weights in '{path}' hold no "
                f"{' / '.join(missing)}: the weights and config.json come from different saves, or a file is "
                "missing. Copy all files of the same save_pretrained again, or re-save the compressed model."
            )
        for part, side in (("down", 0), ("up", 1)):
            shard, entry = where[f"{module}.{part}.weight"]
            dtype, shape = entry.get("dtype"), entry.get("shape")
            if dtype not in _FLOAT_DTYPES:
                raise CompressedCheckpointError(
                    f"Factor '{module}.{part}.weight' in '{shard}' is stored as {dtype}, not a float type "
                    f"({', '.join(sorted(_FLOAT_DTYPES))}): the file was altered or written by another tool. "
                    "Re-save the compressed model with save_pretrained."
                )
            if not isinstance(shape, list) or len(shape) != 2 or shape[side] != rank:
                raise CompressedCheckpointError(
                    f"Factor '{module}.{part}.weight' in '{shard}' has shape {shape}, but config.json records rank "
                    f"{rank} for '{name}' (the {'first' if side == 0 else 'second'} dimension of '{part}'): the "
                    "weights and config.json come from different saves. Copy both from the same save_pretrained."
                )


def check_compressed_checkpoint(path: str | os.PathLike) -> Path:
    """Every check :func:`load_compressed` runs before loading, on a local folder: config.json and the weights
    present, each safetensors file whole, the index naming plain files that hold what it lists, the rank map and
    the factor tensors accounting for each other, factor dtypes and shapes (the ``hf-lowrank inspect`` checks).

    Returns:
        The folder.

    Raises:
        CompressedCheckpointError: naming the file, the field or the module that is wrong, and the fix.
    """
    from ..io import recover_directory

    path = Path(path)
    recover_directory(path)
    _check_files(path)
    return path


def check_safetensors_file(shard: Path) -> dict:
    """Refuse a safetensors file whose header is unreadable or whose data is shorter than its header says.

    Returns:
        The file's header: ``{tensor name: {"dtype", "shape", "data_offsets"}}`` (plus ``__metadata__``).
    """
    tensors, metadata = read_safetensors_header(shard, error=CompressedCheckpointError)
    return {**tensors, "__metadata__": metadata} if metadata else tensors


def save_compressed(
    model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None, report: Any = None, **kwargs
) -> Path:
    """``model.save_pretrained(path)`` made crash-safe: everything is written to a temporary sibling folder first.

    The folder replaces ``path`` only once every file is complete, so a crash or kill mid-save leaves the previous
    checkpoint at ``path`` intact and loadable.

    Args:
        model: a transformers model (compressed or not).
        path: destination folder.
        tokenizer: optional tokenizer/processor saved beside the weights.
        report: optional :class:`~hf_lowrank.compression.compress.CompressionReport`, saved as
            ``compression_report.json``.
        **kwargs: passed to ``save_pretrained``.
    """
    from ..io import atomic_directory

    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.save(Path(tmp) / "compression_report.json")
        from ..model_card import write_model_card_for

        write_model_card_for(model, tmp, report)  # README.md, so that push_to_hub uploads a usable repo
    return Path(path)


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` (which is no local folder) reads as a Hub repo id, ``name`` or ``org/name``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or "\\" in name or os.path.isabs(name) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_snapshot(repo_id: str, kwargs: dict) -> Path:
    """The local folder of ``repo_id`` resolved as ``from_pretrained`` would (the cache, downloading what is missing
    unless offline), so that the checks run on the files that will load."""
    from huggingface_hub import constants, snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
            local_files_only=bool(kwargs.get("local_files_only")) or constants.HF_HUB_OFFLINE,
            allow_patterns=["*.json", "*.safetensors", "*.md", "*.txt", "*.model", "*.jinja"],
        )
    except (OSError, ValueError) as exc:
        raise CompressedCheckpointError(
            f"No checkpoint at '{repo_id}': it is not a local folder, and as a Hub repo id it could not be resolved "
            f"({type(exc).__name__}: {exc}). Check the path or the repo id (and the network, or HF_HUB_OFFLINE and "
            "the cache)."
        ) from exc
    folder = Path(folder)
    return folder / kwargs["subfolder"] if kwargs.get("subfolder") else folder


def load_compressed(path: str | os.PathLike, model_class: Any = None, **kwargs) -> nn.Module:
    """Load a factorized checkpoint with the plugin guaranteed active and every factor verified.

    Args:
        path: local folder (or Hub repo id) written by ``save_pretrained`` after compression.
        model_class: a transformers auto class or model class (default ``AutoModelForCausalLM``).
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).

    Raises:
        CompressedCheckpointError: missing/truncated files, or weights that did not load into the factors.
    """
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    local = Path(path)
    if local.exists() or not _is_hub_id(str(path)):
        check_compressed_checkpoint(local)
    else:
        _check_files(_hub_snapshot(str(path), kwargs))
    try:
        model, info = model_class.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except RuntimeError as exc:
        if "mismatched" not in str(exc) and "size mismatch" not in str(exc):
            raise
        raise CompressedCheckpointError(
            f"Tensors in '{path}' have shapes that its config.json does not give them (transformers logged which, "
            "above): the weights were edited, or config.json comes from another save. Copy all files of the same "
            "save_pretrained again."
        ) from exc
    missing = [k for k in info.get("missing_keys", []) if ".down." in k or ".up." in k]
    quant = getattr(model.config, "quantization_config", None)
    if quant is None or not isinstance(getattr(model, "hf_quantizer", None), LowRankHfQuantizer):
        factor_keys = [k for k in info.get("unexpected_keys", []) if k.endswith((".down.weight", ".up.weight"))]
        if factor_keys:
            raise CompressedCheckpointError(
                f"'{path}' holds factorized weights ({factor_keys[0]}, ...) but its config.json has no hf_lowrank "
                "quantization_config, so they were not loaded. Restore config.json from the original save."
            )
    if missing:
        raise CompressedCheckpointError(
            f"{len(missing)} factor weights of '{path}' are missing (e.g. {missing[0]}): the weights file does not "
            "match its config.json. Re-save the compressed model."
        )
    for name, param in model.named_parameters():
        if (".down." in name or ".up." in name) and not torch.isfinite(param).all():
            raise CompressedCheckpointError(f"Factor '{name}' in '{path}' contains NaN/inf values; re-create it.")
    return model
