"""Checks of a factorized checkpoint folder before it loads (the ``hf-lowrank inspect`` checks).

What :func:`~hf_lowrank.compression.checkpoint.load_compressed` refuses, read from ``config.json``, the index and the
safetensors headers alone (no tensor data): missing or truncated files, an index that disagrees with its files, a
rank map and factor tensors that do not account for each other, non-float parameters, edited
``quantization_config`` fields. The format's constants and its error live here too, so that
:mod:`hf_lowrank.compression.checkpoint` (the transformers plugin, save and load) imports this module and not the
other way round; both are re-exported there.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

from ..errors import CompressedCheckpointError
from ..io import check_plain_name, read_json, read_safetensors_header, recover_directory

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "STOCK_GUARD_KEY",
    "CompressedCheckpointError",
    "check_compressed_checkpoint",
    "check_safetensors_file",
    "checked_factor_quantization",
    "checked_fields",
]

QUANT_METHOD = "hf_lowrank"
FORMAT_VERSION = 2
"""The newest layout this installation reads. Version 2 adds ``factor_quantization`` (factors stored as group-wise
codes); a checkpoint without it is written as version 1, the layout every earlier release reads."""
FACTOR_CODE_FORMAT = "rtn-affine-v1"
"""The code layout of quantized factors: :func:`hf_lowrank.ops.quant.quantize_rtn` (packed little-endian bit stream,
fp16 scale and offset per group along the factor's last dimension)."""


# the key every save adds so that stock transformers refuses the checkpoint (see checkpoint.py, "guard against
# stock transformers"); a folder holding it but no hf_lowrank quantization_config lost its config.json
STOCK_GUARD_KEY = "hf_lowrank_factorized_checkpoint.import_hf_lowrank_before_from_pretrained"


def checked_fields(
    ranks: Any = None, method: Any = "svd", format_version: Any = FORMAT_VERSION, extra: Any = None, **_ignored: Any
) -> tuple[dict[str, int], str, int, dict]:
    """The fields of a ``quantization_config`` (:class:`~hf_lowrank.compression.checkpoint.LowRankConfig`) checked:
    ``(ranks, method, format_version, extra)``, or a :class:`CompressedCheckpointError` naming the field."""
    ranks = _checked_ranks(ranks)
    if not isinstance(method, str):
        raise CompressedCheckpointError(
            f"quantization_config.method in config.json must be a string (e.g. 'svd'), got {method!r}: the "
            "config.json was edited or corrupted. Restore it from the original save."
        )
    format_version = _checked_version(format_version)
    if extra is not None and not isinstance(extra, dict):
        raise CompressedCheckpointError(
            f"quantization_config.extra in config.json must be a JSON object ({{}} when empty), got {extra!r}: "
            "the config.json was edited or corrupted. Restore it from the original save (or set it to {})."
        )
    if format_version > FORMAT_VERSION:
        raise CompressedCheckpointError(
            f"This checkpoint uses hf-lowrank format version {format_version}, newer than the version "
            f"{FORMAT_VERSION} this installation reads. Upgrade hf-lowrank (pip install -U hf-lowrank)."
        )
    return ranks, method, format_version, dict(extra or {})


def checked_factor_quantization(value: Any, format_version: int = FORMAT_VERSION) -> dict | None:
    """``quantization_config.factor_quantization`` checked: ``None`` (float factors) or ``{"bits", "group_size",
    "scheme", "format"}``, or a :class:`CompressedCheckpointError` naming the field."""
    if value is None:
        return None
    fix = "the config.json was edited or corrupted. Restore it from the original save."
    if not isinstance(value, dict):
        raise CompressedCheckpointError(
            f"quantization_config.factor_quantization in config.json must be a JSON object {{bits, group_size, "
            f"scheme, format}} or absent, got {str(value)[:80]}: {fix}"
        )
    if format_version < 2:
        raise CompressedCheckpointError(
            f"quantization_config records factor_quantization with format_version {format_version}; quantized "
            f"factors are format version 2: {fix}"
        )
    bits, group_size = value.get("bits"), value.get("group_size")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise CompressedCheckpointError(
            f"quantization_config.factor_quantization.bits must be an integer in [2, 8], got {bits!r}: {fix}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise CompressedCheckpointError(
            f"quantization_config.factor_quantization.group_size must be a positive integer, got {group_size!r}: {fix}")
    fmt = value.get("format", FACTOR_CODE_FORMAT)
    if fmt != FACTOR_CODE_FORMAT:
        raise CompressedCheckpointError(
            f"quantization_config.factor_quantization.format is {fmt!r}; this hf-lowrank reads "
            f"{FACTOR_CODE_FORMAT!r}. Upgrade hf-lowrank (pip install -U hf-lowrank)."
        )
    scheme = value.get("scheme", "refit")
    if not isinstance(scheme, str):
        raise CompressedCheckpointError(
            f"quantization_config.factor_quantization.scheme must be a string, got {scheme!r}: {fix}")
    return {"bits": bits, "group_size": group_size, "scheme": scheme, "format": fmt}


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
    fields = checked_fields(**{k: v for k, v in quant.items() if k != "quant_method"})  # clear field errors
    ranks = fields[0]
    fq = checked_factor_quantization(quant.get("factor_quantization"), fields[2])
    stored = "packed" if fq else "weight"  # the tensor every factor has: its codes, or its float weight
    where = {key: (shard, entry) for shard, header in headers.items() for key, entry in header.items()}
    parts: dict[str, set[str]] = {}
    for key in where:
        for part in _PARTS:
            for kind in ("weight", "packed"):
                if key.endswith(f".{part}.{kind}"):
                    parts.setdefault(key[: -len(f".{part}.{kind}")], set()).add(part)
    short = {_strip_first(n) for n in ranks}
    stripped = {_strip_first(m): m for m in parts if _strip_first(m)}
    for module, found in sorted(parts.items()):
        if len(found) == 2 and not (module in ranks or _strip_first(module) in ranks or module in short):
            shard = where.get(f"{module}.down.weight", where.get(f"{module}.down.packed"))[0]
            raise CompressedCheckpointError(
                f"'{shard}' holds the factors of '{module}' ({module}.down.weight, {module}.up.weight) but "
                "quantization_config.ranks in config.json has no entry for it, so it would be rebuilt as a dense "
                "layer with random weights. Restore config.json from the same save as the weights (or re-save the "
                "compressed model with save_compressed)."
            )
    for name, rank in ranks.items():
        module = name if name in parts else _strip_first(name) if _strip_first(name) in parts else stripped.get(name)
        missing = [f"{name}.{p}.{stored}" for p in _PARTS if module is None or f"{module}.{p}.{stored}" not in where]
        if missing:
            raise CompressedCheckpointError(
                f"config.json records rank {rank} for '{name}' but the weights in '{path}' hold no "
                f"{' / '.join(missing)}: the weights and config.json come from different saves, or a file is "
                "missing. Copy all files of the same save_pretrained again, or re-save the compressed model."
            )
        if fq:
            _check_code_headers(module, name, rank, fq, where)
            continue
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


def _check_code_headers(module: str, name: str, rank: int, fq: dict, where: dict) -> None:
    """The codes of one quantized factor pair: ``packed`` uint8 of the size its scales and the rank imply,
    ``scales`` / ``offsets`` fp16 of shape ``(rows, groups)`` with the rank on the right side (``(rank, ...)`` for
    ``down``, ``(out, ceil(rank / group_size))`` for ``up``). A truncated or resized code tensor is refused here,
    naming it, before transformers would report a bare size mismatch."""
    bits, gs = fq["bits"], fq["group_size"]
    entries = {}
    for part in _PARTS:
        for kind in ("packed", "scales", "offsets"):
            key = f"{module}.{part}.{kind}"
            if key not in where:
                raise CompressedCheckpointError(
                    f"config.json records quantized factors for '{name}' but the weights hold no '{key}': a file is "
                    "missing or comes from another save. Copy all files of the same save_pretrained again."
                )
            entries[part, kind] = where[key]
    for part in _PARTS:
        scales = entries[part, "scales"][1].get("shape")
        for kind, dtype in (("scales", "F16"), ("offsets", "F16")):
            shard, entry = entries[part, kind]
            if entry.get("dtype") != dtype or entry.get("shape") != scales or not isinstance(scales, list) or len(
                    scales) != 2:
                raise CompressedCheckpointError(
                    f"'{module}.{part}.{kind}' in '{shard}' is {entry.get('dtype')} of shape {entry.get('shape')}, "
                    f"expected {dtype} of the shape of its scales {scales} (rows, groups): the file was altered. "
                    "Copy it again from the original save, or re-save the model."
                )
        rows, groups = scales
        if part == "down":
            ok, cols = rows == rank, None  # in_features: (groups - 1) * gs < in <= groups * gs
            sizes = [-(-rank * n * bits // 8) for n in ((groups - 1) * gs + 1, groups * gs)]
        else:
            ok, cols = groups == -(-rank // gs), rank
            sizes = [-(-rows * cols * bits // 8)] * 2
        shard, entry = entries[part, "packed"]
        shape = entry.get("shape")
        if not ok:
            raise CompressedCheckpointError(
                f"'{module}.{part}.scales' in '{shard}' has shape {scales}, which does not fit the rank {rank} "
                f"config.json records for '{name}' at group size {gs}: the weights and config.json come from "
                "different saves. Copy both from the same save_pretrained."
            )
        if entry.get("dtype") != "U8" or not isinstance(shape, list) or len(shape) != 1 or not (
                sizes[0] <= shape[0] <= sizes[1]):
            raise CompressedCheckpointError(
                f"The codes '{module}.{part}.packed' in '{shard}' are {entry.get('dtype')} of shape {shape}, but "
                f"{bits}-bit codes of this factor need U8 of {sizes[0]}"
                f"{'' if sizes[0] == sizes[1] else f' to {sizes[1]}'} bytes: the tensor was truncated or edited. "
                "Copy the checkpoint again from the original save, or re-save the model."
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
