"""ERE: store a fully fine-tuned model as a compressed residual over its base (seed 003, METHODS.md section 3).

For every 2-D weight with a counterpart in the base, the residual ``R = W_ft - W_base`` is encoded:

- Linear-like weights (everything 2-D that is not an ``nn.Embedding``): truncated SVD ``R ~= U diag(S) V^T`` with
  per-tensor ranks from the ERE budget allocation (:func:`hf_lowrank.ops.rank_allocation.ere_ranks`: log-linear fit
  of the tail energy, Lagrangian bisection, blend with the prior rank). ``U`` and ``V`` are stored round-to-nearest
  at ``bits`` bits with per-group fp16 scales and offsets (:func:`hf_lowrank.ops.quant.quantize_rtn`, groups of
  ``group_size`` consecutive entries of each singular vector), ``S`` in fp16. On decode the dequantized ``U`` and
  ``V`` are projected back onto the Stiefel manifold (polar factor) before ``W = W_base + U diag(S) V^T``.
- Embedding tables: a fine-tune only moves the rows of the tokens it saw, so the residual is row-sparse. It is
  stored as those rows (indices plus the rows, quantized like ``U``/``V``) or as a rank-``rank`` factorization,
  whichever takes fewer bytes (``embeddings="sparse"|"lowrank"`` forces one). Embeddings do not take part in the
  rank allocation (their ``out + in`` cost would dominate the budget); the low-rank fallback uses the prior rank.
- Stored exactly, in the fine-tuned dtype: tensors with no base counterpart (a new classifier head, a resized
  vocabulary: different shape), every tensor that is not 2-D (biases, norms), 2-D tensors with a side below 16
  (e.g. BERT's 2-row token-type table), 2-D weights outside ``target_modules`` when it is given, and anything named
  in ``store_exact``. Only tensors that changed are stored; when one small tensor of a module changed, all the
  module's small tensors are stored (a LayerNorm keeps weight and bias together), so the module can be exported
  whole to PEFT's ``modules_to_save``. Unchanged tensors are recorded as ``"base"`` and taken from the base.
- Tied weights (``lm_head`` tied to the input embedding) are encoded once; the other names are recorded as aliases.

``bits`` is 2..8 (quantized), 16 (factors kept unquantized in fp16) or 32 (unquantized fp32: lossless up to float
rounding at full rank). Our choices where the paper is silent: group size 64; the tail-energy fit range of
``ere_ranks`` (the first ``max(k/2, 2 r_avg)`` ranks; full spectra from float64 Gram eigenvalues); the blended ranks ``(1 - alpha) r_l + alpha r_avg`` are
rounded budget-aware (floor, then +1 by largest fraction while the budget ``M = r_avg sum(out + in)`` allows), so
the allocation never spends more than ``M``; the singular values are the SVD's, as in the paper (``refit=True``
replaces them by ``s_i = u_i^T R v_i`` for the quantized, projected factors: the least-squares optimum per matrix,
which lowers each matrix's Frobenius error slightly but did not improve the MiniLM benchmark's outputs, so it is
off by default).

Format (a folder; ``format_version`` 1): ``residual.safetensors`` (all tensors; its ``__metadata__`` repeats the
format version, ``bits``, ``group_size`` and a hash of the manifest's tensor table), ``residual_manifest.json``
(per-tensor kind, shape, dtype, rank; the base fingerprint; the sha256 and size of the weights file; written last),
``config.json`` (the fine-tuned model's config, to rebuild its architecture) and ``README.md`` (how to load). The
base fingerprint hashes, for every base tensor the residual relies on, its name, shape, dtype and 4096 values at
fixed strided positions; decoding against another base (or the same base in another dtype) refuses with a
:class:`BaseMismatchError` naming the tensors that differ. A truncated or edited weights file, an edited manifest
(e.g. ``bits``) or an unknown format version raise :class:`ResidualFormatError`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    check_plain_name,
    read_json,
    recover_directory,
)
from ..ops.quant import QuantizedTensor, dequantize_rtn, quantize_rtn, stiefel_project
from ..ops.rank_allocation import ere_ranks
from ..ops.svd import singular_values, truncated_svd

__all__ = [
    "BaseMismatchError",
    "EREResidual",
    "FORMAT_VERSION",
    "ResidualEntry",
    "ResidualError",
    "ResidualFormatError",
    "ResidualReport",
    "base_fingerprint",
    "decode_residual",
    "encode_residual",
    "export_residual_as_lora",
    "is_residual_dir",
    "load_residual",
    "save_residual_on_save",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "hf_lowrank.ere"
FORMAT_VERSION = 1
WEIGHTS_NAME = "residual.safetensors"
MANIFEST_NAME = "residual_manifest.json"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FINGERPRINT_ALGORITHM = "strided-sample-v1"
QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
UNQUANTIZED_BITS = (16, 32)
MIN_DIM = 16  # 2-D tensors with a side below this are stored exactly
_SAMPLES = 4096
_KINDS = ("lowrank", "sparse", "exact", "base", "alias")


class ResidualError(ValueError):
    """Base class of the ERE residual errors."""


class ResidualFormatError(ResidualError):
    """The residual folder is missing files, truncated, edited, or of an unknown format version."""


class BaseMismatchError(ResidualError):
    """The base model given for decoding is not the one the residual was encoded from."""


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ResidualFormatError(f"unknown dtype {name!r} in the residual manifest; it was edited. Re-encode.")
    return dtype


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _module_of(name: str) -> tuple[str, str]:
    """``"a.b.weight" -> ("a.b", "weight")``."""
    if "." in name:
        mod, leaf = name.rsplit(".", 1)
        return mod, leaf
    return "", name


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in QUANT_BITS + UNQUANTIZED_BITS:
        raise ValueError(
            f"bits must be 2..8 (round-to-nearest quantized factors), 16 (fp16 factors) or 32 (fp32 factors, "
            f"lossless at full rank), got {bits!r}. The ERE default is 4."
        )
    return bits


def _check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank (the prior rank r_avg) must be a positive integer, e.g. 32, got {rank!r}.")
    return rank


def _check_group_size(group_size: Any) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"group_size must be a positive integer (entries per quantization scale), got {group_size!r}."
        )
    return group_size


def _matches(module: str, patterns: str | Sequence[str] | None) -> bool:
    """peft-style module selection: a string is a regex (full match), a list holds names or name suffixes."""
    if patterns is None:
        return True
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module == p or module.endswith("." + p) for p in patterns)


def _name_matches(name: str, patterns: Sequence[str] | None) -> bool:
    if not patterns:
        return False
    mod, _ = _module_of(name)
    return any(name == p or mod == p or name.endswith("." + p) or mod.endswith("." + p) for p in patterns)


def _base_prefix(model: nn.Module) -> str:
    return str(getattr(model, "base_model_prefix", "") or "")


def _match_name(name: str, keys: Mapping[str, Any] | set, ft_prefix: str, base_prefix: str) -> str | None:
    """The base key holding ``name`` (a fine-tuned key) when the two models differ by a head/backbone prefix."""
    if name in keys:
        return name
    for prefix in {ft_prefix, base_prefix} - {""}:
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in keys:
            return name[len(prefix) + 1 :]
        if f"{prefix}.{name}" in keys:
            return f"{prefix}.{name}"
    return None


def _sample_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n > _SAMPLES:
        idx = torch.arange(_SAMPLES, dtype=torch.int64) * (n - 1) // (_SAMPLES - 1)
        flat = flat.index_select(0, idx.to(flat.device))
    flat = flat.cpu().contiguous()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _tensor_hash(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"{name}|{list(t.shape)}|{_dtype_name(t.dtype)}|".encode())
    h.update(_sample_bytes(t))
    return h.hexdigest()[:16]


def base_fingerprint(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Fingerprint of base tensors: per tensor a hash of its name, shape, dtype and 4096 strided values.

    Args:
        tensors: ``{name: tensor}`` of the base tensors a residual relies on (keyed by the fine-tuned names).

    Returns:
        ``{"algorithm", "samples_per_tensor", "sha256" (over all tensors), "tensors": {name: 16-hex hash}}``.
    """
    per = {name: _tensor_hash(name, tensors[name]) for name in sorted(tensors)}
    overall = hashlib.sha256("\n".join(f"{n} {h}" for n, h in per.items()).encode()).hexdigest()
    return {"algorithm": FINGERPRINT_ALGORITHM, "samples_per_tensor": _SAMPLES, "sha256": overall, "tensors": per}


