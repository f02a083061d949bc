"""``CompressionConfig``: what a compression does, in one validated, JSON-serializable object.

The data it weighs by is never part of the config: calibration batches, a Fisher state or Grams are passed to
:func:`hf_lowrank.compress_model` beside it (as peft passes data to ``initialize_lora_eva_weights`` and keeps
``LoraConfig.eva_config`` free of it), so that the config can live inside an ``adapter_config.json``
(``FisherLoRAConfig.compression``) and be written into a checkpoint.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import torch

from ..fisher.state import DEFAULT_EPS, DEFAULT_EXPONENT
from ..ops.fisher import DEFAULT_DAMPING
from ..ops.svd import RANK_MULTIPLE
from ..targets import check_pattern_key

__all__ = ["ALLOCATIONS", "LOSS_NORMALIZATIONS", "SVD_METHODS", "WEIGHTINGS", "CompressionConfig"]

WEIGHTINGS = ("auto", "whitened", "kronecker", "two_sided", "row")
ALLOCATIONS = ("auto", "uniform", "global")
LOSS_NORMALIZATIONS = ("auto", "none", "relative")
SVD_METHODS = ("auto", "exact", "randomized")


def _int(value):
    """numpy integers (``np.int64`` from an array of ranks) are ints; bools are not."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def _is_keep(value) -> bool:
    return isinstance(value, float) and 0 < value <= 1


def _number(value, name: str, *, low: float, strict: bool, hint: str) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g} ({hint}), got {value!r}.")
    return float(value)


def _choice(value, name: str, choices: tuple[str, ...], hint: str = "") -> str:
    value = "auto" if value is None and "auto" in choices else value
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}{hint}, got {value!r}.")
    return value


