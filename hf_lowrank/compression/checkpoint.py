"""Factorized checkpoints that round-trip through ``save_pretrained`` / ``from_pretrained``.

A compressed model's ``config.json`` carries ``quantization_config = {"quant_method": "hf_lowrank", "ranks":
{module: rank}, ...}``. hf-lowrank registers a transformers quantizer plugin for that method, which rebuilds the
``LowRankLinear`` modules on the meta device before the weights load. No ``trust_remote_code`` and nothing unusual in
the repo files, so the same checkpoint works from a local folder or the Hub, once ``hf_lowrank`` is imported.

Without the import, stock transformers skips the unknown ``quantization_config`` with a warning and builds the dense
model; the guard tensors every save writes (see below) then make ``from_pretrained`` raise a size-mismatch error, and
its load report lists ``hf_lowrank_factorized_checkpoint.import_hf_lowrank_before_from_pretrained``: it refuses the
checkpoint rather than loading random weights. :func:`load_compressed` (and the CLI) always import the plugin and
also verify that every factor loaded.

A compressed model reports ``is_quantized = False`` to transformers: its factors are ordinary floating-point
weights, so ``model.half()`` / ``model.float()`` cast them like ``model.to(dtype)`` does (transformers refuses both
for a model whose weights are quantized).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._compat import add_keys_to_ignore_on_load_unexpected
from ..cards import write_model_card_for
from ..fisher.state import FISHER_STATE_NAME
from ..io import atomic_directory
from ..modules import LowRankLinear, is_conv1d, linear_shape, set_submodule
from ..quantized_modules import QuantizedLowRankLinear, recorded_factor_quantization
from ..targets import is_linear, resolve_name
from .checkpoint_checks import (
    FORMAT_VERSION,
    QUANT_METHOD,
    STOCK_GUARD_KEY,
    CompressedCheckpointError,
    _check_files,
    _hub_snapshot,
    _is_hub_id,
    check_compressed_checkpoint,
    check_safetensors_file,
    checked_factor_quantization,
    checked_fields,
)
from .parallel import factor_parallel_plan, unhook_factorized

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "CompressedCheckpointError",
    "LowRankConfig",
    "LowRankHfQuantizer",
    "decompress_model",
    "load_compressed",
    "check_compressed_checkpoint",
    "check_safetensors_file",
    "mark_compressed",
    "save_compressed",
]


class LowRankConfig(QuantizationConfigMixin):
    """``quantization_config`` of a factorized checkpoint.

    Args:
        ranks: ``{module_name: rank}`` of every ``LowRankLinear`` in the model.
        method: how the factors were obtained (``"svd"``, ``"fwsvd"``, ``"welore"``, ...), informational.
        format_version: version of this layout; a newer major version is refused with a clear message. Default: 1
            for float factors (what every release reads), 2 with ``factor_quantization``.
        factor_quantization: ``None`` (float factors) or ``{"bits", "group_size", "scheme", "format"}``: every
            factorized module stores its factors as group-wise codes
            (:class:`~hf_lowrank.quantized_modules.QuantizedLowRankLinear`); ``scheme`` says how they were fitted
            (``"refit"`` / ``"naive"``), ``format`` the code layout (``"rtn-affine-v1"``).
    """

    def __init__(
        self, ranks: dict[str, int] | None = None, method: str = "svd", format_version: int | None = None,
        factor_quantization: dict | None = None, **kwargs
    ):
        self.quant_method = QUANT_METHOD
        if format_version is None:
            format_version = 2 if factor_quantization is not None else 1
        self.ranks, self.method, self.format_version, self.extra = checked_fields(
            ranks, method, format_version, kwargs.pop("extra", None)
        )
        self.factor_quantization = checked_factor_quantization(factor_quantization, self.format_version)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "quant_method": QUANT_METHOD,
            "ranks": dict(self.ranks),
            "method": self.method,
            "format_version": self.format_version,
            "extra": dict(self.extra),
        }
        if self.factor_quantization is not None:  # absent for float factors: the version-1 layout, unchanged
            out["factor_quantization"] = dict(self.factor_quantization)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _replace_with_factorized(model: nn.Module, ranks: dict[str, int], factor_quantization: dict | None = None) -> None:
    names, prefixes = dict(model.named_modules()), [getattr(model, "base_model_prefix", "") or ""]
    for recorded, rank in ranks.items():
        name = resolve_name(recorded, names, prefixes)  # also when saved with / loaded without the task head
        if name is None:
            raise CompressedCheckpointError(
                f"The checkpoint records a factorized module '{recorded}' that this model class does not have: it "
                "was saved from another architecture. Load it with the model class it was saved from."
            )
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            continue
        if not is_linear(module):
            raise CompressedCheckpointError(f"Module '{name}' is a {type(module).__name__}, not a Linear layer.")
        out_features, in_features = linear_shape(module)
        limit = min(in_features, out_features)
        if not 1 <= rank <= limit:
            raise CompressedCheckpointError(
                f"Rank {rank} recorded for '{name}' is out of bounds for its ({out_features}, "
                f"{in_features}) weight (must be in [1, {limit}]): config.json was edited or belongs to "
                "another model. Re-create the checkpoint."
            )
        device = module.weight.device
        dtype = module.weight.dtype
        if factor_quantization is None:
            new = LowRankLinear(in_features, out_features, rank, bias=module.bias is not None, device=device,
                                dtype=dtype)
        else:
            fq = factor_quantization
            new = QuantizedLowRankLinear(in_features, out_features, rank, fq["bits"], fq["group_size"],
                                         bias=module.bias is not None, device=device, dtype=dtype, scheme=fq["scheme"])
        new.conv1d = is_conv1d(module)
        set_submodule(model, name, new)


# ---- guard against stock transformers ------------------------------------------------------------------------
# A process that never imported hf_lowrank (or where it is not installed: a checkpoint downloaded from the Hub)
# skips the unknown quantization_config with a warning and builds the dense model. Without a guard the factors are
# unexpected keys and every factorized Linear keeps its random initialisation. So every save also writes, for each
# LowRankLinear, a one-element tensor under the dense name ``<module>.weight``: stock transformers finds its shape
# different from the dense ``(out, in)`` weight and raises (a size mismatch is an error unless
# ``ignore_mismatched_sizes=True``); its load report also lists ``STOCK_GUARD_KEY`` (in :mod:`.checkpoint_checks`),
# whose name says what to do. With hf_lowrank imported those names are not parameters of the rebuilt model
# (LowRankLinear has factors only) and are ignored. Nothing else in the layout changes, so earlier checkpoints still
# load.

STOCK_GUARD_NOTE = "hf_lowrank factorized checkpoint: run `import hf_lowrank` before from_pretrained"


def _with_stock_guard(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear) and f"{name}.weight" not in state:
            factor = module.down.weight
            state[f"{name}.weight"] = torch.zeros(1, dtype=factor.dtype, device=factor.device)
    state[STOCK_GUARD_KEY] = torch.zeros(1)
    return state


def _ignore_stock_guard(model: nn.Module) -> None:
    import re

    names = [re.escape(n) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    patterns = {rf"(^|\.){re.escape(STOCK_GUARD_KEY)}$"}
    if names:
        patterns.add(rf"^(?:{'|'.join(names)})\.weight$")
    add_keys_to_ignore_on_load_unexpected(model, patterns)


class LowRankHfQuantizer(HfQuantizer):
    """transformers quantizer plugin that rebuilds ``LowRankLinear`` modules before the weights load."""

    requires_calibration = False

    def __init__(self, quantization_config: LowRankConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._tp_moved: set[str] = set()  # LowRankLinear names whose dense TP style went onto a factor

    def validate_environment(self, *args, **kwargs) -> None:
        return None

    def _process_model_before_weight_loading(self, model, **kwargs):
        _replace_with_factorized(model, self.quantization_config.ranks,
                                 getattr(self.quantization_config, "factor_quantization", None))
        _ignore_stock_guard(model)
        return model

    def update_parallel_plan(self, model, plan: dict[str, str]):
        """Give the factors of every factorized module the split its dense entry in ``plan`` asks for
        (:mod:`.parallel`), so ``from_pretrained(..., tp_plan="auto")`` shards the factors."""
        super().update_parallel_plan(model, plan)
        if getattr(self.quantization_config, "factor_quantization", None) is None:  # codes are not split (below)
            self._tp_moved |= factor_parallel_plan(model, plan)

    def get_state_dict_and_metadata(self, model):
        return _with_stock_guard(model), {"hf_lowrank": STOCK_GUARD_NOTE}

    def _process_model_after_weight_loading(self, model, **kwargs):
        unhook_factorized(model, self._tp_moved)  # the factors' own tensor-parallel hooks do the communication

        model.is_quantized = False  # ordinary float factors: .half() / .float() cast them (module docstring)
        for name, module in model.named_modules():  # loading assigned new (row-major) tensors to the factors
            if isinstance(module, QuantizedLowRankLinear):
                if getattr(module, "_is_hooked", False):  # transformers put a tensor-parallel style on it
                    raise CompressedCheckpointError(
                        f"This checkpoint stores its factors as group-wise codes, which tensor parallelism cannot "
                        f"split (e.g. '{name}'). Load it without tp_plan, or load it once, run hf_lowrank."
                        "quantized_modules.dequantize_factors(model), save it, and load that with tp_plan."
                    )
                try:
                    module.check_codes(name)
                except ValueError as exc:
                    raise CompressedCheckpointError(str(exc)) from None
            elif isinstance(module, LowRankLinear):
                module.lay_out_for_speed_()
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        return decompress_model(model)


def refuse_other_quantization(path: Any, quantization_config: Any) -> None:
    """Raise a clear error when a factorized checkpoint is asked to load with another ``quantization_config``.

    transformers holds one quantization method per model; this checkpoint's is ``hf_lowrank``, and transformers'
    own refusal (``The model is quantized with LowRankConfig but you are passing a BitsAndBytesConfig``) comes
    from its config merge, before any hf-lowrank code runs, so it cannot say what to do instead. This does.
    """
    if quantization_config is None or isinstance(quantization_config, LowRankConfig):
        return
    if isinstance(quantization_config, dict) and quantization_config.get("quant_method") == QUANT_METHOD:
        return
    kind = type(quantization_config).__name__
    raise CompressedCheckpointError(
        f"'{path}' is an hf_lowrank factorized checkpoint, which cannot load with a {kind} on top: a model has one "
        "quantization method, and this one's is its factors (hf_lowrank). Either load it without "
        "quantization_config (dtype=torch.bfloat16 halves float32 factors), or quantize the dense model instead: "
        "model = load_compressed(path); decompress_model(model); model.save_pretrained(dense_dir), then "
        f"from_pretrained(dense_dir, quantization_config=<your {kind}>) (the weights quantized, the low-rank "
        "savings given up)."
    )


def _register() -> None:
    # Idempotent: transformers raises on a second registration of the same name.
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LowRankConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(LowRankConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LowRankHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(LowRankHfQuantizer)


_register()


def mark_compressed(model: nn.Module, ranks: dict[str, int], *, method: str = "svd", extra: dict | None = None) -> None:
    """Record ``ranks`` in ``model.config.quantization_config`` so ``save_pretrained`` writes a factorized checkpoint.

    Merges with ranks already recorded (a model compressed twice). A plain ``nn.Module`` without a transformers
    config is left alone. The model first gets its own copy of its config (:func:`own_config`): models built from
    one config object share it, and the record written here must not make the others claim to be compressed.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return

    previous = getattr(model, "hf_quantizer", None)
    merged: dict[str, int] = {}
    if previous is not None and isinstance(previous.quantization_config, LowRankConfig):
        merged.update(previous.quantization_config.ranks)
    # Record every LowRankLinear actually present (names as in this model), so the map is always complete.
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            merged[name] = module.rank
    merged.update(ranks)
    if not merged:
        return
    factor_quantization = recorded_factor_quantization(model)
    qconfig = LowRankConfig(ranks=merged, method=method, extra=extra, factor_quantization=factor_quantization)
    own_config(model).quantization_config = qconfig
    model.hf_quantizer = LowRankHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = False  # ordinary float factors: .half() / .float() cast them (module docstring)
    model.quantization_method = QUANT_METHOD
    if hasattr(model, "add_model_tags"):  # the card transformers' push_to_hub creates is tagged hf-lowrank
        model.add_model_tags(["hf-lowrank"])


