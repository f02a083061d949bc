"""The Fisher state: accumulated squared gradients keyed by module name, their counters, and its safetensors file.

:class:`FisherState` is what :class:`~hf_lowrank.tuners.fisher_lora.FisherCollector` fills during training,
what every checkpoint holds (``fisher_state.safetensors``, :func:`fisher_state_filename`) and what compression reads
(``compress_model(model, keep, fisher=state)``): per-module row / column Fisher (:meth:`FisherState.row_col`),
Kronecker Grams (:meth:`FisherState.grams`), shape and fingerprint checks against the model it is applied to. It is
data and a file format, below compression in the layers (``compression`` reads it, ``peft_configs`` fills it), and
it spells the Fisher defaults that ``FisherLoRAConfig`` and ``compress_model`` share.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibration.grams import GRAM_IN, GRAM_OUT
from ..errors import FisherStateError
from ..io import atomic_save_safetensors
from ..ops.fisher import lora_fisher_to_weights

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_EXPONENT",
    "DEFAULT_LORA_WEIGHTING",
    "DEFAULT_WEIGHTING",
    "FISHER_STATE_NAME",
    "SOURCES",
    "FisherState",
    "FisherStateError",
    "fisher_state_filename",
    "resolve_fisher",
]

# The Fisher defaults, spelled here only: FisherLoRAConfig resolves its None fields with them
# (tuners/fisher_lora/config.py: default_weighting) and compress_model(fisher=...), the callbacks and the CLI
# read them from here.
DEFAULT_LORA_WEIGHTING = "kronecker"
"""``fisher_weighting`` when it is None and ``fisher_source="lora"``: the Grams are collected during LoRA training."""
DEFAULT_WEIGHTING = "two_sided"
"""``fisher_weighting`` of a state that holds no Kronecker Grams (a diagonal Fisher), wherever no config says."""
DEFAULT_EXPONENT = 0.5
"""``fisher_exponent``: Fisher weights are ``(F / mean(F) + eps) ** exponent`` (FWSVD's ``sqrt(F)``)."""
DEFAULT_EPS = 1e-6
"""``fisher_eps``: the floor of the normalised Fisher."""

FISHER_STATE_NAME = "fisher_state.safetensors"
_FORMAT = "hf_lowrank.fisher"
_VERSION = 1
_KINDS = {"A": ".fisher_A", "B": ".fisher_B", "W": ".fisher_W", "Gin": GRAM_IN, "Gout": GRAM_OUT}
SOURCES = ("lora", "full")


def fisher_state_filename(process_index: int = 0, world_size: int = 1) -> str:
    """File name of the Fisher state in a checkpoint folder (one file per process when there are several)."""
    if world_size <= 1:
        return FISHER_STATE_NAME
    return f"fisher_state.rank{process_index}.safetensors"


@dataclass
class FisherState:
    """Accumulated squared gradients, keyed by module name, plus counters.

    Attributes:
        source: ``"lora"`` (tensors ``<module>.fisher_A`` ``(r, in)`` and ``<module>.fisher_B`` ``(out, r)``) or
            ``"full"`` (tensors ``<module>.fisher_W`` ``(out, in)``).
        tensors: the accumulators (float32).
        micro_batches: forward passes with gradients enabled in training mode that were observed.
        samples: examples in those micro-batches (leading dimension of the input).
        skipped: (micro-batch, parameter) gradient tensors dropped because they were not finite.
        global_step: optimizer step at which the state was saved (used to check a resume).
        adapter_name: the LoRA adapter the Fisher belongs to (``"lora"`` source).
        fingerprint: what the state was collected on (:func:`model_fingerprint`: adapter rank, model type, a sample
            of the frozen base weights), checked by :meth:`check_fingerprint`; ``None`` for states saved before it
            existed (they load and are not checked).
    """

    source: str = "lora"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    micro_batches: int = 0
    samples: int = 0
    skipped: int = 0
    global_step: int = 0
    adapter_name: str | None = None
    fingerprint: dict | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise FisherStateError(f"Fisher source must be one of {SOURCES}, got {self.source!r}.")

    # ----------------------------------------------------------------------------------------------- access
    @property
    def modules(self) -> list[str]:
        """Names of the modules that have Fisher, in insertion order."""
        seen: dict[str, None] = {}
        for key in self.tensors:
            for suffix in _KINDS.values():
                if key.endswith(suffix):
                    seen[key[: -len(suffix)]] = None
        return list(seen)

    def module_fisher(self, name: str) -> dict[str, torch.Tensor]:
        """``{"A": ..., "B": ...}`` or ``{"W": ...}`` for module ``name`` (empty when it has none)."""
        return {k: self.tensors[name + s] for k, s in _KINDS.items() if name + s in self.tensors}

    @property
    def is_empty(self) -> bool:
        """True when no gradient was accumulated (no tensors, or all zero)."""
        return not self.tensors or all(not bool(t.any()) for t in self.tensors.values())

    def row_col(self, name: str, weighting: str = DEFAULT_WEIGHTING) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fisher per output row ``(out,)`` and, for ``"two_sided"``, per input column ``(in,)`` of module ``name``.

        LoRA source: :func:`~hf_lowrank.ops.fisher.lora_fisher_to_weights`. Full source: ``F_W.sum(1)`` and
        ``F_W.sum(0)``. Float64 results.
        """
        parts = self.module_fisher(name)
        if not parts:
            raise FisherStateError(f"The Fisher state has no entry for module '{name}'.")
        if weighting not in ("row", "two_sided"):
            raise ValueError(f"weighting must be 'row' or 'two_sided', got {weighting!r}.")
        if "W" in parts:
            F = parts["W"].detach().to(torch.float64)
            return F.sum(dim=1), (F.sum(dim=0) if weighting == "two_sided" else None)
        return lora_fisher_to_weights(parts["A"], parts["B"], mode=weighting)

    def has_grams(self, names: Iterable[str] | None = None) -> bool:
        """True when every module in ``names`` (default: all) has Kronecker Grams (``fisher_weighting='kronecker'``)."""
        names = self.modules if names is None else list(names)
        return bool(names) and all(name + GRAM_IN in self.tensors and name + GRAM_OUT in self.tensors
                                   for name in names)

    def default_weighting(self, names: Iterable[str] | None = None) -> str:
        """``"kronecker"`` when the state holds Kronecker Grams for ``names``, else :data:`DEFAULT_WEIGHTING`."""
        return "kronecker" if self.has_grams(names) else DEFAULT_WEIGHTING

    def grams(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G_in, G_out)`` of module ``name`` (Kronecker-factored Fisher; a 1-D Gram is a diagonal).

        Raises:
            FisherStateError: the state holds no Grams for the module (collected without kronecker weighting).
        """
        parts = self.module_fisher(name)
        if "Gin" not in parts or "Gout" not in parts:
            raise FisherStateError(
                f"The Fisher state has no Kronecker Grams for module '{name}': it was collected without "
                "fisher_weighting='kronecker'. Collect it again with FisherLoRAConfig(fisher_weighting='kronecker'), "
                "or compress with fisher_weighting='two_sided'."
            )
        return parts["Gin"], parts["Gout"]

    def weights(
        self, weighting: str = DEFAULT_WEIGHTING, names: Iterable[str] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(row_fisher, col_fisher)`` dicts for ``names`` (default: all), as ``compress_model`` takes them."""
        rows: dict[str, torch.Tensor] = {}
        cols: dict[str, torch.Tensor] = {}
        for name in self.modules if names is None else names:
            row, col = self.row_col(name, weighting)
            rows[name] = row
            if col is not None:
                cols[name] = col
        return rows, cols

    def check_shapes(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Verify that every module in ``shapes`` (``{name: (out, in)}``) has Fisher of a matching shape.

        Raises:
            FisherStateError: a module has no Fisher, or its Fisher has another shape (collected on another model).
        """
        missing = [n for n in shapes if not self.module_fisher(n)]
        if missing:
            have = self.modules
            raise FisherStateError(
                f"The Fisher state has no entry for {len(missing)} of the {len(shapes)} modules to compress (e.g. "
                f"'{missing[0]}'; it has {len(have)} modules, e.g. {have[:2]}). It was collected on another model or "
                "on other target modules: collect it on this model with the same target_modules."
            )
        for name, (out_f, in_f) in shapes.items():
            parts = self.module_fisher(name)
            if "W" in parts:
                ok = tuple(parts["W"].shape) == (out_f, in_f)
                got = f"F_W {tuple(parts['W'].shape)}"
            else:
                a, b = parts.get("A"), parts.get("B")
                ok = (
                    a is not None and b is not None and a.ndim == 2 and b.ndim == 2 and a.shape[1] == in_f
                    and b.shape[0] == out_f and a.shape[0] == b.shape[1]
                )
                got = f"F_A {tuple(a.shape) if a is not None else None}, F_B {tuple(b.shape) if b is not None else None}"
            for kind, n in (("Gin", in_f), ("Gout", out_f)):
                if kind in parts and tuple(parts[kind].shape) not in ((n, n), (n,)):
                    ok, got = False, f"{kind} {tuple(parts[kind].shape)}"
            if not ok:
                raise FisherStateError(
                    f"The Fisher for module '{name}' ({got}) does not fit its ({out_f}, {in_f}) weight: it was "
                    "collected on a model of another shape. Collect the Fisher again on this model."
                )

    # ------------------------------------------------------------------------------------------ persistence
    def to_metadata(self) -> dict[str, str]:
        return {
            "format": _FORMAT,
            "version": str(_VERSION),
            "source": self.source,
            "micro_batches": str(int(self.micro_batches)),
            "samples": str(int(self.samples)),
            "skipped": str(int(self.skipped)),
            "global_step": str(int(self.global_step)),
            "adapter_name": self.adapter_name or "",
            **({"fingerprint": json.dumps(self.fingerprint)} if self.fingerprint else {}),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the state as one safetensors file (atomically)."""
        atomic_save_safetensors({k: v.float() for k, v in self.tensors.items()}, path, metadata=self.to_metadata())

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> FisherState:
        """Read a state written by :meth:`save` (a file, or a folder holding ``fisher_state.safetensors``).

        Raises:
            FisherStateError: missing, unreadable or not a Fisher state.
        """
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / FISHER_STATE_NAME
        if not path.is_file():
            raise FisherStateError(
                f"No Fisher state at '{path}'. It is written by FisherCollectorCallback into each checkpoint folder "
                f"and next to a model saved by LowRankTrainer ('{FISHER_STATE_NAME}'); check the path."
            )
        try:
            with safe_open(str(path), framework="pt", device=str(device or "cpu")) as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # safetensors raises several exception types for corrupt files
            raise FisherStateError(f"The Fisher state '{path}' is unreadable ({exc}); it is corrupt or truncated.") from exc
        if meta.get("format") != _FORMAT:
            raise FisherStateError(
                f"'{path}' is a safetensors file but not a hf-lowrank Fisher state (format={meta.get('format')!r})."
            )
        if int(meta.get("version", "0")) > _VERSION:
            raise FisherStateError(
                f"'{path}' uses Fisher state version {meta['version']}, newer than {_VERSION}; upgrade hf-lowrank."
            )
        return cls(
            source=meta.get("source", "lora"),
            tensors={k: v.float() for k, v in tensors.items()},
            micro_batches=int(meta.get("micro_batches", 0)),
            samples=int(meta.get("samples", 0)),
            skipped=int(meta.get("skipped", 0)),
            global_step=int(meta.get("global_step", 0)),
            adapter_name=meta.get("adapter_name") or None,
            fingerprint=_read_fingerprint(meta.get("fingerprint"), path),
        )

    def clone(self) -> FisherState:
        return FisherState(
            source=self.source,
            tensors={k: v.detach().clone() for k, v in self.tensors.items()},
            micro_batches=self.micro_batches,
            samples=self.samples,
            skipped=self.skipped,
            global_step=self.global_step,
            adapter_name=self.adapter_name,
            fingerprint=dict(self.fingerprint) if self.fingerprint else None,
        )

    def check_fingerprint(self, current: dict | None, *, what: str = "this model") -> None:
        """Refuse a state collected at another adapter rank or on another model of the same shapes.

        Args:
            current: :func:`model_fingerprint` of the model the state is applied to (``None``: nothing to check).
            what: how the model is named in the message.

        Raises:
            FisherStateError: the adapter rank, the model type or the sampled base weights differ.
        """
        mine = self.fingerprint
        if not mine or not current:
            return  # a state saved before fingerprints existed, or nothing known about the model
        mine_r, cur_r = mine.get("adapter_rank"), current.get("adapter_rank")
        if mine_r is not None and cur_r is not None and int(mine_r) != int(cur_r):
            raise FisherStateError(
                f"The Fisher state was collected with LoRA adapter rank r={mine_r} but {what} has r={cur_r}: the "
                "Fisher of the LoRA factors belongs to that adapter. Collect it again with this adapter, or compress "
                "the adapter it was collected with."
            )
        mine_t, cur_t = mine.get("model_type"), current.get("model_type")
        if mine_t and cur_t and mine_t != cur_t:
            raise FisherStateError(
                f"The Fisher state was collected on a '{mine_t}' model but {what} is a '{cur_t}' model. Collect the "
                "Fisher on this model."
            )
        for name, values in (mine.get("sample") or {}).items():
            other = (current.get("sample") or {}).get(name)
            if other is None or len(other) != len(values):
                continue
            a, b = torch.tensor(values, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
            if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
                continue
            scale = float(torch.maximum(a.abs().max(), b.abs().max()))
            if float((a - b).abs().max()) > 2e-2 * scale + 1e-6:
                raise FisherStateError(
                    f"The Fisher state was collected on another model of the same shapes: the base weight of '{name}' "
                    f"differs (state from {mine.get('name_or_path') or 'an unnamed model'!r}, {what} is "
                    f"{current.get('name_or_path') or 'an unnamed model'!r}). Collect the Fisher on this model."
                )

    def summary(self) -> dict:
        return {
            "fisher_source": self.source,
            "modules": len(self.modules),
            "micro_batches": int(self.micro_batches),
            "samples": int(self.samples),
            "skipped": int(self.skipped),
            "global_step": int(self.global_step),
        }


def resolve_fisher(fisher) -> FisherState | None:
    """A :class:`FisherState` from a state, a collector or callback that holds one, or a file or folder path.

    A ``FisherCollector`` (anything with ``reduced_state()``: under DDP a collective) gives its reduced state; a
    ``FisherCollectorCallback`` (anything with a ``collector`` attribute) its collector's.
    """
    if fisher is None or isinstance(fisher, FisherState):
        return fisher
    collector = getattr(fisher, "collector", fisher)
    if callable(getattr(collector, "reduced_state", None)):
        return collector.reduced_state()
    if isinstance(fisher, (str, os.PathLike)):
        return FisherState.load(fisher)
    raise TypeError(
        f"fisher must be a FisherCollectorCallback, FisherCollector, FisherState or a path to "
        f"'{FISHER_STATE_NAME}', got {type(fisher).__name__}."
    )


def _read_fingerprint(text: str | None, path) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise FisherStateError(
            f"'{path}' has a corrupt fingerprint in its metadata ({text[:60]!r}): the file was edited or damaged. "
            "Collect the Fisher again."
        )
    return value