def dtype_name(dtype) -> str | None:
    """``"bfloat16"`` for ``torch.bfloat16`` or ``"bfloat16"``; ``None`` for None; ``ValueError`` for anything that is
    not a floating torch dtype."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if not isinstance(name, str) or not isinstance(getattr(torch, name, None), torch.dtype) \
            or not getattr(torch, name).is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype or its name, e.g. torch.bfloat16 or 'bfloat16', got {dtype!r}."
        )
    return name


@dataclass
class CompressionConfig:
    """How to compress the Linear layers of a model into low-rank factor pairs.

    Every module is factorized by one weighted low-rank solver (:func:`hf_lowrank.ops.fisher.weighted_lowrank`): the
    rank-``k`` minimiser of ``||L_out^T (W - W_hat) L_in||_F``, each side the identity (plain SVD), a diagonal from
    a Fisher (FWSVD, Hsu et al. 2022, arXiv:2207.00112) or the Cholesky factor of a Gram (truncation-aware whitening,
    SVD-LLM, Wang et al. 2024, arXiv:2403.07378; with output-gradient Grams too, the Kronecker-factored Fisher of
    K-FAC, Martens and Grosse 2015, arXiv:1503.05671). Where the weights come from is the ``weighting`` field and the
    data passed to :func:`hf_lowrank.compress_model`.

    Give one of ``keep`` and ``rank``, optionally with ``rank_pattern``; or ``rank_pattern`` alone (its keys then
    choose the targets). A config with none of them is valid (e.g. a ``FisherLoRAConfig`` that trains without
    compressing); compressing with it is refused.
    """

    #: Fraction of the target modules' parameters kept, a float in ``(0, 1]``: per module with
    #: ``allocation="uniform"`` (``rank = floor(keep * out * in / (out + in))``, in multiples of ``rank_multiple``),
    #: over all targets together with ``"global"``. Exclusive with ``rank``.
    keep: float | None = None
    #: One absolute rank (an int >= 1) for every target module. Exclusive with ``keep``.
    rank: int | None = None
    #: ``{key: rank (int) or keep (float)}`` per module, peft's ``LoraConfig.rank_pattern`` rule: a key is a regular
    #: expression matched against the end of a module name on a dot boundary (a full name or a suffix such as
    #: ``"up_proj"``), the first matching key wins, a key that matches no target is refused.
    rank_pattern: dict = field(default_factory=dict)
    #: Which Linear layers to compress (see :func:`hf_lowrank.find_target_linears`): ``None`` (every Linear in the
    #: transformer blocks; with a Fisher state its modules; with ``rank_pattern`` alone the layers its keys match),
    #: a name list, suffixes, a regex string or ``"all-linear"``.
    target_modules: str | list[str] | None = None
    #: What each module's error is weighed by. ``"auto"``: the measured-best choice for the data given (a Fisher
    #: state: ``"kronecker"`` when it holds Grams, else ``"two_sided"``; calibration batches: ``"kronecker"`` for a
    #: causal language model, else and with ``sequential`` ``"whitened"``; no data: plain SVD). ``"whitened"``:
    #: input Grams of calibration batches (forward passes only). ``"kronecker"``: input Grams and Grams of the loss
    #: gradients at each module's output (calibration: one forward and backward pass per batch, weights frozen; a
    #: Fisher state: the Grams collected in training). ``"two_sided"`` / ``"row"``: the diagonal Fisher of a Fisher
    #: state (column and row sums / row sums).
    weighting: str = "auto"
    #: ``"uniform"`` (the same fraction in every module), ``"global"`` (per-module ranks minimising the summed
    #: weighted truncation loss under one parameter budget; needs ``keep``) or ``"auto"``: ``"global"`` for a keep
    #: weighted by output-gradient Grams (their losses are on the scale of the model's loss, so they compare across
    #: modules), else ``"uniform"``.
    allocation: str = "auto"
    #: With ``"global"``: ``"none"`` (raw weighted losses), ``"relative"`` (each module's loss over its weighted norm)
    #: or ``"auto"``: ``"none"`` when the output side is weighted, else ``"relative"``.
    loss_normalization: str = "auto"
    #: Gram damping ``lambda`` (``G / mean(diag G) + lambda I``), >= 0.
    damping: float = DEFAULT_DAMPING
    #: Calibration Grams of sides wider than this keep their diagonal only (memory); ``None``: always full.
    max_gram_dim: int | None = None
    #: With calibration batches: compress block by block, each block's input Grams measured on the outputs of the
    #: blocks already compressed before it (one block's Grams in memory at a time). Whitened, uniform ranks only.
    sequential: bool = False
    #: Ranks chosen from a keep fraction are multiples of this (aligned inner dimensions run at their FLOP ratio);
    #: 1 turns it off. Explicit ranks are used as given.
    rank_multiple: int = RANK_MULTIPLE
    #: The truncated SVD: ``"auto"``, ``"exact"`` or ``"randomized"``.
    svd_method: str = "auto"
    #: Diagonal Fisher weighting ``D = (F / mean(F) + fisher_eps) ** fisher_exponent`` (0.5 is FWSVD's sqrt), >= 0.
    fisher_exponent: float = DEFAULT_EXPONENT
    #: Floor of the normalised diagonal Fisher, > 0: rows without Fisher keep a small positive weight.
    fisher_eps: float = DEFAULT_EPS
    #: dtype of the factors, by name (``"bfloat16"``; a ``torch.dtype`` is converted); ``None``: the replaced
    #: weight's dtype (float32 for a quantized one).
    dtype: str | None = None
    #: Store the factors as group-wise integer codes of this many bits (2..8; 4 and 8 are usual), fitted by
    #: :func:`hf_lowrank.ops.quant_lowrank.quantize_factor_pair` (``down`` rounded, ``up`` refitted to the weighted
    #: target, then rounded) and held by :class:`hf_lowrank.quantized_modules.QuantizedLowRankLinear`, which
    #: dequantizes them on every forward (bytes saved, not time). ``None``: float factors. Every factor shares the
    #: bit width, so the parameter budget of the allocation is also its budget in bytes for the factors; a module
    #: the allocation keeps dense stays in its own dtype (the report's bytes say what it costs).
    factor_bits: int | None = None
    #: With ``factor_bits``: codes per fp16 scale and offset, along each factor's input dimension (the GEMM's
    #: reduction axis), >= 1.
    group_size: int = 64

    def __post_init__(self) -> None:
        self.keep = _int(self.keep)
        if isinstance(self.keep, int) and not isinstance(self.keep, bool):
            self.keep = float(self.keep)  # keep=1 means 1.0; keep=8 is refused below as a fraction
        if self.keep is not None and not _is_keep(self.keep):
            raise ValueError(
                f"keep is the fraction of parameters kept and must be a float in (0, 1], got {self.keep!r}. "
                "Use rank= for an absolute rank."
            )
        self.rank = _int(self.rank)
        if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"rank {self.rank!r} is out of range: it must be an int >= 1 (use keep= for a fraction "
                             "of parameters).")
        if self.rank is not None and self.keep is not None:
            raise ValueError(
                f"Give rank={self.rank!r} or keep={self.keep!r}, not both: an absolute rank, or a fraction of "
                "parameters kept (override single modules with rank_pattern)."
            )
        self.rank_pattern = self._checked_pattern(self.rank_pattern)
        self.target_modules = self._checked_targets(self.target_modules)
        self.weighting = _choice(self.weighting, "weighting", WEIGHTINGS)
        self.allocation = _choice(self.allocation, "allocation", ALLOCATIONS)
        self.loss_normalization = _choice(self.loss_normalization, "loss_normalization", LOSS_NORMALIZATIONS)
        self.svd_method = _choice(self.svd_method, "svd_method", SVD_METHODS)
        if self.allocation == "global" and (self.keep is None or self.rank_pattern):
            got = f"rank={self.rank!r}" if self.rank is not None else "no keep"
            raise ValueError(
                "allocation='global' spreads one parameter budget over all targets: set a float keep fraction "
                f"(e.g. keep=0.8) and no rank_pattern, got {got}"
                + (f" and rank_pattern={self.rank_pattern!r}." if self.rank_pattern else ".")
            )
        self.damping = _number(self.damping, "damping", low=0.0, strict=False, hint=f"default {DEFAULT_DAMPING:g}")
        max_dim = _int(self.max_gram_dim)
        if max_dim is not None and not (isinstance(max_dim, int) and max_dim >= 1):
            raise ValueError(f"max_gram_dim must be None (full Grams) or an int >= 1, got {self.max_gram_dim!r}.")
        self.max_gram_dim = max_dim
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be True or False, got {self.sequential!r}.")
        if self.sequential and self.allocation == "global":
            raise ValueError(
                "sequential=True compresses block by block with ranks fixed in advance: use allocation='uniform' "
                "(or a rank_pattern), or sequential=False for the global allocation."
            )
        multiple = _int(self.rank_multiple)
        if not (isinstance(multiple, int) and multiple >= 1):
            raise ValueError(f"rank_multiple must be an int >= 1 (1 turns rounding off), got {self.rank_multiple!r}.")
        self.rank_multiple = multiple
        self.fisher_exponent = _number(self.fisher_exponent, "fisher_exponent", low=0.0, strict=False,
                                       hint="0.5 is FWSVD's square root")
        self.fisher_eps = _number(self.fisher_eps, "fisher_eps", low=0.0, strict=True, hint=f"default {DEFAULT_EPS:g}")
        self.dtype = dtype_name(self.dtype)
        bits = _int(self.factor_bits)
        if bits is not None and not (isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 8):
            raise ValueError(f"factor_bits must be None (float factors) or an int in [2, 8] (4 or 8 are usual), got "
                             f"{self.factor_bits!r}.")
        self.factor_bits = bits
        group = _int(self.group_size)
        if not (isinstance(group, int) and not isinstance(group, bool) and group >= 1):
            raise ValueError(f"group_size must be an int >= 1 (codes per scale, e.g. 64), got {self.group_size!r}.")
        self.group_size = group

    @staticmethod
    def _checked_pattern(pattern) -> dict:
        if pattern is None:
            return {}
        if not isinstance(pattern, Mapping):
            raise ValueError(
                f"rank_pattern must be a dict {{module key: rank or keep fraction}}, got {type(pattern).__name__}."
            )
        checked = {}
        for key, value in pattern.items():
            check_pattern_key(key, "rank_pattern")
            value = _int(value)
            if not ((isinstance(value, int) and value >= 1) or _is_keep(value)):
                raise ValueError(
                    f"rank_pattern[{key!r}] = {value!r}: use an int rank >= 1 or a float keep fraction in (0, 1]."
                )
            checked[key] = value
        return checked

    @staticmethod
    def _checked_targets(targets):
        if targets is None or isinstance(targets, str):
            return targets
        if isinstance(targets, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in targets):
            return sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
        raise ValueError(
            f"target_modules must be None, a string (regex or 'all-linear') or a list of module names / suffixes, got "
            f"{targets!r}."
        )

    @property
    def has_target(self) -> bool:
        """Whether the config says how much to compress (a rank, a keep fraction or a rank pattern)."""
        return self.rank is not None or self.keep is not None or bool(self.rank_pattern)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """:attr:`dtype` as a ``torch.dtype`` (``None`` stays ``None``)."""
        return getattr(torch, self.dtype) if self.dtype is not None else None

    def to_dict(self) -> dict:
        """The fields as plain JSON values (for ``adapter_config.json`` and checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> CompressionConfig:
        """The config :meth:`to_dict` wrote; an unknown key is refused (a config of a newer hf-lowrank)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"A CompressionConfig is read from a dict, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown CompressionConfig field(s) {unknown}: written by a newer hf-lowrank or misspelled. Known "
                f"fields: {sorted(known)}."
            )
        return cls(**dict(data))
