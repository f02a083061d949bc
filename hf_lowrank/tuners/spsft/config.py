"""Configuration of SPSFT (structured-pruning-based sparse fine-tuning).

SPSFT: Li and Bhaskara, 2025, "An Efficient Sparse Fine-Tuning with Low Quantization Error via Neural Network
Pruning" (first titled "Memory-Efficient Fine-Tuning via Structured Neural Network Pruning"), arXiv:2502.11439.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from peft.config import PeftConfig

from hf_lowrank.targets import check_regex
from hf_lowrank.tuners._registry import ensure_peft_type

from ...ops.importance import rows_for_ratio

__all__ = ["DEFAULT_R", "IMPORTANCE_METHODS", "SPSFTConfig"]

IMPORTANCE_METHODS = ("l2", "taylor", "qm_taylor")
DEFAULT_R = 8


def _check_module_spec(field_name: str, value) -> None:
    """``target_modules`` / ``exclude_modules``: None, a regex string that compiles, or a collection of names.

    Checked here so that a broken regex or a wrong type fails when the config is made, naming the field, rather than
    as ``re.error`` or a ``TypeError`` deep inside peft's module matching.
    """
    if value is None:
        return
    if isinstance(value, str):
        check_regex(value, f"SPSFTConfig.{field_name}={value!r}",
                    "A string is matched as a regex against full module names; pass a list of names (e.g. "
                    "['q_proj', 'v_proj']) instead, or escape the special characters.")
        return
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return
    raise ValueError(
        f"SPSFTConfig.{field_name} must be None, a regex string or a list of module names (e.g. ['q_proj', 'v_proj'])"
        f", got {type(value).__name__} {value!r}."
    )


def _check_layers_to_transform(value) -> None:
    """``layers_to_transform``: None, a layer index, or a list of layer indices (non-negative ints)."""
    if value is None:
        return
    items = [value] if not isinstance(value, (list, tuple)) else list(value)
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise ValueError(
            f"SPSFTConfig.layers_to_transform must be a layer index or a list of layer indices (ints >= 0, e.g. "
            f"[0, 1]), got {value!r}."
        )


@dataclass
class SPSFTConfig(PeftConfig):
    """Configuration of an :class:`~hf_lowrank.tuners.spsft.SPSFTModel`.

    For every target Linear ``W (out, in)`` SPSFT scores the output rows (neurons), keeps the indices of the top ``r``
    as a persistent buffer and trains ``W_f (r, in)`` (zero init) so that ``W_hat = W + M @ W_f`` with ``M`` the fixed
    one-hot row selection. The forward is ``y = base(x); y[..., idx] += x @ W_f.T``; its backward keeps only ``x`` and
    never forms an ``(out, in)`` gradient.

    Importance: ``"l2"`` (data-free, computed by ``get_peft_model``) or the data-driven ``"taylor"`` / ``"qm_taylor"``.
    For the latter, ``get_peft_model`` first picks rows by l2 and :func:`hf_lowrank.spsft_importance` (or
    :class:`~hf_lowrank.tuners.spsft.SPSFTImportanceCallback` in a Trainer) must be run before training to
    re-select them from calibration gradients.
    """

    r: int | None = field(
        default=None,
        metadata={
            "help": (
                "Rows (output neurons) fine-tuned per target module. Mutually exclusive with `ratio`; when neither "
                f"is given, r={DEFAULT_R}. SPSFT r=2k has about the trainable parameters of LoRA r=k."
            )
        },
    )
    ratio: float | None = field(
        default=None,
        metadata={
            "help": (
                "Fraction in (0, 1] of the output rows fine-tuned per target module, max(1, round(ratio * out)). "
                "Mutually exclusive with `r`."
            )
        },
    )
    importance: str = field(
        default="l2",
        metadata={
            "help": (
                "Row importance: 'l2' (row norm, data-free), 'taylor' (|W[i] . dL/dW[i]| over calibration batches) "
                "or 'qm_taylor' (class-aware quantile-mean Taylor of the paper, needs class labels). The data-driven "
                "ones are computed by `hf_lowrank.spsft_importance(model, dataloader, ...)` before training."
            )
        },
    )
    target_modules: Union[list[str], str] | None = field(
        default=None,
        metadata={
            "help": (
                "Module names or a regex of the Linear layers to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'. "
                "Default: 'all-linear' (every Linear except the output / classification head), as in the paper."
            )
        },
    )
    exclude_modules: Union[list[str], str] | None = field(
        default=None,
        metadata={"help": "Module names or a regex of modules not to adapt."},
    )
    layers_to_transform: Union[list[int], int] | None = field(
        default=None,
        metadata={"help": "Only adapt the layers with these indices (an int >= 0 or a list of them, as in LoRA)."},
    )
    layers_pattern: Union[list[str], str] | None = field(
        default=None,
        metadata={
            "help": "Name of the layer list (e.g. 'layers' or 'h'), used with `layers_to_transform` when the "
            "architecture's layer list has an uncommon name."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules besides the SPSFT layers that are fully trained and saved, e.g. ['classifier'] for "
            "sequence classification."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "Initialise W_f to zero (the adapted model equals the base model). False draws small random "
            "values: for tests only."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("SPSFT")
        if self.r is not None and self.ratio is not None:
            raise ValueError(
                f"SPSFTConfig got both r={self.r} and ratio={self.ratio}; pass only one of them "
                "(r: rows per module, ratio: fraction of each module's rows)."
            )
        if self.r is None and self.ratio is None:
            self.r = DEFAULT_R
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1):
            raise ValueError(f"SPSFTConfig.r must be a positive integer, got {self.r!r}; e.g. r=16.")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise ValueError(f"SPSFTConfig.ratio must be a number in (0, 1], got {self.ratio!r}.")
            if not 0.0 < float(self.ratio) <= 1.0:
                raise ValueError(
                    f"SPSFTConfig.ratio must be in (0, 1], got {self.ratio}; e.g. ratio=0.05 fine-tunes 5% of the rows "
                    "of every target module."
                )
            self.ratio = float(self.ratio)
        if self.importance not in IMPORTANCE_METHODS:
            raise ValueError(
                f"Unknown SPSFT importance {self.importance!r}; choose one of {', '.join(IMPORTANCE_METHODS)} "
                "('l2' needs no data)."
            )
        _check_module_spec("target_modules", self.target_modules)
        _check_module_spec("exclude_modules", self.exclude_modules)
        _check_layers_to_transform(self.layers_to_transform)
        lp = self.layers_pattern
        if lp is not None and not (
            isinstance(lp, str) or (isinstance(lp, (list, tuple)) and all(isinstance(p, str) for p in lp))
        ):
            raise ValueError(
                f"SPSFTConfig.layers_pattern must be None, a string or a list of strings naming the layer list (e.g. "
                f"'layers'), got {self.layers_pattern!r}."
            )
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "SPSFTConfig.layers_pattern only applies together with layers_to_transform; pass layers_to_transform "
                "too or drop layers_pattern."
            )
        if (
            isinstance(self.target_modules, str)
            and self.target_modules.lower() != "all-linear"
            and self.layers_to_transform is not None
        ):
            raise ValueError(
                "layers_to_transform cannot be combined with a regex target_modules string; pass target_modules as "
                "a list of names (e.g. ['q_proj', 'v_proj'])."
            )

    @property
    def needs_data(self) -> bool:
        """Whether the row selection needs calibration data (``taylor`` / ``qm_taylor``)."""
        return self.importance != "l2"

    def rows_for(self, out_features: int) -> int:
        """Rows kept in a module with ``out_features`` outputs (``r``, or ``ratio`` of them)."""
        if self.ratio is not None:
            return rows_for_ratio(out_features, self.ratio)
        return int(self.r)
