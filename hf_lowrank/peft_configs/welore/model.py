"""``WeLoreModel``: the peft tuner that applies a :class:`WeLoreLRCConfig` to a model."""

from __future__ import annotations

import logging
import sys

from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from tqdm.auto import tqdm

from ...compression.compress import find_target_linears
from .config import WeLoreLRCConfig
from .layer import DenseWeightDroppedError, WeLoreLayer, WeLoreLinear, _dropped_message
from .spectra import (
    WeLoreLRCAllocation,
    compute_spectra,
    default_spectra_cache,
    match_rank_pattern,
    welore_allocation,
)

__all__ = ["WeLoreModel"]

logger = logging.getLogger(__name__)


class WeLoreModel(BaseTuner):
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
            raise ValueError(f"WeLoreModel needs a WeLoreLRCConfig, got {type(config).__name__}.")
        row_fisher, col_fisher = getattr(config, "_welore_fisher", (None, None))
        if config.rank_map is None:
            targets = find_target_linears(model, config.target_modules)
            shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
            pinned = {n: r for n in targets if (r := match_rank_pattern(config.rank_pattern, n)) is not None}
            spectra = compute_spectra(
                targets,
                cache=default_spectra_cache(config.spectra_cache_dir),
                row_fisher=row_fisher,
                col_fisher=col_fisher,
                progress=config.progress,
            )
            alloc = welore_allocation(
                spectra, shapes, config.reduction, lrc_ratio=config.lrc_ratio, nlrc=config.nlrc, pinned=pinned,
                weighted=bool(row_fisher) or bool(col_fisher),
            )
            config.rank_map = dict(alloc.ranks)
            config.lrc_modules = list(alloc.lrc)
            config.achieved_reduction = alloc.achieved_reduction
            config.welore_threshold = alloc.threshold
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
        self._welore_plan = plan
        self._welore_fresh = fresh
        self._welore_fisher = (row_fisher, col_fisher)
        self.welore_allocation = alloc
        self._welore_bar = tqdm(
            total=len(plan),
            desc="WeLore factors" if fresh else "WeLore layers",
            unit="layer",
            disable=not (config.progress and fresh),
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
        shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
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
        new = WeLoreLinear(
            target,
            adapter_name,
            role=role,
            rank=rank,
            init=self._welore_fresh,
            keep_dense=peft_config.keep_dense,
            svd_method=peft_config.svd_method,
            row_fisher=(row_fisher or {}).get(current_key),
            col_fisher=(col_fisher or {}).get(current_key),
            inference_mode=peft_config.inference_mode,
        )
        new._welore_name = current_key
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        setattr(parent, target_name, new)
        self._welore_bar.update(1)

    def _post_injection_hook(self, model: nn.Module, config: WeLoreLRCConfig, adapter_name: str) -> None:
        self._welore_bar.close()
        replaced = {n for n, m in model.named_modules() if isinstance(m, WeLoreLayer)}
        missing = sorted(set(self._welore_plan) - replaced)
        if missing:
            raise RuntimeError(f"WeLore planned to replace {missing[:3]} but they were not replaced.")
        alloc = self.welore_allocation
        summary = alloc.summary() + f", trainable share {self._trainable_share(model):.2%} of the model"
        logger.info(summary)
        if config.progress and self._welore_fresh:
            print(summary, file=sys.stderr)
        self._welore_fisher = (None, None)  # do not hold the Fisher tensors beyond the initialisation

    @staticmethod
    def _trainable_share(model: nn.Module) -> float:
        total = trainable = 0
        for p in model.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable / max(total, 1)

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
        from ...compression.checkpoint import mark_compressed
        from ...modules import LowRankLinear

        self._check_adapter_names(adapter_names)
        lrc = {name for name, layer in self._welore_layers() if "lrc" in layer.welore_role.values()}
        config = next(iter(self.peft_config.values()))
        extra = {
            "reduction": config.reduction,
            "achieved_reduction": self.welore_allocation.achieved_reduction,
            "lrc_ratio": config.lrc_ratio,
            "nlrc": config.nlrc,
        }
        model = self._unload_and_optionally_merge(
            merge=True, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        ranks = {n: m.rank for n, m in model.named_modules() if n in lrc and isinstance(m, LowRankLinear)}
        if ranks:
            mark_compressed(model, ranks, method="welore", extra=extra)
        return model

    def unload(self) -> nn.Module:
        """The original dense model (needs ``keep_dense=True``); ``modules_to_save`` get their original modules."""
        if any(m._dense_dropped for _, m in self._welore_layers()):
            raise DenseWeightDroppedError(_dropped_message("unload()"))  # before any layer is replaced
        return self._unload_and_optionally_merge(merge=False)

    def _check_adapter_names(self, adapter_names: list[str] | None) -> None:
        if adapter_names is not None and set(adapter_names) - set(self.peft_config):
            raise ValueError(f"Unknown adapter(s) {adapter_names}; this model has {list(self.peft_config)}.")

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # peft's default also copies ``child.weight`` onto a new module without ``base_layer``: wrong for a
        # LowRankLinear (its weight is up @ down) and impossible for a modules_to_save head without a weight.
        setattr(parent, child_name, new_module)

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