def _checkpoint_keys(model: nn.Module) -> set[str] | None:
    """Keys of the safetensors checkpoint ``model`` was loaded from (header only), or None when unknown."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not path or not Path(str(path)).is_dir():
        return None
    folder = Path(str(path))
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return set(json.loads(index.read_text())["weight_map"])
        single = folder / "model.safetensors"
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), "pt") as fh:
                return set(fh.keys())
    except (OSError, ValueError, KeyError):
        return None
    return None


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without duplicates: ``(canonical tensors, {alias name: canonical name})`` (tied weights)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        if t.numel() and t.device.type != "meta":
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        tensors[name] = t
    return tensors, aliases


@torch.no_grad()
def _spectrum(R: torch.Tensor, name: str) -> torch.Tensor:
    """Singular values of ``R`` (descending) from the float64 Gram matrix of its smaller side.

    Several times faster than ``svdvals`` on CPU; in float64 the values are accurate far below the ``1e-12``
    relative tail energy the allocation fit uses. Falls back to :func:`hf_lowrank.ops.svd.singular_values`.
    """
    try:
        A = R.to(torch.float64)
        G = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
        ev = torch.linalg.eigvalsh(G)
        if bool(torch.isfinite(ev).all()):
            return ev.clamp_min(0).sqrt().flip(0).to(torch.float32 if R.dtype != torch.float64 else torch.float64)
    except RuntimeError:
        pass
    return singular_values(R, name=name)


def _params_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _quant_bytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Bytes of ``quantize_rtn`` on a ``(rows, cols)`` matrix (codes plus fp16 scale and offset per group)."""
    if bits in UNQUANTIZED_BITS:
        return rows * cols * bits // 8
    return -(-rows * cols * bits // 8) + rows * -(-cols // group_size) * 4


# ----------------------------------------------------------------------------------------------------------------
# report


@dataclass
class ResidualEntry:
    """How one fine-tuned tensor is stored.

    Attributes:
        name: state-dict name in the fine-tuned model.
        kind: ``"lowrank"``, ``"sparse"`` (row-sparse embedding), ``"exact"``, ``"base"`` (unchanged) or ``"alias"``.
        shape: tensor shape.
        rank: kept rank (``lowrank``), stored rows (``sparse``), else None.
        nbytes: bytes stored for it.
        rel_error: ``||R - R_hat|| / ||R||`` of the residual (``lowrank``/``sparse``; 0 for ``exact``).
        weight_rel_error: ``||R - R_hat|| / ||W_ft||``, the error relative to the fine-tuned weight.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int | None = None
    nbytes: int = 0
    rel_error: float | None = None
    weight_rel_error: float | None = None


@dataclass
class ResidualReport:
    """Summary of an encoding: per-tensor entries, allocation and sizes.

    Attributes:
        entries: one :class:`ResidualEntry` per fine-tuned state-dict name.
        bits, group_size, alpha, prior_rank: the encoding settings.
        budget: the allocation budget ``M = r_avg * sum(out + in)`` over the low-rank tensors (parameters).
        used: parameters of the allocated ranks, ``sum r_l (out_l + in_l)`` (``<= budget``).
        stored_bytes: bytes of the residual tensors (the weights file once saved, header included).
        finetuned_bytes: bytes of the fine-tuned model's unique state-dict tensors (its checkpoint size).
        seconds: encoding time.
        path: output folder when saved.
    """

    entries: list[ResidualEntry]
    bits: int
    group_size: int
    alpha: float
    prior_rank: int
    budget: float = 0.0
    used: int = 0
    stored_bytes: int = 0
    finetuned_bytes: int = 0
    seconds: float = 0.0
    path: str | None = None

    @property
    def ranks(self) -> dict[str, int]:
        """``{name: rank}`` of the low-rank entries."""
        return {e.name: int(e.rank or 0) for e in self.entries if e.kind == "lowrank"}

    @property
    def fraction(self) -> float:
        """Stored size as a fraction of the fine-tuned checkpoint."""
        return self.stored_bytes / self.finetuned_bytes if self.finetuned_bytes else float("nan")

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in _KINDS}
        for e in self.entries:
            out[e.kind] += 1
        return out

    def max_weight_error(self) -> float:
        errs = [e.weight_rel_error for e in self.entries if e.weight_rel_error is not None]
        return max(errs) if errs else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["entries"] = [asdict(e) for e in self.entries]
        d["fraction"] = self.fraction
        d["counts"] = self.counts()
        return d

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    def summary(self, *, per_tensor: bool = False) -> str:
        """A human-readable table: sizes, kinds, ranks and errors."""
        mb = 1024 * 1024
        lines = [
            f"ERE residual: bits={self.bits} group_size={self.group_size} prior rank={self.prior_rank} "
            f"alpha={self.alpha}",
            f"  stored {self.stored_bytes / mb:.3f} MiB = {100 * self.fraction:.2f}% of the fine-tuned checkpoint "
            f"({self.finetuned_bytes / mb:.2f} MiB); encoded in {self.seconds:.1f}s",
            "  tensors: " + ", ".join(f"{k} {v}" for k, v in self.counts().items() if v),
        ]
        if self.budget:
            lines.append(
                f"  rank budget {self.budget:.0f} params, used {self.used} ({100 * self.used / self.budget:.1f}%)"
            )
        low = [e for e in self.entries if e.kind in ("lowrank", "sparse")]
        if low:
            errs = [e.rel_error for e in low if e.rel_error is not None]
            werrs = [e.weight_rel_error for e in low if e.weight_rel_error is not None]
            ranks = [e.rank for e in self.entries if e.kind == "lowrank"]
            if ranks:
                lines.append(
                    f"  low-rank ranks: min {min(ranks)}, mean {sum(ranks) / len(ranks):.1f}, max {max(ranks)}"
                )
            lines.append(
                f"  residual rel. error: mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}; "
                f"error / ||W_ft||: max {max(werrs):.2e}"
            )
        if per_tensor:
            lines.append(f"\n{'tensor':<56} {'kind':>7} {'rank':>5} {'KiB':>9} {'rel.err':>8} {'err/|W|':>9}")
            for e in self.entries:
                if e.kind in ("base", "alias"):
                    continue
                rel = f"{e.rel_error:.4f}" if e.rel_error is not None else "-"
                wrel = f"{e.weight_rel_error:.2e}" if e.weight_rel_error is not None else "-"
                lines.append(
                    f"{e.name:<56} {e.kind:>7} {e.rank if e.rank is not None else '-':>5} "
                    f"{e.nbytes / 1024:>9.1f} {rel:>8} {wrel:>9}"
                )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# the residual object


def _spec_hash(manifest: Mapping[str, Any]) -> str:
    spec = {
        "format_version": manifest["format_version"],
        "bits": manifest["bits"],
        "group_size": manifest["group_size"],
        "tensors": manifest["tensors"],
        "fingerprint": manifest["base"]["fingerprint"]["sha256"],
    }
    weights = manifest.get("weights")
    name = weights.get("file", WEIGHTS_NAME) if isinstance(weights, dict) else WEIGHTS_NAME
    if name != WEIGHTS_NAME:  # (absent from the hash of residuals written under the one name this package uses)
        spec["weights_file"] = name
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _parse_header(data: bytes, path: Path) -> dict[str, Any]:
    """Check a safetensors byte string's header and data extent; return the header."""
    size = len(data)
    try:
        if size < 8:
            raise ValueError("shorter than the 8-byte header length")
        header_len = int.from_bytes(data[:8], "little")
        if header_len <= 0 or 8 + header_len > size:
            raise ValueError("header length past the end of the file")
        header = json.loads(data[8 : 8 + header_len])
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError) as exc:
        raise ResidualFormatError(
            f"The residual weights file '{path}' is unreadable ({exc}); it is truncated or corrupted. "
            "Copy it again or re-encode the residual."
        ) from exc
    if 8 + header_len + end > size:
        raise ResidualFormatError(
            f"The residual weights file '{path}' is truncated ({size} bytes, its header needs {8 + header_len + end}). "
            "Copy it again or re-encode the residual."
        )
    return header