def own_config(model: nn.Module) -> Any:
    """Give ``model`` a private deep copy of its config and return it.

    ``LlamaForCausalLM(cfg)`` keeps ``cfg`` itself, and so does every other model built from the same object (a
    second ``Model(cfg)``, ``from_config(cfg)``), as do the model's sub-modules (``model.model.config``; a
    composite model's parts hold its sub-configs, ``config.text_config``...). The copy replaces the config on every
    sub-module that held the original or one of its sub-configs, so the model stays consistent with itself and
    nothing written into it reaches another model. ``generation_config`` is a separate object and is left alone.
    """
    config = model.config
    memo: dict[int, Any] = {}
    copied = copy.deepcopy(config, memo)
    for module in model.modules():
        held = module.__dict__.get("config")
        if held is not None and id(held) in memo:
            module.config = memo[id(held)]
    return copied


def decompress_model(model: nn.Module) -> nn.Module:
    """Replace every ``LowRankLinear`` by a dense ``nn.Linear`` (``up @ down``) and drop the quantization config."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            set_submodule(model, name, module.to_dense())
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    report: Any = None,
    fisher_state: Any = None,
    base_model: str | None = None,
    license: str | None = None,
    **kwargs,
) -> Path:
    """``model.save_pretrained(path)`` made crash-safe: everything is written to a temporary sibling folder first.

    The folder replaces ``path`` only once every file is complete, so a crash or kill mid-save leaves the previous
    checkpoint at ``path`` intact and loadable.

    Args:
        model: a transformers model (compressed or not).
        path: destination folder.
        tokenizer: optional tokenizer/processor saved beside the weights.
        report: optional :class:`~hf_lowrank.compression.compress.CompressionReport`, saved as
            ``compression_report.json``.
        fisher_state: optional :class:`~hf_lowrank.fisher.state.FisherState` the compression was weighted by, saved
            as ``fisher_state.safetensors`` (``compress_model(..., fisher=path)`` reads it back).
        base_model: the base model's Hub id for the model card (default: the model's ``name_or_path`` when it is a
            Hub id the model was downloaded from; a local path is never written as ``base_model``).
        license: licence identifier for the model card (default: the base model's, when known).
        **kwargs: passed to ``save_pretrained``.

    A compressed model also gets a ``README.md`` model card (:func:`hf_lowrank.cards.write_model_card_for`)
    that names ``path``'s folder, valid Hub metadata, so that ``push_to_hub`` of the folder uploads a usable repo.
    """
    if (Path(path) / "adapter_config.json").exists():
        raise ValueError(
            f"'{path}' already holds a PEFT adapter (adapter_config.json); saving a model there would mix the two "
            "(from_pretrained would load the adapter). Save to another folder, or remove the adapter files first."
        )
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.save(Path(tmp) / "compression_report.json")
        if fisher_state is not None:
            fisher_state.save(Path(tmp) / FISHER_STATE_NAME)

        write_model_card_for(model, tmp, report, name=Path(path).name, base_model=base_model, license=license)
    return Path(path)


def load_compressed(path: str | os.PathLike, model_class: Any = None, **kwargs) -> nn.Module:
    """Load a factorized checkpoint with the plugin guaranteed active and every factor verified.

    Args:
        path: local folder (or Hub repo id) written by ``save_pretrained`` after compression.
        model_class: a transformers auto class or model class (default ``AutoModelForCausalLM``).
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).

    Raises:
        CompressedCheckpointError: missing/truncated files, or weights that did not load into the factors.
    """
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    refuse_other_quantization(path, kwargs.get("quantization_config"))
    local = Path(path)
    if local.exists() or not _is_hub_id(str(path)):
        check_compressed_checkpoint(local)
    else:
        _check_files(_hub_snapshot(str(path), kwargs))
    try:
        model, info = model_class.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except RuntimeError as exc:
        if "mismatched" not in str(exc) and "size mismatch" not in str(exc):
            raise
        raise CompressedCheckpointError(
            f"Tensors in '{path}' have shapes that its config.json does not give them (transformers logged which, "
            "above): the weights were edited, or config.json comes from another save. Copy all files of the same "
            "save_pretrained again."
        ) from exc
    missing = [k for k in info.get("missing_keys", []) if ".down." in k or ".up." in k]
    quant = getattr(model.config, "quantization_config", None)
    if quant is None or not isinstance(getattr(model, "hf_quantizer", None), LowRankHfQuantizer):
        factor_keys = [k for k in info.get("unexpected_keys", []) if k.endswith((".down.weight", ".up.weight"))]
        if factor_keys:
            raise CompressedCheckpointError(
                f"'{path}' holds factorized weights ({factor_keys[0]}, ...) but its config.json has no hf_lowrank "
                "quantization_config, so they were not loaded. Restore config.json from the original save."
            )
    if missing:
        raise CompressedCheckpointError(
            f"{len(missing)} factor weights of '{path}' are missing (e.g. {missing[0]}): the weights file does not "
            "match its config.json. Re-save the compressed model."
        )
    for name, param in [*model.named_parameters(), *model.named_buffers()]:
        if (".down." in name or ".up." in name) and param.is_floating_point() and not torch.isfinite(param).all():
            raise CompressedCheckpointError(f"Factor '{name}' in '{path}' contains NaN/inf values; re-create it.")
    return model
