"""``WeLoreLRCModel``: the peft tuner that applies a :class:`WeLoreLRCConfig` to a model."""

from __future__ import annotations

import logging
import sys

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from tqdm.auto import tqdm

from ...compression.checkpoint import mark_compressed
from ...modules import LowRankLinear, linear_shape
from ...targets import find_target_linears
from .._tuner import KeepUnloadedModules, RefuseMixedBatches
from .allocation import WeLoreLRCAllocation, calibration_whitening, welore_allocation_for_targets
from .config import WeLoreLRCConfig
from .layer import DenseWeightDroppedError, WeLoreLayer, WeLoreLinear, _dropped_message, welore_factors
from .spectra import default_spectra_cache

__all__ = ["WeLoreLRCModel", "WeLoreModel"]


def _find_targets(model: nn.Module, target_modules, task_type=None) -> dict[str, nn.Module]:
    """``find_target_linears``, with a clear message for a model that is already compressed."""
    try:
        targets = find_target_linears(model, target_modules, task_type=task_type)
    except ValueError as exc:
        done = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
        if not done:
            raise
        raise ValueError(
            f"This model is already compressed ({len(done)} LowRankLinear layers, e.g. '{done[0]}') and WeLoreLRC "
            f"found nothing left to compress ({exc}) WeLore works on dense Linear layers: apply it to the original "
            "model, or decompress first (hf_lowrank.decompress_model) if you mean to compress again."
        ) from None
    return targets


logger = logging.getLogger(__name__)