class EREResidual:
    """An encoded residual: tensors, manifest and (optionally) the fine-tuned config.

    Create one with :func:`encode_residual`; :meth:`save` writes the folder, :meth:`load` reads and verifies one,
    :meth:`decode` rebuilds the fine-tuned model on a base.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        manifest: dict[str, Any],
        config: Any = None,
        report: ResidualReport | None = None,
        path: str | None = None,
    ):
        self.tensors = tensors
        self.manifest = manifest
        self.config = config
        self.report = report
        self.path = path

    # -- properties
    @property
    def bits(self) -> int:
        return int(self.manifest["bits"])

    @property
    def group_size(self) -> int:
        return int(self.manifest["group_size"])

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        return self.manifest["tensors"]

    @property
    def ranks(self) -> dict[str, int]:
        return {n: int(e["rank"]) for n, e in self.entries.items() if e["kind"] == "lowrank"}

    def nbytes(self) -> int:
        """Bytes of the stored tensors (without the safetensors header)."""
        return _params_bytes(self.tensors.values())

    def serialize(self) -> bytes:
        """The weights file's bytes (safetensors, with the format metadata)."""
        from safetensors.torch import save

        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "bits": str(self.bits),
            "group_size": str(self.group_size),
            "spec_sha256": _spec_hash(self.manifest),
        }
        return save({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, metadata=meta)

    # -- save / load
    def save(self, path: str | os.PathLike, *, card: bool = True) -> Path:
        """Write the residual folder (weights, config, card, then the manifest), swapped in as a whole.

        The files are written into a temporary sibling that replaces ``path`` only once complete
        (:func:`hf_lowrank.io.atomic_directory`), so re-encoding into the folder of an earlier residual and being
        killed midway leaves the earlier residual whole. Other entries of ``path`` that are not part of a model or a
        residual (sub-folders, a tokenizer) are carried over.

        Returns:
            The folder path.
        """
        path = Path(path)
        data = self.serialize()
        self.manifest["weights"] = {
            "file": WEIGHTS_NAME,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        with atomic_directory(path) as tmp:
            atomic_write_bytes(tmp / WEIGHTS_NAME, data)
            if self.config is not None:
                atomic_write_bytes(tmp / CONFIG_NAME, self.config.to_json_string(use_diff=False).encode())
            if card:
                atomic_write_bytes(tmp / CARD_NAME, _model_card(self).encode())
            atomic_write_json(tmp / MANIFEST_NAME, self.manifest)
        if self.report is not None:
            self.report.stored_bytes = len(data)
            self.report.path = str(path)
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EREResidual:
        """Read and verify a residual folder.

        Raises:
            ResidualFormatError: missing files, truncated or edited weights, an edited manifest (bits, group size,
                tensor table), an unknown format version.
        """
        path = Path(path)
        recover_directory(path)
        if not path.is_dir():
            raise ResidualFormatError(f"'{path}' is not a folder; pass the folder encode_residual(out=...) wrote.")
        mpath = path / MANIFEST_NAME
        if not mpath.is_file():
            raise ResidualFormatError(
                f"'{path}' holds no {MANIFEST_NAME}: it is not an ERE residual folder (or the save was interrupted "
                "before the manifest, which is written last). Re-encode it."
            )
        try:
            manifest = read_json(mpath, what="ERE residual manifest")
        except ValueError as exc:
            raise ResidualFormatError(str(exc)) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise ResidualFormatError(f"'{mpath}' is not an ERE residual manifest (format != {FORMAT_NAME!r}).")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ResidualFormatError(
                f"'{path}' has residual format_version {version!r}; this hf_lowrank reads version {FORMAT_VERSION}. "
                "Upgrade hf_lowrank (newer format) or re-encode the residual."
            )
        try:
            bits = _check_bits(manifest["bits"])
            _check_group_size(manifest["group_size"])
            weights = manifest["weights"]
            tensors_spec = manifest["tensors"]
            manifest["base"]["fingerprint"]["sha256"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ResidualFormatError(f"The manifest '{mpath}' is incomplete or edited ({exc}). Re-encode.") from exc
        if not isinstance(weights, dict) or not isinstance(tensors_spec, dict):
            field = "weights" if not isinstance(weights, dict) else "tensors"
            raise ResidualFormatError(
                f"The field '{field}' of '{mpath}' must be a JSON object, got {type(manifest[field]).__name__}: the "
                "manifest was edited or corrupted. Restore the original manifest or re-encode the residual."
            )
        name = check_plain_name(weights.get("file", WEIGHTS_NAME), field="weights.file", where=mpath,
                                error=ResidualFormatError)
        _architecture_class(manifest, mpath)
        wpath = path / name
        if not wpath.is_file():
            raise ResidualFormatError(f"The residual weights file '{wpath}' is missing. Copy it again or re-encode.")
        data = wpath.read_bytes()
        header = _parse_header(data, wpath)
        if len(data) != weights.get("bytes"):
            raise ResidualFormatError(
                f"The residual weights file '{wpath}' has {len(data)} bytes but the manifest recorded "
                f"{weights.get('bytes')}: it was truncated, extended or replaced. Copy it again or re-encode."
            )
        if hashlib.sha256(data).hexdigest() != weights.get("sha256"):
            raise ResidualFormatError(
                f"The residual weights file '{wpath}' does not match the sha256 in its manifest: it was edited or "
                "corrupted. Copy it again or re-encode."
            )
        meta = header.get("__metadata__") or {}
        for key, want in (("format_version", FORMAT_VERSION), ("bits", bits), ("group_size", manifest["group_size"])):
            if meta.get(key) != str(want):
                raise ResidualFormatError(
                    f"The manifest says {key}={want} but the weights file was written with {key}={meta.get(key)}: "
                    f"'{mpath}' was edited. Restore the original manifest or re-encode the residual."
                )
        if meta.get("spec_sha256") != _spec_hash(manifest):
            raise ResidualFormatError(
                f"The tensor table or fingerprint in '{mpath}' no longer matches the weights file: the manifest was "
                "edited. Restore the original manifest or re-encode the residual."
            )
        from safetensors.torch import load as st_load

        tensors = st_load(data)
        config = None
        if (path / CONFIG_NAME).is_file():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(path))
        residual = cls(tensors, manifest, config=config, path=str(path))
        residual._check_tensors(tensors_spec)
        return residual

    def _check_tensors(self, spec: Mapping[str, Mapping[str, Any]]) -> None:
        for name, e in spec.items():
            kind = e.get("kind")
            if kind not in _KINDS:
                raise ResidualFormatError(f"tensor '{name}' has unknown kind {kind!r} in the manifest. Re-encode.")
            needed = {
                "lowrank": (f"{name}:S",) if e.get("rank") else (),
                "sparse": (f"{name}:rows",),
                "exact": (f"{name}:exact",),
            }.get(kind, ())
            for key in needed:
                if key not in self.tensors:
                    raise ResidualFormatError(f"the weights file lacks '{key}' that the manifest lists. Re-encode.")
            parts = ("Ut", "Vh") if kind == "lowrank" and e.get("rank") else ("values",) if kind == "sparse" else ()
            for part in parts if e.get("quantized") else ():
                q = self._quantized(name, part)
                if q.bits != self.bits or q.group_size != self.group_size:
                    raise ResidualFormatError(
                        f"'{name}' was quantized with bits={q.bits}, group_size={q.group_size} but the manifest "
                        f"says bits={self.bits}, group_size={self.group_size}: the manifest was edited. Re-encode."
                    )

    def _quantized(self, name: str, part: str) -> QuantizedTensor:
        try:
            return QuantizedTensor.from_dict(self.tensors, prefix=f"{name}:{part}.")
        except ValueError as exc:
            raise ResidualFormatError(
                f"the quantized '{part}' of '{name}' is inconsistent ({exc}). Re-encode."
            ) from exc

    # -- decoding pieces
    def _dense(self, name: str, part: str, dtype: torch.dtype) -> torch.Tensor:
        e = self.entries[name]
        if e.get("quantized"):
            return dequantize_rtn(self._quantized(name, part), dtype)
        return self.tensors[f"{name}:{part}"].to(dtype)

    def factors(
        self, name: str, *, stiefel: bool = True, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoded factors of a ``lowrank`` tensor: ``(U (out, r), S (r,), Vh (r, in))``.

        With ``stiefel=True`` (the ERE decoder) the dequantized ``U`` and ``V`` are replaced by their polar factors.
        """
        e = self.entries[name]
        if e["kind"] != "lowrank":
            raise ValueError(f"'{name}' is stored as {e['kind']!r}, not 'lowrank'.")
        r = int(e["rank"])
        out_f, in_f = e["shape"]
        if r == 0:
            return torch.zeros(out_f, 0, dtype=dtype), torch.zeros(0, dtype=dtype), torch.zeros(0, in_f, dtype=dtype)
        U = self._dense(name, "Ut", dtype).T
        Vh = self._dense(name, "Vh", dtype)
        if stiefel and e.get("quantized"):
            U = stiefel_project(U).to(dtype)
            Vh = stiefel_project(Vh.T).to(dtype).T
        S = self.tensors[f"{name}:S"].to(dtype)
        return U.contiguous(), S, Vh.contiguous()

    def delta(self, name: str, *, stiefel: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded residual ``R_hat`` of a ``lowrank`` or ``sparse`` tensor, dense."""
        e = self.entries[name]
        if e["kind"] == "lowrank":
            U, S, Vh = self.factors(name, stiefel=stiefel, dtype=dtype)
            return (U * S) @ Vh
        if e["kind"] == "sparse":
            out = torch.zeros(tuple(e["shape"]), dtype=dtype)
            rows = self.tensors[f"{name}:rows"].long()
            if rows.numel():
                out[rows] = self._dense(name, "values", dtype)
            return out
        raise ValueError(f"'{name}' is stored as {e['kind']!r}; only lowrank and sparse tensors have a delta.")

    def decode(self, base_model: nn.Module, **kwargs) -> nn.Module:
        """Same as :func:`decode_residual` ``(base_model, self, **kwargs)``."""
        return decode_residual(base_model, self, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# encoding


def _encode_lowrank(
    R: torch.Tensor, rank: int, bits: int, group_size: int, refit: bool, name: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Factor, quantize and (optionally) refit one residual; returns the stored tensors and the decoded residual."""
    cdtype = R.dtype
    U, S, Vh = truncated_svd(R, rank, name=name)
    U, S, Vh = U.to(cdtype), S.to(cdtype), Vh.to(cdtype)
    stored: dict[str, torch.Tensor] = {}
    if bits in UNQUANTIZED_BITS:
        fdtype = torch.float16 if bits == 16 else torch.float32
        Ut_s, Vh_s = U.T.contiguous().to(fdtype), Vh.contiguous().to(fdtype)
        stored[f"{name}:Ut"], stored[f"{name}:Vh"] = Ut_s.cpu(), Vh_s.cpu()
        U_hat, Vh_hat = Ut_s.to(cdtype).T, Vh_s.to(cdtype)
    else:
        qU = quantize_rtn(U.T.contiguous(), bits, group_size=group_size)
        qV = quantize_rtn(Vh.contiguous(), bits, group_size=group_size)
        stored.update({k: v.cpu() for k, v in qU.to_dict(f"{name}:Ut.").items()})
        stored.update({k: v.cpu() for k, v in qV.to_dict(f"{name}:Vh.").items()})
        U_hat = stiefel_project(dequantize_rtn(qU, cdtype).T).to(cdtype)
        Vh_hat = stiefel_project(dequantize_rtn(qV, cdtype).T).to(cdtype).T
        if refit:
            # least-squares singular values for the factors the decoder will use (orthonormal columns)
            S = ((U_hat.T @ R) * Vh_hat).sum(dim=1)
    s_dtype = torch.float32 if bits == 32 else torch.float16
    if s_dtype == torch.float16 and float(S.abs().max()) >= 6.0e4:
        s_dtype = torch.float32  # outside the fp16 range
    S_s = S.to(s_dtype)
    stored[f"{name}:S"] = S_s.cpu()
    R_hat = (U_hat * S_s.to(cdtype)) @ Vh_hat
    return stored, R_hat


def _encode_rows(values: torch.Tensor, bits: int, group_size: int, prefix: str) -> dict[str, torch.Tensor]:
    if bits in UNQUANTIZED_BITS:
        return {prefix: values.to(torch.float16 if bits == 16 else torch.float32).cpu()}
    q = quantize_rtn(values.contiguous(), bits, group_size=group_size)
    return {k: v.cpu() for k, v in q.to_dict(prefix + ".").items()}


def _blend(
    alloc_relaxed: Mapping[str, float],
    caps: Mapping[str, int],
    costs: Mapping[str, int],
    r_avg: int,
    alpha: float,
    zero: set[str],
) -> dict[str, int]:
    """Budget-aware rounding of ``(1 - alpha) relaxed + alpha r_avg`` (never above ``M = r_avg sum(costs)``)."""
    budget = r_avg * sum(costs.values())
    target = {
        n: 0.0 if n in zero else (1 - alpha) * alloc_relaxed[n] + alpha * min(float(r_avg), caps[n]) for n in caps
    }
    ranks = {n: min(int(math.floor(x + 1e-9)), caps[n]) for n, x in target.items()}
    used = sum(ranks[n] * costs[n] for n in ranks)
    for n in sorted(ranks, key=lambda k: (-(target[k] - ranks[k]), k)):
        if target[n] - ranks[n] > 1e-9 and ranks[n] < caps[n] and used + costs[n] <= budget:
            ranks[n] += 1
            used += costs[n]
    return ranks


@torch.no_grad()
def encode_residual(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    rank: int = 32,
    bits: int = 4,
    alpha: float = 0.5,
    target_modules: str | Sequence[str] | None = None,
    *,
    group_size: int = 64,
    fit_range: tuple[float, float] | None = None,
    refit: bool = False,
    store_exact: Sequence[str] | None = None,
    embeddings: str = "auto",
    progress: bool = True,
    out: str | os.PathLike | None = None,
) -> EREResidual:
    """Encode ``finetuned_model`` as an ERE residual over ``base_model`` (scheme in the module docstring).

    Args:
        base_model: the model the fine-tune started from. Either the same architecture as the fine-tuned model
            or its backbone (e.g. ``AutoModel`` for a ``...ForSequenceClassification``): names are matched across a
            ``base_model_prefix``. If it was loaded ``from_pretrained`` from a local folder, tensors that are not in
            that checkpoint (a randomly initialized head) count as having no base counterpart.
        finetuned_model: the fully fine-tuned model (not modified).
        rank: prior rank ``r_avg``; the budget is ``M = r_avg * sum(out + in)`` over the low-rank tensors.
        bits: 2..8 (RTN-quantized ``U``, ``V``), 16 (fp16 factors) or 32 (fp32 factors).
        alpha: blend weight of the prior rank in ``[0, 1]`` (1: the same rank everywhere, 0: pure allocation).
        target_modules: module names/suffixes (list) or a regex (str) whose 2-D weights are low-rank encoded;
            changed 2-D weights of other modules are stored exactly. None: every 2-D weight.
        group_size: entries per quantization scale (along each singular vector).
        fit_range: optional ``(lo, hi)`` fractions of the spectrum for the tail-energy fit (see ``ere_ranks``).
        refit: refit the singular values to the quantized, projected factors (encoder-side; same format;
            off by default, see the module docstring).
        store_exact: tensor or module names/suffixes to store exactly whatever their shape.
        embeddings: how embedding residuals are stored: ``"auto"`` (row-sparse or rank-``rank``, whichever takes
            fewer bytes), ``"sparse"`` or ``"lowrank"``.
        progress: show tqdm bars.
        out: when given, the residual folder is written there (see :meth:`EREResidual.save`).

    Returns:
        :class:`EREResidual` (``.report`` is a :class:`ResidualReport`).
    """
    started = time.perf_counter()
    rank, bits, group_size = _check_rank(rank), _check_bits(bits), _check_group_size(group_size)
    if embeddings not in ("auto", "sparse", "lowrank"):
        raise ValueError(f"embeddings must be 'auto', 'sparse' or 'lowrank', got {embeddings!r}.")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must be in [0, 1] (the paper uses 0.5), got {alpha!r}.")
    if not isinstance(base_model, nn.Module) or not isinstance(finetuned_model, nn.Module):
        raise ValueError("encode_residual needs two torch modules: (base_model, finetuned_model).")

    ft, aliases = _unique_state(finetuned_model)
    base_sd = base_model.state_dict()
    ft_prefix, b_prefix = _base_prefix(finetuned_model), _base_prefix(base_model)
    ckpt = _checkpoint_keys(base_model)
    not_in_ckpt: set[str] = set()
    if ckpt is not None:
        missing = {k for k in base_sd if _match_name(k, ckpt, b_prefix, ft_prefix) is None}
        if len(missing) <= 0.5 * len(base_sd):
            not_in_ckpt = missing
        else:
            logger.warning("base checkpoint key names do not match the model's; not using them to spot new heads")
    modules = dict(finetuned_model.named_modules())
    quantized = bits not in UNQUANTIZED_BITS

    spec: dict[str, dict[str, Any]] = {}
    base_ref: dict[str, torch.Tensor] = {}
    lowrank: list[str] = []
    embeds: list[str] = []
    exact: set[str] = set()
    for name, t in ft.items():
        mod_name, _ = _module_of(name)
        module = modules.get(mod_name)
        entry: dict[str, Any] = {
            "shape": list(t.shape),
            "dtype": _dtype_name(t.dtype),
            "module": mod_name,
            "module_type": type(module).__name__ if module is not None else None,
        }
        spec[name] = entry
        bname = _match_name(name, base_sd, ft_prefix, b_prefix)
        b = base_sd.get(bname) if bname is not None else None
        if b is None or tuple(b.shape) != tuple(t.shape) or bname in not_in_ckpt or b.device.type == "meta":
            entry["kind"] = "exact"
            exact.add(name)
            continue
        entry["base_name"] = bname
        entry["base_dtype"] = _dtype_name(b.dtype)
        base_ref[name] = b
        same = torch.equal(t, b.to(device=t.device, dtype=t.dtype)) if t.dtype == b.dtype else False
        if not same and not (t.is_floating_point() and b.is_floating_point()):
            entry["kind"] = "exact"
            exact.add(name)
        elif same:
            entry["kind"] = "base"
        elif _name_matches(name, store_exact) or t.ndim != 2 or min(t.shape) < MIN_DIM:
            entry["kind"] = "exact"
            exact.add(name)
        elif isinstance(module, nn.Embedding):
            entry["kind"] = "embedding"
            embeds.append(name)
        elif not _matches(mod_name, target_modules):
            entry["kind"] = "exact"
            exact.add(name)
        else:
            entry["kind"] = "lowrank"
            lowrank.append(name)
    # a module whose small tensor changed keeps all its small tensors (so it can be exported as a whole module)
    small_mods = {spec[n]["module"] for n in exact if len(spec[n]["shape"]) != 2 or min(spec[n]["shape"]) < MIN_DIM}
    for name, entry in spec.items():
        if entry["kind"] == "base" and entry["module"] in small_mods and ft[name].is_floating_point():
            shp = entry["shape"]
            if len(shp) != 2 or min(shp) < MIN_DIM:
                entry["kind"] = "exact"
                exact.add(name)
    # tensors that no longer need the base are not part of its fingerprint
    for name in exact:
        base_ref.pop(name, None)

    def residual(name: str) -> torch.Tensor:
        t = ft[name]
        cd = _compute_dtype(t.dtype, base_ref[name].dtype)
        return t.to(cd) - base_ref[name].to(device=t.device, dtype=cd)

    # 1. spectra and allocation
    shapes = {n: tuple(ft[n].shape) for n in lowrank}
    spectra: dict[str, torch.Tensor] = {}
    for name in tqdm(lowrank, desc="ERE spectra", unit="tensor", disable=not progress):
        spectra[name] = _spectrum(residual(name), name).cpu()
    ranks: dict[str, int] = {}
    budget, alloc = 0.0, None
    if lowrank:
        alloc = ere_ranks(spectra, shapes, rank, alpha=alpha, fit_range=fit_range)
        zero = {n for n in lowrank if float(spectra[n].max()) == 0.0}
        costs = {n: sum(shapes[n]) for n in lowrank}
        ranks = _blend(alloc.relaxed, {n: len(spectra[n]) for n in lowrank}, costs, rank, alpha, zero)
        budget = float(alloc.budget)

    # 2. factors, quantization, errors
    tensors: dict[str, torch.Tensor] = {}
    entries: list[ResidualEntry] = []
    todo = lowrank + embeds + sorted(exact)
    bar = tqdm(todo, desc="ERE encode", unit="tensor", disable=not progress)
    for name in bar:
        entry = spec[name]
        t = ft[name]
        if name in exact:
            tensors[f"{name}:exact"] = t.detach().cpu().contiguous().clone()
            entries.append(
                ResidualEntry(
                    name,
                    "exact",
                    tuple(t.shape),
                    nbytes=t.numel() * t.element_size(),
                    rel_error=0.0,
                    weight_rel_error=0.0,
                )
            )
            continue
        R = residual(name)
        r_norm = float(torch.linalg.norm(R))
        w_norm = float(torch.linalg.norm(t.to(R.dtype))) or 1.0
        if name in embeds:
            rows = (R != 0).any(dim=1).nonzero().flatten()
            n_rows, (v_dim, d_dim) = rows.numel(), R.shape
            r_e = min(rank, v_dim, d_dim)
            sparse_bytes = n_rows * 8 + _quant_bytes(n_rows, d_dim, bits, group_size)
            low_bytes = (
                _quant_bytes(r_e, v_dim, bits, group_size) + _quant_bytes(r_e, d_dim, bits, group_size) + 2 * r_e
            )
            if embeddings == "sparse" or (embeddings == "auto" and sparse_bytes <= low_bytes):
                entry["kind"] = "sparse"
                entry["rank"] = int(n_rows)
                entry["quantized"] = quantized
                part = {f"{name}:rows": rows.cpu().to(torch.int64)}
                part.update(_encode_rows(R[rows], bits, group_size, f"{name}:values"))
                R_hat = torch.zeros_like(R)
                if quantized:
                    vals = dequantize_rtn(QuantizedTensor.from_dict(part, prefix=f"{name}:values."), R.dtype)
                else:
                    vals = part[f"{name}:values"].to(R.dtype)
                R_hat[rows] = vals.to(R.device)
            else:
                entry["kind"] = "lowrank"
                ranks[name] = r_e
        if entry["kind"] == "lowrank":
            r = ranks[name]
            entry["rank"] = int(r)
            entry["quantized"] = quantized
            if r == 0:
                part, R_hat = {}, torch.zeros_like(R)
            else:
                part, R_hat = _encode_lowrank(R, r, bits, group_size, refit, name)
        err = float(torch.linalg.norm(R - R_hat.to(R.device)))
        tensors.update(part)
        entries.append(
            ResidualEntry(
                name,
                entry["kind"],
                tuple(t.shape),
                rank=entry.get("rank"),
                nbytes=_params_bytes(part.values()),
                rel_error=err / r_norm if r_norm else 0.0,
                weight_rel_error=err / w_norm,
            )
        )
    for name, entry in spec.items():
        if entry["kind"] == "base":
            entries.append(ResidualEntry(name, "base", tuple(entry["shape"])))
    for alias, target in aliases.items():
        a_mod = _module_of(alias)[0]
        a_type = type(modules[a_mod]).__name__ if a_mod in modules else None
        spec[alias] = {"kind": "alias", "of": target, "module": a_mod, "module_type": a_type}
        entries.append(ResidualEntry(alias, "alias", tuple(ft[target].shape)))

    used = sum(ranks.get(n, 0) * sum(shapes[n]) for n in lowrank)
    order = {n: i for i, n in enumerate(spec)}
    config = getattr(finetuned_model, "config", None)
    ft_dtypes = [t.dtype for t in ft.values() if t.is_floating_point()]
    fp = base_fingerprint(base_ref)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": "ere",
        "created_by": _version(),
        "bits": bits,
        "group_size": group_size,
        "quantization": "rtn-affine-v1" if quantized else ("fp16" if bits == 16 else "fp32"),
        "stiefel_projection": quantized,
        "prior_rank": rank,
        "alpha": float(alpha),
        "refit_singular_values": bool(refit and quantized),
        "fit_range": list(fit_range) if fit_range is not None else None,
        "target_modules": target_modules
        if (target_modules is None or isinstance(target_modules, str))
        else list(target_modules),
        "embeddings": embeddings,
        "budget": budget,
        "used": used,
        "architecture": type(finetuned_model).__name__,
        "base_model_prefix": ft_prefix,
        "dtype": _dtype_name(max(set(ft_dtypes), key=ft_dtypes.count)) if ft_dtypes else None,
        "finetuned_bytes": _params_bytes(ft.values()),
        "base": {
            "name_or_path": _name_or_path(base_model),
            "architecture": type(base_model).__name__,
            "dtype": _dtype_name(next(iter(base_ref.values())).dtype) if base_ref else None,
            "fingerprint": fp,
        },
        "tensors": spec,
    }
    if alloc is not None:
        manifest["allocation"] = {"lambda": alloc.lam, "fit": {n: list(v) for n, v in alloc.fit.items()}}
    report = ResidualReport(
        entries=sorted(entries, key=lambda e: order[e.name]),
        bits=bits,
        group_size=group_size,
        alpha=float(alpha),
        prior_rank=rank,
        budget=budget,
        used=used,
        stored_bytes=_params_bytes(tensors.values()),
        finetuned_bytes=manifest["finetuned_bytes"],
    )
    cfg = copy.deepcopy(config) if config is not None and hasattr(config, "to_json_string") else None
    res = EREResidual(tensors, manifest, config=cfg, report=report)
    if out is not None:
        res.save(out)  # sets report.stored_bytes to the file size
    else:
        report.stored_bytes = len(res.serialize())
    report.seconds = time.perf_counter() - started
    return res


def _version() -> str:
    try:
        from .. import __version__

        return f"hf_lowrank {__version__}"
    except ImportError:  # pragma: no cover
        return "hf_lowrank"


def _name_or_path(model: nn.Module) -> str | None:
    value = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(value) if value else None


# ----------------------------------------------------------------------------------------------------------------
# decoding


def _as_residual(path: str | os.PathLike | EREResidual) -> EREResidual:
    return path if isinstance(path, EREResidual) else EREResidual.load(path)


def _verify_base(res: EREResidual, base_of: Mapping[str, torch.Tensor | None]) -> None:
    fp = res.manifest["base"]["fingerprint"]
    if fp.get("algorithm") != FINGERPRINT_ALGORITHM:
        raise ResidualFormatError(f"unknown fingerprint algorithm {fp.get('algorithm')!r}. Upgrade hf_lowrank.")
    missing, shape, dtype, values = [], [], [], []
    for name, want in fp["tensors"].items():
        t = base_of.get(name)
        e = res.entries.get(name, {})
        if t is None:
            missing.append(name)
        elif list(t.shape) != e.get("shape"):
            shape.append(name)
        elif _dtype_name(t.dtype) != e.get("base_dtype"):
            dtype.append(name)
        elif _tensor_hash(name, t) != want:
            values.append(name)
    if not (missing or shape or dtype or values):
        return

    def show(names: list[str]) -> str:
        return ", ".join(f"'{n}'" for n in names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing from the base ({show(missing)})")
    if shape:
        problems.append(f"{len(shape)} with another shape ({show(shape)})")
    if dtype:
        got = _dtype_name(base_of[dtype[0]].dtype)
        want = res.entries[dtype[0]].get("base_dtype")
        problems.append(
            f"{len(dtype)} in another dtype ({got} instead of {want}: load the base with dtype=torch.{want})"
        )
    if values:
        problems.append(f"{len(values)} with different values ({show(values)})")
    where = res.manifest["base"].get("name_or_path")
    raise BaseMismatchError(
        f"This residual was encoded against another base model: {'; '.join(problems)} out of "
        f"{len(fp['tensors'])} fingerprinted tensors. Decode it against the exact base it was encoded from"
        + (f" (recorded as '{where}')" if where else "")
        + ". If a mismatching tensor is a freshly initialized head, re-encode with store_exact=[its name]."
    )


def _architecture_class(manifest: Mapping[str, Any], where: Any = "the residual manifest") -> type | None:
    """The transformers model class the manifest's ``architecture`` names (None when absent).

    Raises:
        ResidualFormatError: ``architecture`` is not the name of a transformers model class (an auto class, another
            attribute of transformers, a non-string).
    """
    arch = manifest.get("architecture")
    if arch is None:
        return None
    import transformers
    from transformers import PreTrainedModel

    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ResidualFormatError(
            f"The field 'architecture' of '{where}' is {arch!r}, not the name of a transformers model class (such "
            "as 'LlamaForCausalLM', the class of the fine-tuned model): the manifest was edited or written by "
            "another tool. Restore the original manifest or re-encode the residual."
        )
    return cls


def _build_model(res: EREResidual, base_model: nn.Module) -> nn.Module:
    arch = res.manifest.get("architecture")
    cls = _architecture_class(res.manifest)
    if cls is None or res.config is None:
        raise ResidualError(
            f"The residual's architecture {arch!r} differs from the base model's {type(base_model).__name__!r} and "
            "cannot be rebuilt from a stored config. Pass a base model of the fine-tuned architecture "
            f"({arch}.from_pretrained(<base checkpoint>, ...))."
        )
    config = copy.deepcopy(res.config)
    dtype = _dtype_of(res.manifest["dtype"]) if res.manifest.get("dtype") else torch.float32
    model = cls._from_config(config, dtype=dtype)
    device = next((p.device for p in base_model.parameters()), torch.device("cpu"))
    return model.to(device)


def _copy_config(model: nn.Module, res: EREResidual) -> None:
    config, target = res.config, getattr(model, "config", None)
    if config is None or target is None:
        return
    for key in ("id2label", "label2id", "problem_type", "architectures"):
        if hasattr(config, key):
            setattr(target, key, copy.deepcopy(getattr(config, key)))


@torch.no_grad()
def decode_residual(
    base_model: nn.Module,
    path: str | os.PathLike | EREResidual,
    *,
    in_place: bool = False,
    stiefel: bool = True,
    progress: bool = True,
) -> nn.Module:
    """Rebuild the fine-tuned model from its base and an ERE residual.

    Args:
        base_model: the base the residual was encoded against (verified by fingerprint). Either the fine-tuned
            architecture (then a deep copy of it is decoded, or the model itself with ``in_place=True``) or another
            architecture sharing the backbone (then the fine-tuned architecture is rebuilt from the stored
            ``config.json`` and filled from the base and the residual).
        path: the residual folder, or an :class:`EREResidual` in memory.
        in_place: decode into ``base_model`` itself (saves a copy; the base is modified). Only possible when it has
            the fine-tuned architecture and shapes.
        stiefel: project dequantized factors onto the Stiefel manifold (the ERE decoder; False only for ablations).
        progress: show a tqdm bar.

    Returns:
        The fine-tuned model, in eval mode.

    Raises:
        BaseMismatchError: the base differs from the encoding base. ResidualFormatError: a damaged residual.
    """
    res = _as_residual(path)
    spec = res.entries
    base_sd = base_model.state_dict()
    ft_prefix, b_prefix = res.manifest.get("base_model_prefix", ""), _base_prefix(base_model)
    base_of = {}
    for name, e in spec.items():
        if e["kind"] in ("base", "lowrank", "sparse"):
            key = _match_name(name, base_sd, ft_prefix, b_prefix)
            base_of[name] = base_sd.get(key) if key is not None else None
    _verify_base(res, base_of)
    same = type(base_model).__name__ == res.manifest.get("architecture") and all(
        name in base_sd and list(base_sd[name].shape) == e["shape"] for name, e in spec.items() if e["kind"] != "alias"
    )
    if same:
        model = base_model if in_place else copy.deepcopy(base_model)
        fresh = False
    else:
        if in_place:
            logger.info("the base has another architecture than the residual: decoding into a new model")
        model = _build_model(res, base_model)
        fresh = True
    _copy_config(model, res)
    target = model.state_dict(keep_vars=True)
    done: dict[str, torch.Tensor] = {}
    names = [n for n, e in spec.items() if e["kind"] != "alias" and (fresh or e["kind"] != "base")]
    for name in tqdm(names, desc="ERE decode", unit="tensor", disable=not progress):
        e = spec[name]
        if name not in target:
            raise ResidualError(
                f"the model to decode into has no tensor '{name}'. Pass a base of class {res.manifest.get('architecture')}."
            )
        dest = target[name]
        dtype = _dtype_of(e["dtype"])
        if e["kind"] == "exact":
            value = res.tensors[f"{name}:exact"]
        elif e["kind"] == "base":
            value = base_of[name]
        else:
            b = base_of[name]
            cd = _compute_dtype(dtype, b.dtype)
            value = b.to(cd) + res.delta(name, stiefel=stiefel, dtype=cd).to(b.device)
        value = value.to(device=dest.device, dtype=dtype)
        if dest.dtype != dtype:
            dest.data = value.clone()
        else:
            dest.data.copy_(value)
        done[name] = dest
    for name, e in spec.items():
        if e["kind"] == "alias" and name in target and e["of"] in done:
            src, dest = done[e["of"]], target[name]
            if dest.data_ptr() != src.data_ptr():
                dest.data.copy_(src.data.to(dest.dtype))
    model.eval()
    return model


def _resolve_base_path(base: str) -> str:
    if base == "smollm2":
        from ..offline import smollm2_dir

        return str(smollm2_dir())
    if base == "minilm":
        from ..offline import minilm_dir

        return str(minilm_dir())
    return base


def load_residual(
    base_name_or_path: str | os.PathLike | nn.Module | None,
    path: str | os.PathLike,
    model_class: Any = None,
    *,
    progress: bool = True,
    **kwargs,
) -> nn.Module:
    """Load the base checkpoint and decode an ERE residual into it in place: the fine-tuned transformers model.

    Args:
        base_name_or_path: folder or Hub id of the base (``"smollm2"`` / ``"minilm"`` for the embedded offline
            models), a base model already in memory (then :func:`decode_residual` on a copy), or None for the base
            path recorded in the manifest.
        path: the residual folder.
        model_class: a transformers class or auto class; default the fine-tuned architecture recorded in the
            manifest (e.g. ``BertForSequenceClassification``).
        progress: show tqdm bars.
        **kwargs: passed to ``from_pretrained`` (``device_map``, ...). ``dtype`` defaults to the base dtype the
            residual was encoded against (the fingerprint includes it).

    Returns:
        The fine-tuned model, in eval mode.
    """
    res = _as_residual(path)
    if isinstance(base_name_or_path, nn.Module):
        return decode_residual(base_name_or_path, res, progress=progress)
    if base_name_or_path is None:
        base_name_or_path = res.manifest["base"].get("name_or_path")
        if not base_name_or_path:
            raise ValueError(
                "No base given and the residual's manifest records none: pass load_residual(<base folder>, path)."
            )
    import transformers

    if model_class is None:
        model_class = _architecture_class(res.manifest) or transformers.AutoModelForCausalLM
    if "dtype" not in kwargs and res.manifest["base"].get("dtype"):
        kwargs["dtype"] = _dtype_of(res.manifest["base"]["dtype"])
    if res.config is not None:
        kwargs.setdefault("config", res.config)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized" heads are expected: the residual holds them
    try:
        model = model_class.from_pretrained(_resolve_base_path(str(base_name_or_path)), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    return decode_residual(model, res, in_place=True, progress=progress)


def is_residual_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding an ERE residual manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()


# ----------------------------------------------------------------------------------------------------------------
# compress on save (used by CompressOnSaveCallback(method="ere"))


def save_residual_on_save(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    base_model: nn.Module | str | os.PathLike | None = None,
    tokenizer: Any = None,
    **kwargs,
) -> ResidualReport:
    """Save a fully fine-tuned model as an ERE residual (the compress-on-save hook).

    Args:
        model: the fine-tuned model (unwrapped; not modified).
        output_dir: folder to write (residual files are written atomically, the manifest last; other files already
            there are left alone).
        base_model: the base as a model, or a folder / Hub id to load it from. None: the model's own
            ``config._name_or_path`` (what ``from_pretrained`` recorded), loaded on the CPU with the model's class
            and dtype. Pass the model (or keep one around) when saving often, to avoid reloading it each time.
        tokenizer: optional tokenizer saved beside the residual.
        **kwargs: passed to :func:`encode_residual` (``rank``, ``bits``, ``alpha``, ``target_modules``,
            ``group_size``, ``progress``, ...).

    Returns:
        The :class:`ResidualReport` of the saved residual.
    """
    if base_model is None:
        base_model = _name_or_path(model)
        if not base_model:
            raise ValueError(
                "save_residual_on_save needs the base model: the fine-tuned model records no name_or_path. Pass "
                "base_model=<the base model or its folder> (e.g. CompressOnSaveCallback(method='ere', "
                "base_model=...))."
            )
    if not isinstance(base_model, nn.Module):
        first = next(iter(model.parameters()))
        cls = type(model)
        if not hasattr(cls, "from_pretrained"):
            raise ValueError(f"cannot load a base for a {cls.__name__}; pass base_model as a model.")
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            base_model = cls.from_pretrained(_resolve_base_path(str(base_model)), dtype=first.dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
        base_model.eval()
    res = encode_residual(base_model, model, out=output_dir, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output_dir))
    return res.report


# ----------------------------------------------------------------------------------------------------------------
# export to a vanilla PEFT LoRA adapter


def _task_type(arch: str | None) -> str | None:
    if not arch:
        return None
    if arch.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if arch.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if arch.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


@torch.no_grad()
def export_residual_as_lora(
    path: str | os.PathLike | EREResidual,
    out: str | os.PathLike,
    *,
    base_model: nn.Module | None = None,
    progress: bool = True,
) -> Path:
    """Write a residual as a standard PEFT LoRA adapter that plain ``PeftModel.from_pretrained(base, out)`` loads.

    Mapping: a low-rank ``nn.Linear`` weight becomes ``lora_A = sqrt|S| Vh``, ``lora_B = U sign(S) sqrt|S|`` with
    ``rank_pattern[m] = alpha_pattern[m] = r`` (scaling 1) from the decoded (dequantized, Stiefel-projected)
    factors; a low-rank embedding becomes ``lora_embedding_A/B``; a tied ``lm_head`` gets its own LoRA with the same
    factors; a row-sparse embedding becomes ``trainable_token_indices`` (PEFT stores the new rows, so this needs
    ``base_model``); changed biases travel with ``bias="all"``; whole modules stored exactly (new heads, norms) go
    to ``modules_to_save``. Unchanged tensors are not written.

    Args:
        path: residual folder or :class:`EREResidual`.
        out: adapter folder to write (atomically).
        base_model: the base (verified by fingerprint); needed only for row-sparse embeddings and for modules that
            must go to ``modules_to_save`` with some tensors unchanged.
        progress: show a tqdm bar.

    Returns:
        The adapter folder. Load it with ``PeftModel.from_pretrained(<base in the fine-tuned architecture>, out)``.
    """
    from peft import LoraConfig
    from safetensors.torch import save as st_save

    res = _as_residual(path)
    spec = res.entries
    base_of: dict[str, torch.Tensor | None] = {}
    if base_model is not None:
        base_sd = base_model.state_dict()
        ft_prefix, b_prefix = res.manifest.get("base_model_prefix", ""), _base_prefix(base_model)
        for name, e in spec.items():
            if e["kind"] in ("base", "lowrank", "sparse"):
                key = _match_name(name, base_sd, ft_prefix, b_prefix)
                base_of[name] = base_sd.get(key) if key is not None else None
        _verify_base(res, base_of)
    aliases_of: dict[str, list[str]] = {}
    for name, e in spec.items():
        if e["kind"] == "alias":
            aliases_of.setdefault(e["of"], []).append(name)

    state: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    rank_pattern: dict[str, int] = {}
    token_indices: dict[str, list[int]] = {}
    save_modules: set[str] = set()
    biases: dict[str, torch.Tensor] = {}
    pre = "base_model.model."

    def need_base(name: str, why: str) -> torch.Tensor:
        if base_model is None or base_of.get(name) is None:
            raise ValueError(
                f"exporting '{name}' as a PEFT adapter needs the base weights ({why}); pass "
                "export_residual_as_lora(path, out, base_model=<the base model>)."
            )
        return base_of[name]

    task_type = _task_type(res.manifest.get("architecture"))
    heads = _head_modules(spec, task_type)
    names = [n for n, e in spec.items() if e["kind"] in ("lowrank", "sparse", "exact")]
    head_changed = False
    for name in tqdm(names, desc="export LoRA", unit="tensor", disable=not progress):
        e = spec[name]
        mod, leaf = _module_of(name)
        if _under(mod, heads):
            head_changed = True  # the head is exported whole below
            continue
        mtype = e.get("module_type")
        dtype = _dtype_of(e["dtype"])
        if e["kind"] == "lowrank":
            if not e["rank"]:
                continue
            U, S, Vh = res.factors(name, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            root = S.abs().sqrt()
            up, down = U * (torch.sign(S) * root), root[:, None] * Vh  # (out, r), (r, in)
            r = int(e["rank"])
            holders = [(mod, mtype)] + [
                (spec[a]["module"], spec[a].get("module_type")) for a in aliases_of.get(name, [])
            ]
            if leaf == "weight" and all(t in ("Embedding", "Linear") for _, t in holders):
                for m_name, m_type in holders:  # a tied lm_head gets the same change as the embedding
                    if m_type == "Embedding":  # peft: delta = (B @ A).T with A (r, num_embeddings), B (dim, r)
                        state[f"{pre}{m_name}.lora_embedding_A"] = up.T.contiguous().to(dtype)
                        state[f"{pre}{m_name}.lora_embedding_B"] = down.T.contiguous().to(dtype)
                    else:
                        state[f"{pre}{m_name}.lora_A.weight"] = down.contiguous().to(dtype)
                        state[f"{pre}{m_name}.lora_B.weight"] = up.contiguous().to(dtype)
                    targets.append(m_name)
                    rank_pattern[m_name] = r
            elif len(holders) == 1:
                b = need_base(name, f"a {mtype} weight is not a LoRA target, it goes to modules_to_save")
                full = (b.to(torch.float64) + res.delta(name, dtype=torch.float64).to(b.device)).to(dtype)
                _save_whole(state, save_modules, res, spec, mod, {leaf: full}, need_base)
            else:
                raise ValueError(
                    f"'{name}' is tied to {aliases_of[name]} and is not a Linear/Embedding weight; "
                    "it cannot be exported as a LoRA adapter. Use decode_residual instead."
                )
        elif e["kind"] == "sparse":
            if mtype != "Embedding" or leaf != "weight":
                raise ValueError(f"row-sparse tensor '{name}' is not an embedding weight; it cannot be exported.")
            b = need_base(name, "PEFT's trainable_token_indices stores the new embedding rows, not their change")
            rows = res.tensors[f"{name}:rows"].long()
            new_rows = b.to(torch.float64)[rows.to(b.device)].cpu() + res.delta(name, dtype=torch.float64)[rows]
            new_rows = new_rows.to(dtype)
            token_indices[mod] = [int(i) for i in rows.tolist()]
            state[f"{pre}{mod}.token_adapter.trainable_tokens_delta"] = new_rows.cpu().contiguous()
        else:  # exact
            value = res.tensors[f"{name}:exact"].to(dtype)
            if leaf == "bias" and value.ndim == 1:
                biases[name] = value
            else:
                _save_whole(state, save_modules, res, spec, mod, {leaf: value}, need_base)
    for name, value in biases.items():
        mod, leaf = _module_of(name)
        if mod in save_modules:
            state[f"{pre}{name}"] = value
        elif mod in targets:
            state[f"{pre}{mod}.base_layer.{leaf}"] = value
        else:
            state[f"{pre}{name}"] = value
    if not targets and not token_indices and not save_modules and not biases and not head_changed:
        raise ValueError("the residual holds no change to export (every tensor equals the base).")
    for head in heads:
        # peft wraps a SEQ_CLS / TOKEN_CLS head ("classifier", "score") whole in modules_to_save and then expects
        # every tensor of it in the adapter: a LoRA inside it (RoBERTa's classifier.dense / out_proj) cannot load.
        subs = {e["module"] for e in spec.values() if e["kind"] != "alias" and _under(e["module"], [head])}
        for sub in sorted(subs):
            _save_whole(state, set(), res, spec, sub, {}, need_base)
        save_modules.add(head)
    cfg = LoraConfig(
        r=max(rank_pattern.values(), default=8),
        lora_alpha=max(rank_pattern.values(), default=8),
        target_modules=sorted(set(targets)) if targets else [],
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(rank_pattern),
        lora_dropout=0.0,
        bias="all" if biases else "none",
        modules_to_save=sorted(save_modules) or None,
        trainable_token_indices=token_indices or None,
        task_type=task_type,
        base_model_name_or_path=res.manifest["base"].get("name_or_path"),
    )
    out = Path(out)
    with atomic_directory(out) as tmp:
        cfg.save_pretrained(str(tmp))
        atomic_write_bytes(Path(tmp) / "adapter_model.safetensors", st_save(state, metadata={"format": "pt"}))
        atomic_write_bytes(Path(tmp) / CARD_NAME, _adapter_card(res, cfg).encode())
    return out


_HEAD_NAMES = ("classifier", "score")  # what peft's PeftModelForSequence/TokenClassification add to modules_to_save


def _head_modules(spec: Mapping[str, Any], task_type: str | None) -> list[str]:
    """The classifier heads that peft wraps whole for ``task_type`` (outermost module named like a head)."""
    if task_type not in ("SEQ_CLS", "TOKEN_CLS"):
        return []
    heads: set[str] = set()
    for e in spec.values():
        parts = (e.get("module") or "").split(".")
        for i, part in enumerate(parts):
            if part in _HEAD_NAMES:
                heads.add(".".join(parts[: i + 1]))
                break
    return sorted(heads)


def _under(mod: str, heads: Sequence[str]) -> bool:
    return any(mod == h or mod.startswith(h + ".") for h in heads)


def _save_whole(state, save_modules, res, spec, mod, given, need_base) -> None:
    """Put module ``mod`` in ``modules_to_save`` with all its direct tensors (stored, decoded or from the base)."""
    pre = "base_model.model."
    save_modules.add(mod)
    for name, e in spec.items():
        if e.get("kind") == "alias" or e.get("module") != mod:
            continue
        leaf = _module_of(name)[1]
        if leaf in given:
            value = given[leaf]
        elif e["kind"] == "exact":
            value = res.tensors[f"{name}:exact"]
        elif e["kind"] == "base":
            value = need_base(name, f"module '{mod}' goes to modules_to_save whole").to(_dtype_of(e["dtype"]))
        else:
            b = need_base(name, f"module '{mod}' goes to modules_to_save whole")
            value = (b.to(torch.float64) + res.delta(name, dtype=torch.float64).to(b.device)).to(_dtype_of(e["dtype"]))
        state[f"{pre}{name}"] = value.detach().cpu().contiguous()


# ----------------------------------------------------------------------------------------------------------------
# model cards


def _model_card(res: EREResidual) -> str:
    m = res.manifest
    base = m["base"].get("name_or_path") or "<the base checkpoint>"
    arch = m.get("architecture") or "AutoModelForCausalLM"
    rep = res.report
    size = ""
    if rep is not None:
        size = (
            f"- stored: {rep.stored_bytes / 2**20:.2f} MiB, {100 * rep.fraction:.2f}% of the fine-tuned checkpoint "
            f"({rep.finetuned_bytes / 2**20:.1f} MiB)\n"
        )
    ranks = list(res.ranks.values())
    rank_line = f"- low-rank tensors: {len(ranks)}, ranks {min(ranks)}..{max(ranks)}\n" if ranks else ""
    return f"""---
library_name: hf-lowrank
tags:
- ere
- residual
- hf-lowrank
---

# ERE residual of a fine-tuned `{arch}`

This folder stores a fully fine-tuned model as a compressed **residual** over its base model (ERE, efficient
residual encoding): per weight, `W_ft - W_base` as a low-rank factorization with {m["bits"]}-bit factors
(or a row-sparse embedding change, or exact small tensors). It is not a standalone checkpoint: it needs the exact
base it was encoded from.

- base: `{base}` (`{m["base"].get("architecture")}`, {m["base"].get("dtype")}), fingerprint `{m["base"]["fingerprint"]["sha256"][:16]}`
- bits: {m["bits"]}, group size {m["group_size"]}, prior rank {m["prior_rank"]}, alpha {m["alpha"]}
{size}{rank_line}
## Load it

```python
import hf_lowrank
model = hf_lowrank.load_residual("{base}", "path/to/this/folder")   # the fine-tuned {arch}
```

or, with a base already in memory, `hf_lowrank.decode_residual(base_model, "path/to/this/folder")`.

From the command line:

```bash
hf-lowrank residual decode {base} path/to/this/folder --out finetuned/      # a plain transformers checkpoint
hf-lowrank residual export-lora path/to/this/folder --out adapter/ --base {base}   # a vanilla PEFT LoRA adapter
```

Decoding against any other base (or the same base in another dtype) is refused: the manifest holds a fingerprint
of the base weights. `residual_manifest.json` also records the sha256 of `residual.safetensors`.
"""


def _adapter_card(res: EREResidual, cfg: Any) -> str:
    base = res.manifest["base"].get("name_or_path") or "<the base checkpoint>"
    arch = res.manifest.get("architecture") or "AutoModelForCausalLM"
    return f"""---
library_name: peft
tags:
- lora
- ere
- hf-lowrank
---

# LoRA adapter exported from an ERE residual

A standard PEFT LoRA adapter (per-module `rank_pattern`, `alpha_pattern` equal to the rank, so scaling 1) that
reproduces the fine-tuned `{arch}` on its base `{base}`
(base fingerprint `{res.manifest["base"]["fingerprint"]["sha256"][:16]}`).

```python
from peft import PeftModel
from transformers import {arch}
base = {arch}.from_pretrained("{base}")   # the fine-tuned architecture (e.g. num_labels=...)
model = PeftModel.from_pretrained(base, "path/to/this/folder")
```

Low-rank targets: {len(cfg.target_modules or [])}; modules_to_save: {sorted(cfg.modules_to_save or [])};
bias: {cfg.bias}; trainable tokens: {sorted((cfg.trainable_token_indices or {}).keys())}.
"""
