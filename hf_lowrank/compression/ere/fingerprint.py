"""Which base tensors a residual relies on, and whether a base given for decoding is the one it was encoded from.

The fingerprint hashes, per base tensor, its name, shape, dtype and 4096 values at fixed strided positions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...targets import resolve_name
from .format import BaseMismatchError, ResidualFormatError, _dtype_name

if TYPE_CHECKING:
    from .format import EREResidual

__all__ = ["base_fingerprint"]

FINGERPRINT_ALGORITHM = "strided-sample-v1"
_SAMPLES = 4096


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


def _base_prefix(model: nn.Module) -> str:
    return str(getattr(model, "base_model_prefix", "") or "")


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


def verified_base_tensors(
    res: EREResidual, base_model: nn.Module, base_sd: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor | None]:
    """``{fine-tuned name: base tensor or None}`` for every tensor that needs the base, checked by fingerprint.

    Raises:
        BaseMismatchError: ``base_model`` is not the base the residual was encoded from.
    """
    base_sd = base_model.state_dict() if base_sd is None else base_sd
    ft_prefix, b_prefix = res.manifest.get("base_model_prefix", ""), _base_prefix(base_model)
    base_of: dict[str, torch.Tensor | None] = {}
    for name, e in res.entries.items():
        if e["kind"] in ("base", "lowrank", "sparse"):
            key = resolve_name(name, base_sd, (ft_prefix, b_prefix))
            base_of[name] = base_sd.get(key) if key is not None else None
    _verify_base(res, base_of)
    return base_of