class WeLoreLRCModel(RefuseMixedBatches, KeepUnloadedModules, BaseTuner):
    """Replaces WeLore's low-rank components by trainable factor pairs (see :class:`WeLoreLRCConfig`).

    Created by ``peft.get_peft_model(model, WeLoreLRCConfig(...))`` (or ``PeftModel.from_pretrained``). After
    injection ``welore_allocation`` (reachable as ``peft_model.welore_allocation``) holds the ranks, the LRC / N-LRC
    split, the threshold, the achieved reduction and the parameter saving.

    One WeLore adapter per model: the factors replace the weights rather than adding to them, so two adapters
    would be two different compressed models.
    """

    prefix: str = "welore_"
    tuner_layer_cls = WeLoreLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._welore_low_cpu = low_cpu_mem_usage
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ---- allocation -----------------------------------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # targets are resolved in _pre_injection_hook; no per-architecture table needed

    def _check_new_adapter_config(self, config) -> None:
        if len(self.peft_config) > 1:
            raise ValueError(
                "WeLoreLRC supports one adapter per model: its factors replace the weights instead of adding to "
                "them. Call merge_and_unload() first, or start again from the base model."
            )

    def _pre_injection_hook(self, model: nn.Module, config: WeLoreLRCConfig, adapter_name: str) -> None:
        self._check_new_adapter_config(config)
        if not isinstance(config, WeLoreLRCConfig):
            raise ValueError(f"WeLoreLRCModel needs a WeLoreLRCConfig, got {type(config).__name__}.")
        row_fisher, col_fisher = getattr(config, "_welore_fisher", (None, None))
        whitened = config.spectra == "whitened"
        calibration, grams_in = getattr(config, "_welore_calibration", (None, None))
        has_calibration = calibration is not None or grams_in is not None
        if whitened and (row_fisher or col_fisher):
            raise ValueError(
                "WeLoreLRCConfig takes one weighting: with_fisher (Fisher-weighted spectra) or spectra='whitened' "
                "(with_calibration), not both."
            )
        if has_calibration and not whitened:
            raise ValueError("The config carries calibration batches but spectra='weights'; use with_calibration() "
                             "(which sets spectra='whitened') or drop the batches.")
        in_factors: dict[str, torch.Tensor] = {}
        if config.rank_map is None:
            if whitened and not has_calibration:
                raise ValueError(
                    "WeLoreLRCConfig(spectra='whitened') is data-aware: give it calibration batches before "
                    "get_peft_model, e.g. config.with_calibration(hf_lowrank.calibration_batches(tokenizer, "
                    "texts)), or use spectra='weights' (data-free)."
                )
            targets = _find_targets(model, config.target_modules, config.task_type)
            tokens = None
            if whitened:
                in_factors, tokens = calibration_whitening(model, targets, calibration=calibration, grams_in=grams_in,
                                                           damping=config.damping, progress=config.progress)
            alloc = welore_allocation_for_targets(
                targets, config.reduction, lrc_ratio=config.lrc_ratio, nlrc=config.nlrc,
                rank_pattern=config.rank_pattern, row_fisher=row_fisher, col_fisher=col_fisher,
                in_factors=in_factors, cache=default_spectra_cache(config.spectra_cache_dir), progress=config.progress,
            )
            alloc.whitened = whitened  # recorded even if no calibration token reached any target
            alloc.calibration_tokens = tokens
            config.rank_map = dict(alloc.ranks)
            config.lrc_modules = list(alloc.lrc)
            config.achieved_reduction = alloc.achieved_reduction
            config.welore_threshold = alloc.threshold
            config.calibration_tokens = tokens
            fresh = True
        else:
            alloc = self._allocation_from_config(model, config)
            fresh = False
        if fresh and self._welore_low_cpu:
            raise ValueError(
                "get_peft_model(..., low_cpu_mem_usage=True) creates empty weights, but a new WeLoreLRC adapter must "
                "be initialised from the SVD of the base weights. Call it without low_cpu_mem_usage."
            )
        plan: dict[str, tuple[str, int]] = {}
        for name in alloc.lrc:
            plan[name] = ("lrc", alloc.ranks[name])
        for name in alloc.nlrc:
            if alloc.ranks[name] < min(alloc.shapes[name]):
                plan[name] = ("nlrc", alloc.ranks[name])
        if not plan:
            raise ValueError(
                f"WeLore at reduction {config.reduction} leaves every target layer dense (no low-rank component): "
                "raise reduction or lrc_ratio."
            )
        if fresh and not alloc.lrc:
            # nlrc='truncate' can reach the reduction by cutting N-LRCs alone; they are frozen, so the PEFT model
            # would have nothing to train (a Trainer then fails with "element 0 of tensors does not require grad").
            raise ValueError(
                f"WeLore at reduction {config.reduction} with nlrc='truncate' reaches its target by truncating "
                f"{len(plan)} non-low-rank components alone (frozen) and leaves no low-rank component (LRC) to "
                f"fine-tune: a layer is an LRC when its kept rank is below lrc_ratio * min(out, in) (lrc_ratio="
                f"{config.lrc_ratio}). Raise reduction, raise lrc_ratio, or use nlrc='keep' (only LRCs remove ranks)."
            )
        if whitened and not fresh and has_calibration:
            # a saved data-aware config reused with calibration: the deferred initialisation gets whitened factors
            planned = find_target_linears(model, sorted(plan))
            in_factors, _ = calibration_whitening(model, planned, calibration=calibration, grams_in=grams_in,
                                                  damping=config.damping, progress=config.progress)
        self._welore_plan = plan
        self._welore_fresh = fresh
        self._welore_fisher = (row_fisher, col_fisher)
        self._welore_whitening = (whitened, {} if fresh else in_factors)
        self.welore_allocation = alloc
        self._welore_factors = {}
        if fresh:
            # All or nothing: every layer's factors are computed before any module is replaced, so a failure (an
            # SVDError on a NaN weight) leaves the model untouched. The dense weights are dropped only once all
            # layers are in place (_post_injection_hook); inject_adapter restores the model if anything fails.
            bar = tqdm(plan.items(), desc="WeLore factors", unit="layer", disable=not config.progress)
            for name, (_, rank) in bar:
                self._welore_factors[name] = welore_factors(
                    targets[name], rank, row_fisher=(row_fisher or {}).get(name),
                    col_fisher=(col_fisher or {}).get(name), in_factor=in_factors.get(name),
                    method=config.svd_method, name=name,
                )

    @staticmethod
    def _allocation_from_config(model: nn.Module, config: WeLoreLRCConfig) -> WeLoreLRCAllocation:
        """Rebuild the allocation recorded in a saved config (no SVD)."""
        try:
            targets = find_target_linears(model, sorted(config.rank_map))
        except ValueError as exc:
            raise ValueError(
                f"This WeLoreLRC adapter was made for another model: {exc} Load it onto the base model it was "
                "created from."
            ) from None
        shapes = {n: linear_shape(m) for n, m in targets.items()}
        for name, rank in config.rank_map.items():
            if name not in shapes or rank > min(shapes[name]):
                raise ValueError(
                    f"adapter_config.json records rank {rank} for '{name}', which does not fit this model "
                    f"({shapes.get(name, 'no such Linear')}). Load the adapter onto the base model it was created from."
                )
        lrc = sorted(config.lrc_modules or [])
        nlrc = sorted(set(config.rank_map) - set(lrc))
        full = {n: min(s) for n, s in shapes.items()}
        total = sum(full.values())
        ranks = {n: int(config.rank_map[n]) for n in sorted(config.rank_map)}
        achieved = sum(full[n] - ranks[n] for n in ranks) / total
        return WeLoreLRCAllocation(
            ranks=ranks,
            threshold_ranks=dict(ranks),
            lrc=lrc,
            nlrc=nlrc,
            shapes=shapes,
            threshold=float(config.welore_threshold) if config.welore_threshold is not None else float("nan"),
            target=float(config.reduction),
            achieved_reduction=achieved,
            attempted_reduction=float("nan"),
            lrc_ratio=float(config.lrc_ratio),
            nlrc_mode=config.nlrc,
            whitened=config.spectra == "whitened",
            calibration_tokens=config.calibration_tokens,
        )

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        return key in getattr(self, "_welore_plan", {})

    # ---- injection ------------------------------------------------------------------------------------------------

    def _create_and_replace(
        self, peft_config: WeLoreLRCConfig, adapter_name, target, target_name, parent, current_key=None, **kwargs
    ) -> None:
        if isinstance(target, WeLoreLayer):
            raise ValueError(f"'{current_key}' already carries a WeLoreLRC adapter; WeLoreLRC allows one adapter.")
        role, rank = self._welore_plan[current_key]
        row_fisher, col_fisher = self._welore_fisher
        whitened, in_factors = getattr(self, "_welore_whitening", (False, {}))
        factors = self._welore_factors.pop(current_key, None)
        new = WeLoreLinear(
            target,
            adapter_name,
            role=role,
            rank=rank,
            init=False,
            keep_dense=peft_config.keep_dense,
            svd_method=peft_config.svd_method,
            row_fisher=(row_fisher or {}).get(current_key),
            col_fisher=(col_fisher or {}).get(current_key),
            in_factor=in_factors.get(current_key),
            whitened=whitened,
            inference_mode=peft_config.inference_mode,
        )
        new._welore_name = current_key
        if factors is not None:
            new._assign_factors(adapter_name, *factors)  # computed in _pre_injection_hook; the dense weight stays
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        setattr(parent, target_name, new)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection, all or nothing: if it fails part way, every layer it replaced gets its Linear back.

        Only the layers this call created: a refused second adapter must leave the first one's layers in place."""
        existing = {id(m) for m in model.modules() if isinstance(m, WeLoreLayer)}
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            self._welore_factors = {}
            for name, module in list(model.named_modules()):
                if isinstance(module, WeLoreLayer) and id(module) not in existing and not module._dense_dropped:
                    parent_name, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base_layer)
            raise

    def _post_injection_hook(self, model: nn.Module, config: WeLoreLRCConfig, adapter_name: str) -> None:
        self._welore_factors = {}
        layers = [m for m in model.modules() if isinstance(m, WeLoreLayer)]
        replaced = {n for n, m in model.named_modules() if isinstance(m, WeLoreLayer)}
        missing = sorted(set(self._welore_plan) - replaced)
        if missing:
            raise RuntimeError(f"WeLore planned to replace {missing[:3]} but they were not replaced.")
        for layer in layers:  # every layer is in place: now the dense weights can go (keep_dense=False)
            if not layer._pending:
                layer._maybe_drop_dense()
        if any(layer._pending for layer in layers):
            # Deferred initialisation (a rank map without weights): at the first forward, all layers at once. A
            # PeftModel without a task type calls the transformers model directly, so the hook sits there.
            self._welore_hook = model.register_forward_pre_hook(self._materialize_before_forward)
        alloc = self.welore_allocation
        summary = alloc.summary() + f", trainable share {self._trainable_share(model):.2%} of the model"
        logger.info(summary)
        if config.progress and self._welore_fresh:
            print(summary, file=sys.stderr)
        self._welore_fisher = (None, None)  # do not hold the Fisher tensors beyond the initialisation
        self._welore_whitening = (False, {})  # pending layers hold their own whitening factors

    @staticmethod
    def _trainable_share(model: nn.Module) -> float:
        total = trainable = 0
        for p in model.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable / max(total, 1)

    # ---- deferred initialisation, all or nothing ------------------------------------------------------------------

    def _materialize_all(self) -> None:
        """Run every pending SVD initialisation (a rank map reused without weights) before assigning any of them.

        A failure in one layer (an SVDError on a NaN weight) leaves every layer as it was, dense weights included.
        """
        pending = [m for m in self.model.modules() if isinstance(m, WeLoreLayer) and m._pending]
        if not pending:
            return
        computed = []
        for layer in pending:
            for adapter, init in list(layer._pending.items()):
                computed.append((layer, adapter, layer._svd_factors(adapter, init)))
        for layer, adapter, factors in computed:
            layer._assign_factors(adapter, *factors)
        for layer in pending:
            layer._maybe_drop_dense()

    def _materialize_before_forward(self, module: nn.Module, args) -> None:
        self._materialize_all()
        hook = self.__dict__.pop("_welore_hook", None)
        if hook is not None:
            hook.remove()

    def forward(self, *args, **kwargs):
        self._materialize_all()
        return super().forward(*args, **kwargs)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """peft's merge, all or nothing: pending factors are computed and (``safe_merge``) checked first."""
        self._materialize_all()
        if safe_merge:
            for name, layer in self._welore_layers():
                adapter = layer._adapter()
                if adapter is not None and not torch.isfinite(layer.effective_weight(adapter)).all():
                    raise ValueError(
                        f"NaN/inf in the WeLore weights of '{name}' (adapter '{adapter}'): the adapter is broken; "
                        "nothing was merged."
                    )
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    # ---- adapter switching ----------------------------------------------------------------------------------------

    def disable_adapter_layers(self) -> None:
        """Run the dense base model (needs ``keep_dense=True``)."""
        if any(isinstance(m, WeLoreLayer) and m._dense_dropped for m in self.model.modules()):
            raise DenseWeightDroppedError(_dropped_message("disable_adapter()"))
        super().disable_adapter_layers()

    # ---- unloading ------------------------------------------------------------------------------------------------

    def _welore_layers(self) -> list[tuple[str, WeLoreLayer]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, WeLoreLayer)]

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The compressed model: a plain transformers model with ``LowRankLinear`` at every LRC.

        Truncated N-LRCs become plain ``nn.Linear`` layers; N-LRCs kept exact are untouched; ``modules_to_save``
        (e.g. a classifier head under ``task_type="SEQ_CLS"``) become their trained copies (peft's ``BaseTuner``
        unloading, which calls :meth:`WeLoreLayer.unload_and_optionally_merge_module`). The model is marked
        (``hf_lowrank.compression.checkpoint.mark_compressed``) so that ``save_pretrained`` writes a factorized
        checkpoint that ``AutoModelFor*.from_pretrained`` rebuilds (with ``hf_lowrank`` imported).

        Args:
            progressbar: show a progress bar.
            safe_merge: refuse factors with NaN/inf.
            adapter_names: must be ``None`` or the single WeLore adapter.
        """
        self._check_adapter_names(adapter_names)
        lrc = {name for name, layer in self._welore_layers() if "lrc" in layer.welore_role.values()}
        config = next(iter(self.peft_config.values()))
        extra = {
            "reduction": config.reduction,
            "achieved_reduction": self.welore_allocation.achieved_reduction,
            "lrc_ratio": config.lrc_ratio,
            "nlrc": config.nlrc,
        }
        if config.spectra == "whitened":  # the data-free record stays as it was
            extra.update(spectra="whitened", damping=config.damping, calibration_tokens=config.calibration_tokens)
        self._prepare_compressed(safe_merge)
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        ranks = {n: m.rank for n, m in model.named_modules() if n in lrc and isinstance(m, LowRankLinear)}
        if ranks:
            mark_compressed(model, ranks, method="welore", extra=extra)
        return model

    def _prepare_compressed(self, safe_merge: bool) -> None:
        """Build the compressed module of every layer before peft's unloading replaces the first one (all or
        nothing: a failure leaves the PEFT model as it was)."""
        layers = self._welore_layers()
        try:
            self._materialize_all()
            for _, layer in layers:
                layer._welore_unloaded = layer.compressed_module(safe_merge)
        except BaseException:
            for _, layer in layers:
                layer.__dict__.pop("_welore_unloaded", None)
            raise

    def unload(self) -> nn.Module:
        """The original dense model (needs ``keep_dense=True``); as in peft, a ``modules_to_save`` module stays the
        trained copy of the active adapter."""
        if any(m._dense_dropped for _, m in self._welore_layers()):
            raise DenseWeightDroppedError(_dropped_message("unload()"))  # before any layer is replaced
        return super().unload()

    def _check_adapter_names(self, adapter_names: list[str] | None) -> None:
        if adapter_names is not None and set(adapter_names) - set(self.peft_config):
            raise ValueError(f"Unknown adapter(s) {adapter_names}; this model has {list(self.peft_config)}.")

    # ---- saving ---------------------------------------------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # Layers whose deferred initialisation never ran (a rank map reused without loading weights) get their
        # factors now; the state_dict tensors share storage with the parameters only if initialised in place.
        pending = [m for m in model.modules() if isinstance(m, WeLoreLayer) and m._pending]
        if pending:
            for m in pending:
                m._materialize()
            state_dict = model.state_dict()
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)


WeLoreModel = WeLoreLRCModel
"""Deprecated name of :class:`WeLoreLRCModel` (named like its config); removed in the next release."""
