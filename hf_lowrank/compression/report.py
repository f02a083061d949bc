"""What a compression did: per-module ranks, parameters and reconstruction errors (``compression_report.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..io import atomic_write_json

__all__ = ["CompressionReport", "ModuleReport", "stored_bytes"]


@dataclass
class ModuleReport:
    """What compression did to one module."""

    name: str
    shape: tuple[int, int]
    rank: int | None
    params_before: int
    params_after: int
    rel_error: float | None = None
    weighted_rel_error: float | None = None
    skipped: str | None = None
    #: sides ("input", "output") whose calibration Gram was empty, so the factorization was unweighted there
    unweighted_sides: list[str] | None = None
    #: bytes the module stores before / after (weights or factor codes with their scales and offsets, and the bias,
    #: each in its own dtype): :func:`stored_bytes`
    bytes_before: int | None = None
    bytes_after: int | None = None


@dataclass
class CompressionReport:
    """Per-module ranks, parameters and reconstruction errors of one compression."""

    modules: list[ModuleReport] = field(default_factory=list)
    method: str = "svd"
    info: dict = field(default_factory=dict)
    """Method-specific facts (FWSVD: the Fisher weighting, exponent and the Fisher state's counters)."""

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules if m.skipped is None}

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def bytes_before(self) -> int:
        """Bytes of the target modules before compression (modules without a byte count add nothing)."""
        return sum(m.bytes_before or 0 for m in self.modules)

    @property
    def bytes_after(self) -> int:
        """Bytes of the target modules after compression: factor codes (quantized factors) or float factors, plus
        the modules kept dense, each in its own dtype."""
        return sum(m.bytes_after or 0 for m in self.modules)

    @property
    def kept_fraction(self) -> float:
        return self.params_after / max(self.params_before, 1)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "kept_fraction": self.kept_fraction,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "modules": [asdict(m) for m in self.modules],
            **({"info": dict(self.info)} if self.info else {}),
        }

    def save(self, path) -> None:
        """Write the report as JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    def summary(self) -> str:
        done = [m for m in self.modules if m.skipped is None]
        errs = [m.rel_error for m in done if m.rel_error is not None]
        mean_err = sum(errs) / len(errs) if errs else float("nan")
        return (
            f"{self.method}: {len(done)}/{len(self.modules)} modules factorized, target parameters "
            f"{self.params_before:,} -> {self.params_after:,} ({self.kept_fraction:.1%} kept), "
            f"mean relative error {mean_err:.4f}"
        )


def stored_bytes(module) -> int:
    """Bytes of ``module``'s parameters and buffers, each at its dtype's size (codes, scales, offsets and bias of a
    quantized factor layer; float factors; a dense weight)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
