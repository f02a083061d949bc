"""What an encoding did: per-tensor :class:`ResidualEntry` rows and the :class:`ResidualReport` summary."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from ...io import atomic_write_json
from .format import _KINDS

__all__ = ["ResidualEntry", "ResidualReport"]


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
