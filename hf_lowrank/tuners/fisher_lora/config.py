"""Configuration of FisherLoRA: LoRA training that also collects the Fisher information FWSVD compression needs."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType

from peft import LoraConfig

from ...compression.config import SVD_METHODS, CompressionConfig
from ...fisher.state import DEFAULT_EPS, DEFAULT_EXPONENT, DEFAULT_LORA_WEIGHTING, DEFAULT_WEIGHTING
from ...ops.fisher import DEFAULT_DAMPING
from ...targets import check_pattern_key
from .._registry import ensure_peft_type

__all__ = [
    "DEFAULT_ALLOCATION",
    "DEFAULT_EPS",
    "DEFAULT_EXPONENT",
    "DEFAULT_LORA_WEIGHTING",
    "DEFAULT_WEIGHTING",
    "FISHER_SOURCES",
    "NO_CONFIG_DEFAULTS",
    "FISHER_WEIGHTINGS",
    "FisherLoRAConfig",
    "default_allocation",
    "default_weighting",
]

FISHER_SOURCES = ("lora", "full", "none")
FISHER_WEIGHTINGS = ("row", "two_sided", "kronecker")
_ALLOCATIONS = ("uniform", "global")

# The weighting defaults (DEFAULT_LORA_WEIGHTING, DEFAULT_WEIGHTING, DEFAULT_EXPONENT, DEFAULT_EPS) are spelled in
# hf_lowrank/fisher/state.py, which compression reads too; FisherLoRAConfig resolves its None fields with them here.
DEFAULT_ALLOCATION = "uniform"
"""``compress_allocation`` when the global budget does not apply (see :func:`default_allocation`)."""


def default_weighting(fisher_source: str) -> str:
    """``fisher_weighting`` that ``fisher_weighting=None`` resolves to for ``fisher_source``."""
    return DEFAULT_LORA_WEIGHTING if fisher_source == "lora" else DEFAULT_WEIGHTING


def default_allocation(fisher_weighting: str, compress_keep: float | None, compress_rank_pattern) -> str:
    """``compress_allocation`` that ``None`` resolves to: ``"global"`` with kronecker weighting, a ``compress_keep``
    budget and no per-module pattern (measured best), else :data:`DEFAULT_ALLOCATION`."""
    if fisher_weighting == "kronecker" and compress_keep is not None and not compress_rank_pattern:
        return "global"
    return DEFAULT_ALLOCATION
_NORMALIZATIONS = ("none", "relative")
#: ``{FisherLoRAConfig field: (CompressionConfig field, the field's default, deprecated)}``: the compression settings
#: before ``FisherLoRAConfig.compression``. ``fisher_exponent`` / ``fisher_eps`` stay FisherLoRA fields (the Fisher's
#: own weighting) and are copied into the sub-config.
_LEGACY_FIELDS = {
    "compress_rank": ("rank", None, True),
    "compress_keep": ("keep", None, True),
    "compress_rank_pattern": ("rank_pattern", {}, True),
    "compress_allocation": ("allocation", None, True),
    "compress_damping": ("damping", DEFAULT_DAMPING, True),
    "compress_loss_normalization": ("loss_normalization", "none", True),
    "compress_dtype": ("dtype", None, True),
    "compress_svd_method": ("svd_method", "auto", True),
    "fisher_exponent": ("fisher_exponent", DEFAULT_EXPONENT, False),
    "fisher_eps": ("fisher_eps", DEFAULT_EPS, False),
}
_DTYPES = ("float32", "float16", "bfloat16")

# Registered here as well as in __init__ so that the config class can set its peft_type on its own.
ensure_peft_type("FISHER_LORA")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_FP16_MAX = 65504.0  # the LoRA scale multiplies activations in the compute dtype, float16 at the narrowest


def _is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_keep(x) -> bool:
    return isinstance(x, float) and 0 < x <= 1


@dataclass
class FisherLoRAConfig(LoraConfig):
    """FisherLoRA: FWSVD compression with Fisher information from LoRA adapters (Moskovskiy, Pletenev, Zagoruyko and
    Panchenko 2025, "Memory Efficient LM Compression using Fisher Information from Low-Rank Representations", NLDB;
    FWSVD: Hsu et al. 2022, arXiv:2207.00112).

    Everything :class:`peft.LoraConfig` has (the adapter layers ARE peft LoRA layers, their weights stay
    LoRA-compatible; see :meth:`to_lora_config`), plus where compression goes, where its Fisher comes from, and how
    the Fisher weights the SVD. Training collects ``sum grad(A)**2`` and ``sum grad(B)**2`` per micro-batch
    (``FisherCollectorCallback``, attached by ``LowRankTrainer``); saving compresses every adapted Linear with
    Fisher-weighted SVD.

    Pipelines (the paper's section 5.3): ``merge_before_compress=True`` (default, "VRAM-unlimited"): train LoRA on the
    task, merge ``dW`` into ``W``, compress ``W + dW``. ``False`` ("VRAM-limited"): the base is already fine-tuned;
    LoRA only collects Fisher and the original ``W`` is compressed. A bitsandbytes 4-bit base (QLoRA) is dequantized
    at compression time and saved in ``compression.dtype``.

    Compression: ``compression=CompressionConfig(keep=0.8)`` (or ``rank=``, ``rank_pattern=``, ...; a dict in
    ``adapter_config.json``, as peft's ``LoraConfig.eva_config``). Without a target there the trainer saves the
    adapter and the Fisher state, and compression is left to ``compress_peft_model`` or
    ``hf-lowrank compress --method fwsvd --fisher``. The former ``compress_*`` fields are deprecated aliases of its
    fields (one release) and mirror it in the saved file.
    """

    compress_rank: int | None = field(
        default=None,
        metadata={"help": "Rank kept in every compressed module (an int >= 1). Exclusive with compress_keep."},
    )
    compress_keep: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of each compressed module's parameters kept, in (0, 1]: rank = floor(keep * out * in / "
            "(out + in)). Exclusive with compress_rank."
        },
    )
    compress_rank_pattern: dict = field(
        default_factory=dict,
        metadata={
            "help": "Per-module override {key: rank (int) or keep fraction (float)}; keys match as in rank_pattern "
            "(peft's rule: a regex matched against the end of the module name on a dot boundary; the first wins)."
        },
    )
    fisher_source: str = field(
        default="lora",
        metadata={
            "help": "Where the Fisher comes from: 'lora' (grad(A)**2 and grad(B)**2 of the adapters, the paper), "
            "'full' (grad(W)**2 of the adapted dense weights: the full-gradient FWSVD baseline, needs full-size "
            "gradient memory), 'none' (no Fisher: plain truncated SVD baseline)."
        },
    )
    fisher_weighting: str | None = field(
        default=None,
        metadata={
            "help": "'kronecker' (the default with fisher_source='lora'): the Kronecker-factored Fisher, Grams of "
            "each adapted layer's input and of the gradient at its output collected during LoRA training "
            "(whitening on both sides: K-FAC, Martens and Grosse 2015, arXiv:1503.05671; GFWSVD, Chekalina et al. 2025, "
            "arXiv:2505.17974); 'two_sided' (the default otherwise): output weights "
            "from F_B.sum(1) and input weights from F_A.sum(0) (the authors' code); 'row': output-row weights from "
            "F_B @ F_A.sum(1) (paper eq. 4/6, FWSVD). The default is the measured best "
            "(benchmarks/compression_quality.py)."
        },
    )
    kronecker_max_dim: int | str | None = field(
        default="hidden_size",
        metadata={
            "help": "With fisher_weighting='kronecker': a side (input or output) wider than this keeps only the "
            "diagonal of its Gram (memory per module is in^2 + out^2 floats with full Grams). Default "
            "'hidden_size': the model's hidden size (config.hidden_size / d_model / n_embd), i.e. full Grams on the "
            "residual-stream sides, the diagonal on the wider MLP sides (SmolLM2: 576 full, 1536 diagonal; a 7B "
            "Llama: 4096 full, 11008 diagonal): a fraction of the Gram memory for a small loss of quality "
            "(benchmarks/compression_quality.py). An int: that width. None: always full."
        },
    )
    kronecker_device: str | None = field(
        default=None,
        metadata={"help": "Where the Kronecker Grams accumulate: None (the adapter's device) or 'cpu'."},
    )
    compress_allocation: str | None = field(
        default=None,
        metadata={
            "help": "'uniform': compress_keep of every module's parameters; 'global': one budget (compress_keep of "
            "all adapted modules' parameters) spread by the summed Fisher-weighted truncation loss "
            "(hf_lowrank.ops.rank_allocation.global_ranks); needs compress_keep. None: 'global' with "
            "fisher_weighting='kronecker' and compress_keep (measured best), else 'uniform'."
        },
    )
    compress_damping: float = field(
        default=DEFAULT_DAMPING,
        metadata={"help": "Damping lambda of the Kronecker Grams: G / mean(diag G) + lambda * I. >= 0."},
    )
    compress_loss_normalization: str = field(
        default="none",
        metadata={"help": "With compress_allocation='global': 'none' (raw losses) or 'relative' (per module)."},
    )
    fisher_exponent: float = field(
        default=DEFAULT_EXPONENT,
        metadata={"help": "Weights are (fisher / mean + eps) ** exponent; 0.5 is FWSVD's sqrt(F). >= 0."},
    )
    fisher_eps: float = field(
        default=DEFAULT_EPS,
        metadata={"help": "Floor of the normalised Fisher, > 0: rows without Fisher keep a small positive weight."},
    )
    merge_before_compress: bool = field(
        default=True,
        metadata={
            "help": "True: merge the trained LoRA delta into W, then compress (VRAM-unlimited pipeline). False: "
            "compress the original W with the LoRA Fisher (VRAM-limited pipeline, base already fine-tuned)."
        },
    )
    compress_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype of the saved compressed model: 'float32', 'bfloat16' or 'float16'. None keeps the model's "
            "floating dtype (a 4-bit base is saved in its non-quantized parameters' dtype)."
        },
    )
    compress_svd_method: str = field(
        default="auto",
        metadata={"help": "SVD used for compression: 'auto', 'exact' or 'randomized'."},
    )
    compression: CompressionConfig | dict | None = field(
        default=None,
        metadata={
            "help": "How the trained model is compressed: a hf_lowrank.CompressionConfig (a dict in "
            "adapter_config.json), e.g. CompressionConfig(keep=0.8). Its weighting is fisher_weighting's ('auto'). "
            "None: no compression target, the trainer saves the adapter and the Fisher state. Replaces the "
            "compress_* fields, which still work for one release (a DeprecationWarning) and mirror it."
        },
    )

    def __post_init__(self):
        self._validate_lora_fields()  # before peft's own __post_init__, which does not check them
        super().__post_init__()
        self.peft_type = ensure_peft_type("FISHER_LORA")
        self._validate_fisher_fields()

    def _validate_lora_fields(self) -> None:
        """The inherited LoRA fields whose bad values peft only meets deep in torch (or never).

        ``r`` sizes the adapter tensors (a float, a string or None fails inside ``torch.empty`` or a comparison,
        without naming ``r``); ``lora_alpha`` sets the scale ``lora_alpha / r`` (NaN or inf make the fresh adapter's
        output ``0 * inf = NaN``, and its Fisher useless). The per-module ``rank_pattern`` / ``alpha_pattern`` follow
        the same rules.
        """
        if not (_is_int(self.r) and self.r >= 1):
            raise ValueError(f"r (the LoRA rank) must be a positive int, e.g. r=8; got {self.r!r}.")
        if not _is_finite_number(self.lora_alpha):
            raise ValueError(
                f"lora_alpha must be a finite number (the LoRA scale is lora_alpha / r; e.g. lora_alpha=2 * r), got "
                f"{self.lora_alpha!r}."
            )
        scale = self.lora_alpha / (math.sqrt(self.r) if getattr(self, "use_rslora", False) else self.r)
        if abs(scale) > _FP16_MAX:
            raise ValueError(
                f"lora_alpha={self.lora_alpha!r} gives a LoRA scale of {scale:.3g}, beyond what 16-bit (and, past "
                "3.4e38, 32-bit) arithmetic holds: the adapter output would be inf/NaN. Use a scale of order 1, "
                "e.g. lora_alpha=2 * r."
            )
        checks = (
            ("rank_pattern", "a positive int rank (like r)", lambda v: _is_int(v) and v >= 1),
            ("alpha_pattern", "a finite number (like lora_alpha)", _is_finite_number),
        )
        for name, rule, ok in checks:
            pattern = getattr(self, name, None)
            if pattern is None:
                continue
            if not isinstance(pattern, dict):
                raise ValueError(f"{name} must be a dict {{module key: value}}, got {type(pattern).__name__}.")
            for key, value in pattern.items():
                if not ok(value):
                    raise ValueError(f"{name}[{key!r}] must be {rule}, got {value!r}.")

    def _validate_fisher_fields(self) -> None:
        legacy = {old: getattr(self, old) for old, (_, default, _) in _LEGACY_FIELDS.items()
                  if getattr(self, old) != default}
        if self.fisher_weighting is None:
            self.fisher_weighting = default_weighting(self.fisher_source)
        if self.compress_allocation is None:
            self.compress_allocation = default_allocation(
                self.fisher_weighting, self.compress_keep, self.compress_rank_pattern
            )
        if self.compress_rank is not None and self.compress_keep is not None:
            raise ValueError(
                f"FisherLoRAConfig got both compress_rank={self.compress_rank!r} and compress_keep="
                f"{self.compress_keep!r}; set only one of them (a rank, or a fraction of parameters kept)."
            )
        if self.compress_rank is not None and not (_is_int(self.compress_rank) and self.compress_rank >= 1):
            raise ValueError(f"compress_rank must be an integer >= 1, got {self.compress_rank!r}.")
        if isinstance(self.compress_keep, int) and not isinstance(self.compress_keep, bool):
            self.compress_keep = float(self.compress_keep)
        if self.compress_keep is not None and not _is_keep(self.compress_keep):
            raise ValueError(
                f"compress_keep is the fraction of parameters kept and must be a float in (0, 1], got "
                f"{self.compress_keep!r}. Use compress_rank for an absolute rank."
            )
        if not isinstance(self.compress_rank_pattern, dict):
            raise ValueError(
                f"compress_rank_pattern must be a dict {{module key: rank or keep fraction}}, got "
                f"{type(self.compress_rank_pattern).__name__}."
            )
        for key, value in self.compress_rank_pattern.items():
            check_pattern_key(key, "compress_rank_pattern")
            if not ((_is_int(value) and value >= 1) or _is_keep(value)):
                raise ValueError(
                    f"compress_rank_pattern[{key!r}] = {value!r}: use an int rank >= 1 or a float keep fraction in "
                    "(0, 1]."
                )
        if self.fisher_source not in FISHER_SOURCES:
            raise ValueError(
                f"fisher_source must be one of {FISHER_SOURCES} ('lora': the paper; 'full': full-gradient FWSVD; "
                f"'none': plain SVD), got {self.fisher_source!r}."
            )
        if self.fisher_weighting not in FISHER_WEIGHTINGS:
            raise ValueError(
                f"fisher_weighting must be 'row' (paper eq. 4/6), 'two_sided' (authors' code) or 'kronecker' (input x "
                f"output-gradient Grams, K-FAC), got {self.fisher_weighting!r}."
            )
        if self.compress_allocation not in _ALLOCATIONS:
            raise ValueError(f"compress_allocation must be one of {_ALLOCATIONS}, got {self.compress_allocation!r}.")
        if self.compress_allocation == "global" and self.compress_keep is None:
            raise ValueError(
                "compress_allocation='global' spreads one parameter budget over all modules: set compress_keep "
                "(e.g. 0.8), not compress_rank."
            )
        if self.compress_loss_normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"compress_loss_normalization must be one of {_NORMALIZATIONS}, got {self.compress_loss_normalization!r}."
            )
        if not (isinstance(self.compress_damping, (int, float)) and 0 <= self.compress_damping < math.inf):
            raise ValueError(f"compress_damping must be a finite number >= 0 (default 1e-4), got {self.compress_damping!r}.")
        if self.kronecker_max_dim not in (None, "hidden_size") and not (
            _is_int(self.kronecker_max_dim) and self.kronecker_max_dim >= 1
        ):
            raise ValueError(
                f"kronecker_max_dim must be None, 'hidden_size' or an int >= 1, got {self.kronecker_max_dim!r}."
            )
        if self.kronecker_device not in (None, "cpu"):
            raise ValueError(f"kronecker_device must be None (the adapter's device) or 'cpu', got {self.kronecker_device!r}.")
        if self.fisher_weighting == "kronecker" and self.fisher_source != "lora":
            raise ValueError("fisher_weighting='kronecker' collects Grams during LoRA training: use fisher_source='lora'.")
        if not (isinstance(self.fisher_exponent, (int, float)) and 0 <= self.fisher_exponent < math.inf):
            raise ValueError(f"fisher_exponent must be a finite number >= 0 (0.5 = FWSVD), got {self.fisher_exponent!r}.")
        if not (isinstance(self.fisher_eps, (int, float)) and 0 < self.fisher_eps < math.inf):
            raise ValueError(f"fisher_eps must be a finite number > 0 (default 1e-6), got {self.fisher_eps!r}.")
        if self.compress_dtype is not None and self.compress_dtype not in _DTYPES:
            raise ValueError(f"compress_dtype must be None or one of {_DTYPES}, got {self.compress_dtype!r}.")
        if self.compress_svd_method not in SVD_METHODS:
            raise ValueError(f"compress_svd_method must be one of {SVD_METHODS}, got {self.compress_svd_method!r}.")
        self._merge_compression(legacy)
        if self.use_dora:
            raise ValueError(
                "FisherLoRA does not support use_dora=True: a DoRA update is not the additive B @ A whose Fisher "
                "FWSVD uses. Set use_dora=False."
            )
        if getattr(self, "lora_bias", False):
            raise ValueError("FisherLoRA does not support lora_bias=True (the bias delta is not compressed). Set it "
                             "to False.")

    def _merge_compression(self, legacy: dict) -> None:
        """``compression`` from a dict, or from the deprecated ``compress_*`` fields; then those fields mirror it.

        A file this version wrote holds both, alike (older versions read the mirrored fields); both set and unlike
        is refused."""
        if isinstance(self.compression, Mapping):
            self.compression = CompressionConfig.from_dict(self.compression)
        elif self.compression is not None and not isinstance(self.compression, CompressionConfig):
            raise ValueError(f"compression must be a hf_lowrank.CompressionConfig, its dict or None, got "
                             f"{type(self.compression).__name__}.")
        if self.compression is None and legacy:
            deprecated = sorted(k for k in legacy if _LEGACY_FIELDS[k][2])
            if deprecated:
                warnings.warn(
                    f"FisherLoRAConfig({', '.join(f'{k}=...' for k in deprecated)}) is deprecated and will be removed "
                    f"in the next release: use compression=CompressionConfig("
                    f"{', '.join(f'{_LEGACY_FIELDS[k][0]}=...' for k in deprecated)}).",
                    DeprecationWarning, stacklevel=4,
                )
            self.compression = CompressionConfig(**{_LEGACY_FIELDS[k][0]: v for k, v in legacy.items()})
        if self.compression is None:
            return
        copied = {new: legacy[old] for old, (new, default, deprecated) in _LEGACY_FIELDS.items()
                  if not deprecated and old in legacy and getattr(self.compression, new) == default}
        if copied:  # the Fisher's own weighting, set on FisherLoRAConfig: used by the sub-config too
            self.compression = dataclasses.replace(self.compression, **copied)
        if self.compression.dtype not in (None, *_DTYPES):
            raise ValueError(f"compression.dtype must be None or one of {_DTYPES} for a FisherLoRA model, got "
                             f"{self.compression.dtype!r}.")
        if self.compression.weighting not in ("auto", self.fisher_weighting):
            raise ValueError(
                f"compression.weighting={self.compression.weighting!r} but fisher_weighting={self.fisher_weighting!r}"
                ": the weighting is the Fisher collected in training; set fisher_weighting and leave "
                "compression.weighting='auto'."
            )
        mirror = self._mirror(self.compression)
        unlike = {k: v for k, v in legacy.items() if mirror[k] != v and not (k == "compress_allocation" and v is None)}
        if unlike:
            name = next(iter(unlike))
            raise ValueError(
                f"{name}={unlike[name]!r} disagrees with compression.{_LEGACY_FIELDS[name][0]}="
                f"{getattr(self.compression, _LEGACY_FIELDS[name][0])!r}: set compression only (the compress_* "
                "fields are its deprecated aliases)."
            )
        for key, value in mirror.items():
            setattr(self, key, value)

    def _mirror(self, compression: CompressionConfig) -> dict:
        """The deprecated fields' values that say what ``compression`` says (its ``"auto"``s resolved as here)."""
        values = {old: getattr(compression, new) for old, (new, _, _) in _LEGACY_FIELDS.items()}
        values["compress_rank_pattern"] = dict(compression.rank_pattern)
        if compression.allocation == "auto":
            values["compress_allocation"] = default_allocation(self.fisher_weighting, compression.keep,
                                                               compression.rank_pattern)
        if compression.loss_normalization == "auto":
            values["compress_loss_normalization"] = "none"
        return values

    def resolved_compression(self) -> CompressionConfig:
        """The compression this adapter's config asks for, with its ``"auto"`` allocation and loss normalization
        resolved as for a FisherLoRA state (a :class:`CompressionConfig` without a target when none is set)."""
        base = self.compression or CompressionConfig(fisher_exponent=self.fisher_exponent, fisher_eps=self.fisher_eps)
        mirror = self._mirror(base)
        return dataclasses.replace(base, allocation=mirror["compress_allocation"],
                                   loss_normalization=mirror["compress_loss_normalization"])

    @property
    def has_compression_target(self) -> bool:
        """Whether the config says how much to compress (a rank, a keep fraction or a rank pattern)."""
        return self.compression is not None and self.compression.has_target

    def to_lora_config(self):
        """The same adapter as a vanilla :class:`peft.LoraConfig` (the FisherLoRA fields dropped).

        The adapter weights are peft LoRA weights (``lora_A`` / ``lora_B`` with the same names and shapes), so
        ``PeftModel.from_pretrained(base, folder, config=cfg.to_lora_config())`` loads a FisherLoRA adapter folder
        with plain peft; :func:`hf_lowrank.save_as_lora` writes such a folder.
        """
        names = {f.name for f in fields(LoraConfig) if f.init}
        kwargs = {k: v for k, v in self.to_dict().items() if k in names and k != "peft_type"}
        return LoraConfig(**kwargs)


def _fisher_field_names() -> set[str]:
    lora = {f.name for f in fields(LoraConfig)}
    return {f.name for f in fields(FisherLoRAConfig)} - lora


FISHER_FIELDS: frozenset[str] = frozenset(_fisher_field_names())


NO_CONFIG_DEFAULTS: Mapping[str, object] = MappingProxyType(
    {
        **{f.name: f.default for f in fields(FisherLoRAConfig) if f.name in FISHER_FIELDS and f.default is not MISSING},
        "fisher_weighting": DEFAULT_WEIGHTING,
        "compress_allocation": DEFAULT_ALLOCATION,
    }
)
"""The FisherLoRA settings compression uses for an adapter without a :class:`FisherLoRAConfig` (a vanilla
``LoraConfig``): the config's field defaults, with :data:`DEFAULT_WEIGHTING` (no Grams were collected) and
:data:`DEFAULT_ALLOCATION`."""
