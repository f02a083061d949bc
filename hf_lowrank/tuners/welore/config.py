"""Configuration of WeLoreLRC: non-uniform rank reduction (data-free, or data-aware on whitened spectra), then
fine-tuning of the low-rank components."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Union

import torch
from peft.config import PeftConfig

from ...compression.config import SVD_METHODS
from ...ops.fisher import DEFAULT_DAMPING
from ...targets import check_pattern_key
from .._registry import ensure_peft_type

__all__ = ["WeLoreLRCConfig"]

SPECTRA = ("weights", "whitened")
"""What WeLore thresholds: the singular values of the weights (data-free, the paper) or of the whitened weights."""


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # numpy integers included


def _plain_ints(mapping: dict) -> dict:
    """The mapping with numpy integer values as plain ints (adapter_config.json must serialise them)."""
    return {k: int(v) if _is_int(v) else v for k, v in mapping.items()}


@dataclass
class WeLoreLRCConfig(PeftConfig):
    """WeLore (Jaiswal et al., 2024, arXiv:2407.11239) as a PEFT method.

    ``get_peft_model(model, WeLoreLRCConfig(reduction=0.3))`` computes the singular values of every target weight
    (cached), bisects one global threshold on the min-max normalised spectra so that the ACHIEVED effective rank
    reduction over the targets equals ``reduction``, replaces each low-rank component (LRC: kept rank below
    ``lrc_ratio * min(out, in)``) by a trainable factor pair initialised from its truncated SVD, and freezes
    everything else. Only the LRC factors train, so gradients and optimizer state are low-rank.

    Data-aware WeLore: ``WeLoreLRCConfig(reduction=0.3).with_calibration(batches)`` (which sets
    ``spectra="whitened"``) thresholds the WHITENED spectra instead, the singular values of ``W L_in`` with ``L_in``
    the Cholesky factor of each module's input Gram on the calibration batches (measured by forward passes of the
    base model inside ``get_peft_model``), and initialises the LRC factors (and truncated N-LRCs) with the whitened
    SVD, the rank-``r`` minimiser of the output error on those inputs, so allocation and factors agree (see
    :mod:`hf_lowrank.tuners.welore.allocation` for why no extra normalisation is needed). The batches are not
    saved; ``adapter_config.json`` records ``spectra="whitened"``, the damping and the calibration token count, and
    ``PeftModel.from_pretrained`` needs no calibration data (the factors are in the adapter weights).

    The fields below the line are written by ``get_peft_model`` (the resolved allocation) and saved in
    ``adapter_config.json``; ``PeftModel.from_pretrained`` rebuilds the layers from them without any SVD. Leave them
    unset when creating a config.
    """

    reduction: float = field(
        default=0.3,
        metadata={
            "help": (
                "Target ACHIEVED effective rank reduction over the target layers, in (0, 1): sum of removed ranks / "
                "sum of full ranks, counting only what is really removed (N-LRCs kept exact remove nothing)."
            )
        },
    )
    target_modules: Union[list[str], str] | None = field(
        default=None,
        metadata={
            "help": (
                "Layers WeLore considers. None (default): every Linear (GPT-2-style Conv1D included) inside the "
                "transformer blocks (attention and MLP projections), not embeddings, poolers or heads. 'all-linear' is peft's: every Linear but "
                "the output head. Another string is a regex fully matched against module names; a list matches "
                "names equal to or ending with an entry (see hf_lowrank.targets)."
            )
        },
    )
    lrc_ratio: float = field(
        default=0.5,
        metadata={
            "help": "A layer is a low-rank component (LRC) when its kept rank is below lrc_ratio * min(out, in); "
            "in (0, 1]."
        },
    )
    nlrc: str = field(
        default="keep",
        metadata={
            "help": "What happens to non-low-rank components: 'keep' (exact and frozen, as in the authors' code) or "
            "'truncate' (cut to their threshold rank, stored dense, frozen)."
        },
    )
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={
            "help": "Pin ranks: {regex: rank}; a key matches a module whose name ends with it (peft's convention). "
            "Pinned modules count towards the reduction and are split into LRC / N-LRC by the same rule."
        },
    )
    keep_dense: bool = field(
        default=False,
        metadata={
            "help": (
                "Keep the dense weight of each replaced layer. False (default) drops it, so the PEFT model IS the "
                "compressed model in memory (the point of WeLore); disable_adapter() and unload() then refuse, "
                "merge_and_unload() still works. True keeps it so disable_adapter(), unmerge() and unload() give "
                "the dense model back, at the cost of the dense weights' memory."
            )
        },
    )
    svd_method: str = field(
        default="auto",
        metadata={"help": "Truncated SVD used to initialise the LRC factors: 'auto', 'exact' or 'randomized'."},
    )
    spectra_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder caching singular values on disk (keyed by a hash of each weight) so that a later "
            "get_peft_model of the same model skips the SVDs; None: $HF_LOWRANK_SPECTRA_CACHE when set, else memory "
            "only; '': memory only, whatever the environment says (never the current directory)."
        },
    )
    progress: bool = field(
        default=True, metadata={"help": "Show progress bars and print the allocation summary on stderr."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules trained in full and saved (e.g. a freshly initialised classifier head)."},
    )
    spectra: str = field(
        default="weights",
        metadata={
            "help": (
                "What the WeLore threshold runs on: 'weights' (default, data-free: the singular values of each weight, "
                "as in the paper) or 'whitened' (data-aware: the singular values of W L_in, L_in the Cholesky factor "
                "of the module's calibration input Gram; the LRC factors are then the whitened SVD). 'whitened' needs "
                "calibration batches given with config.with_calibration(batches) before get_peft_model, except when "
                "loading a saved adapter."
            )
        },
    )
    damping: float = field(
        default=DEFAULT_DAMPING,
        metadata={
            "help": "spectra='whitened': Gram damping lambda, the Cholesky factor is that of G / mean(diag G) + "
            "lambda * I (as compress_model's damping)."
        },
    )
    # ---- resolved by get_peft_model; saved so that from_pretrained restores without SVDs ----
    rank_map: dict | None = field(
        default=None,
        metadata={
            "help": "Resolved: {module name: kept rank} for every target (full rank for N-LRCs kept exact). "
            "Written by get_peft_model; do not set by hand."
        },
    )
    lrc_modules: list[str] | None = field(
        default=None, metadata={"help": "Resolved: names of the low-rank components (trainable factor pairs)."}
    )
    achieved_reduction: float | None = field(
        default=None, metadata={"help": "Resolved: achieved effective rank reduction (informational)."}
    )
    welore_threshold: float | None = field(
        default=None, metadata={"help": "Resolved: the global threshold on normalised singular values."}
    )
    calibration_tokens: int | None = field(
        default=None,
        metadata={"help": "Resolved (spectra='whitened'): calibration tokens the input Grams were measured on."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("WELORE_LRC")
        r = self.reduction
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise ValueError(
                f"reduction must be a fraction in (0, 1): the share of the target layers' ranks to remove, e.g. "
                f"reduction=0.3; got {r!r}."
            )
        q = self.lrc_ratio
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
            raise ValueError(
                f"lrc_ratio must be in (0, 1] (a layer is a low-rank component when its kept rank is below "
                f"lrc_ratio * min(out, in); WeLore uses 0.5); got {q!r}."
            )
        if self.nlrc not in ("keep", "truncate"):
            raise ValueError(f"nlrc must be 'keep' or 'truncate', got {self.nlrc!r}.")
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}.")
        if self.spectra not in SPECTRA:
            raise ValueError(
                f"spectra must be 'weights' (data-free WeLore) or 'whitened' (data-aware: spectra of the weights "
                f"whitened by calibration input Grams, see with_calibration), got {self.spectra!r}."
            )
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (d >= 0 and math.isfinite(d)):
            raise ValueError(f"damping must be a finite number >= 0 (default {DEFAULT_DAMPING}), got {d!r}.")
        self.damping = float(d)
        t = self.calibration_tokens
        if t is not None:
            if not _is_int(t) or t < 0:
                raise ValueError(f"calibration_tokens is written by get_peft_model (a token count), got {t!r}.")
            self.calibration_tokens = int(t)
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        if self.rank_pattern is None:
            self.rank_pattern = {}
        if not isinstance(self.rank_pattern, dict):
            raise ValueError(f"rank_pattern must be a dict {{regex: rank}}, got {type(self.rank_pattern).__name__}.")
        self.rank_pattern = _plain_ints(self.rank_pattern)
        for key, rank in self.rank_pattern.items():
            if not isinstance(key, str) or not key:
                raise ValueError(
                    f"rank_pattern keys must be non-empty regex strings matched against the end of module names "
                    f"(e.g. 'q_proj' or 'up_proj|down_proj'), got the key {key!r}."
                )
            check_pattern_key(key)  # raises, naming the key, unless peft can match with it
            if not _is_int(rank) or rank < 1:
                raise ValueError(f"rank_pattern['{key}'] must be a positive int rank, got {rank!r}.")
        sc = self.spectra_cache_dir
        if sc is not None and not isinstance(sc, (str, os.PathLike)):
            raise ValueError(
                f"spectra_cache_dir must be None, '' (no disk cache) or a folder path, got {type(sc).__name__} {sc!r}."
            )
        if isinstance(sc, os.PathLike):
            self.spectra_cache_dir = os.fspath(sc)  # a str, so that adapter_config.json stays serialisable
        if self.rank_map is not None:
            if isinstance(self.rank_map, dict) and not self.rank_map:
                raise ValueError(
                    "rank_map is empty: it is written by get_peft_model (one rank per target module), so pass "
                    "rank_map=None to have it resolved, or a non-empty mapping {module name: rank}."
                )
            if not isinstance(self.rank_map, dict) or not all(
                _is_int(v) and v >= 1 for v in self.rank_map.values()
            ):
                raise ValueError(
                    "rank_map must map module names to positive int ranks; it is written by get_peft_model, so this "
                    "adapter_config.json was edited or corrupted. Re-create the adapter."
                )
            self.rank_map = _plain_ints(self.rank_map)
            lrc = self.lrc_modules or []
            missing = [n for n in lrc if n not in self.rank_map]
            if missing:
                raise ValueError(
                    f"lrc_modules names {missing[:3]} that rank_map lacks: adapter_config.json is inconsistent. "
                    "Re-create the adapter."
                )
        elif self.lrc_modules is not None:
            raise ValueError("lrc_modules is set without rank_map; leave both unset when creating a config.")

    def with_fisher(
        self,
        row_fisher: Mapping[str, torch.Tensor] | None = None,
        col_fisher: Mapping[str, torch.Tensor] | None = None,
    ) -> WeLoreLRCConfig:
        """Weight WeLore by Fisher information (e.g. from a FisherLoRA run); returns ``self``.

        ``get_peft_model`` then thresholds the spectra of ``D_out W D_in`` (``D = diag(fisher_weights(F))``) instead
        of ``W``, and initialises the LRC factors (and truncated N-LRCs) with the Fisher-weighted SVD, so rank goes
        where the data puts weight. The tensors are not saved; the ranks they lead to are (``rank_map``).

        Args:
            row_fisher: ``{module name: (out,) accumulated Fisher per output row}``.
            col_fisher: ``{module name: (in,) accumulated Fisher per input column}``.
        """
        for what, f in (("row_fisher", row_fisher), ("col_fisher", col_fisher)):
            if f is not None and not all(isinstance(v, torch.Tensor) and v.ndim == 1 for v in f.values()):
                raise ValueError(f"{what} must map module names to 1-D tensors of accumulated Fisher.")
        object.__setattr__(self, "_welore_fisher", (dict(row_fisher or {}), dict(col_fisher or {})))
        return self

    def with_calibration(
        self,
        calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
        *,
        grams_in: Mapping[str, torch.Tensor] | None = None,
    ) -> WeLoreLRCConfig:
        """Make WeLore data-aware (``spectra="whitened"``) with calibration batches; returns ``self``.

        ``get_peft_model`` then runs the base model over ``calibration`` (forward passes only, eval mode, no weight
        changes) to collect every target's input Gram ``sum x x^T``, thresholds the spectra of ``W L_in``
        (``L_in L_in^T = G / mean(diag G) + damping * I``) and initialises the LRC factors with the whitened SVD.
        The batches (or Grams) are not saved; the adapter config records ``spectra="whitened"`` and the token
        count, and ``PeftModel.from_pretrained`` loads the adapter without them.

        Args:
            calibration: batches of dicts with ``input_ids`` (and optionally ``attention_mask``), e.g.
                ``hf_lowrank.calibration_batches(tokenizer, texts)`` or a ``DataLoader``.
            grams_in: instead of ``calibration``, input Grams already collected on this model
                (``hf_lowrank.calibration.grams.calibration_grams(model, targets, batches)[0]``).

        Raises:
            ValueError: both or neither given, or batches / Grams of the wrong kind.
        """
        if (calibration is None) == (grams_in is None):
            raise ValueError("with_calibration takes calibration batches or grams_in (input Grams), one of the two.")
        if grams_in is not None and not (
            isinstance(grams_in, Mapping) and all(isinstance(v, torch.Tensor) for v in grams_in.values())
        ):
            raise ValueError("grams_in must map module names to Gram tensors (calibration_grams(...)[0]).")
        if isinstance(calibration, (Mapping, str, torch.Tensor)):
            raise ValueError(
                "calibration must be an iterable of batches (a list of tokenizer outputs or a DataLoader), not one "
                f"{type(calibration).__name__}; wrap a single batch in a list."
            )
        self.spectra = "whitened"
        object.__setattr__(self, "_welore_calibration", (calibration, None if grams_in is None else dict(grams_in)))
        return self
