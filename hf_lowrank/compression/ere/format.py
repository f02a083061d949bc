"""The ERE residual folder: constants, errors, the :class:`EREResidual` object and its save / load checks.

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

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...cards import residual_card
from ...errors import BaseMismatchError, ResidualError, ResidualFormatError
from ...io import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    check_plain_name,
    read_json,
    read_safetensors_header,
    recover_directory,
)
from ...ops.quant import QuantizedTensor, dequantize_rtn, stiefel_project

if TYPE_CHECKING:
    from .report import ResidualReport

__all__ = [
    "BaseMismatchError",
    "EREResidual",
    "FORMAT_VERSION",
    "ResidualError",
    "ResidualFormatError",
    "is_residual_dir",
]

FORMAT_NAME = "hf_lowrank.ere"
FORMAT_VERSION = 1
WEIGHTS_NAME = "residual.safetensors"
MANIFEST_NAME = "residual_manifest.json"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
UNQUANTIZED_BITS = (16, 32)
MIN_DIM = 16  # 2-D tensors with a side below this are stored exactly
_KINDS = ("lowrank", "sparse", "exact", "base", "alias")


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


def _params_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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
                atomic_write_bytes(tmp / CARD_NAME, residual_card(self).encode())
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
            raise ResidualFormatError(f"'{path}' is not a folder; pass the folder encode_residual(path=...) wrote.")
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
        _, meta = read_safetensors_header(
            wpath, data=data, what="residual weights file", fix="Copy it again or re-encode the residual.",
            error=ResidualFormatError,
        )
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


def _as_residual(path: str | os.PathLike | EREResidual) -> EREResidual:
    return path if isinstance(path, EREResidual) else EREResidual.load(path)


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


def is_residual_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding an ERE residual manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()
