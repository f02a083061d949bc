"""WeLoreLRC tuner layer: a Linear replaced by a trainable factor pair (LRC) or a frozen truncated copy (N-LRC).

Unlike LoRA the factors are not added to the base weight, they ARE the layer: ``y = x @ down.T @ up.T + b`` with
``down = sqrt(S) V^T`` ``(r, in)`` and ``up = U sqrt(S)`` ``(out, r)`` from the truncated SVD of the base weight
(data-aware WeLore: of the whitened weight ``W L_in``, ``down = sqrt(S) V^T L_in^{-1}``, see :func:`welore_factors`). The
base Linear stays in ``base_layer`` (peft's convention) for its bias and, with ``keep_dense=True``, its dense weight
(so ``disable_adapter``, ``unmerge`` and ``unload`` give the dense model back). With ``keep_dense=False`` (the
default) the dense weight is dropped once the factors hold the layer, and the PEFT model is as small as the
compressed model.

A GPT-2-style ``transformers.pytorch_utils.Conv1D`` (weight stored ``(in, out)``, ``y = x @ W + b``) is the Linear
of weight ``W.T``: the spectra, the SVD and the factors are those of the ``(out, in)`` view
(:func:`hf_lowrank.modules.dense_weight`), so its ranks and factors are those of that Linear. What goes back into the
base layer (:meth:`WeLoreLayer.merge`, :attr:`WeLoreLayer.weight`) and what unloading returns
(:meth:`WeLoreLayer.to_compressed`) keeps the Conv1D layout, so a merged GPT-2 saves as stock transformers expects.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..._compat import cast_input_dtype
from ...errors import DenseWeightDroppedError, WhitenedFactorsNeedCalibrationError
from ...modules import LowRankLinear, dense_weight, is_conv1d, linear_shape
from ...ops.fisher import fwsvd, weighted_lowrank

__all__ = ["DenseWeightDroppedError", "WeLoreLayer", "WeLoreLinear", "WhitenedFactorsNeedCalibrationError",
           "welore_factors"]

logger = logging.getLogger(__name__)

ROLES = ("lrc", "nlrc")


def _dropped_message(what: str) -> str:
    return (
        f"{what} needs the dense weights that WeLoreLRC dropped (keep_dense=False, the default, so the PEFT model is "
        "as small as the compressed model). Create the adapter with WeLoreLRCConfig(..., keep_dense=True) to keep "
        "them, or use merge_and_unload() to get the compressed model."
    )


class _PendingInit(NamedTuple):
    """How a deferred initialisation computes an adapter's factors: the Fisher sides or the whitening factor, and
    whether the adapter is data-aware (then its factors cannot come from the weight alone)."""

    row_fisher: torch.Tensor | None = None
    col_fisher: torch.Tensor | None = None
    in_factor: torch.Tensor | None = None
    whitened: bool = False


class WeLoreLayer(BaseTunerLayer):
    """Mixin holding WeLore's per-adapter state on a replaced Linear.

    Attributes:
        welore_down: ``{adapter: (r, in) Parameter}`` for low-rank components.
        welore_up: ``{adapter: (out, r) Parameter}`` for low-rank components.
        welore_weight: ``{adapter: (out, in) frozen Parameter}`` for N-LRCs truncated with ``nlrc="truncate"``.
        welore_rank: ``{adapter: kept rank}``; welore_role: ``{adapter: "lrc" | "nlrc"}``.
    """

    adapter_layer_names = ("welore_down", "welore_up", "welore_weight")
    other_param_names = ("welore_rank", "welore_role")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.welore_down = nn.ParameterDict({})
        self.welore_up = nn.ParameterDict({})
        self.welore_weight = nn.ParameterDict({})
        self.welore_rank: dict[str, int] = {}
        self.welore_role: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.frozen_peft_weight_names = {}  # per instance: truncated N-LRC weights never train
        self.kwargs = kwargs
        base = self.get_base_layer()
        self._conv1d = is_conv1d(base)  # a GPT-2 Conv1D: the Linear of weight W.T (see the module docstring)
        if not isinstance(base, nn.Linear) and not self._conv1d:
            raise TypeError(
                f"WeLoreLRC replaces Linear layers (nn.Linear, or GPT-2-style Conv1D) only, got "
                f"{type(base).__name__}; restrict target_modules to Linear layers."
            )
        self.out_features, self.in_features = linear_shape(base)
        w = base.weight
        self._factor_dtype = w.dtype if w.is_floating_point() else torch.float32  # bnb layers: float32 factors
        self._device = w.device
        self._pending: dict[str, _PendingInit] = {}
        self._keep_dense = True
        self._dense_dropped = False
        self._merge_stash: list[nn.Parameter | None] = []
        self._svd_method = "auto"
        self.register_load_state_dict_pre_hook(_mark_loaded)

    # ---- creation -------------------------------------------------------------------------------------------------

    def update_layer(
        self,
        adapter_name: str,
        role: str,
        rank: int,
        *,
        init: bool = True,
        keep_dense: bool = False,
        svd_method: str = "auto",
        row_fisher: torch.Tensor | None = None,
        col_fisher: torch.Tensor | None = None,
        in_factor: torch.Tensor | None = None,
        whitened: bool = False,
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` to this layer.

        Args:
            adapter_name: the adapter's name.
            role: ``"lrc"`` (trainable factor pair) or ``"nlrc"`` (frozen truncated dense weight).
            rank: kept rank, ``1 <= rank <= min(out, in)``.
            init: initialise from the (Fisher-weighted) truncated SVD now. ``False`` defers it: the weights are
                expected from a checkpoint (``PeftModel.from_pretrained``); if none arrive before the first forward
                (or save, or merge), the SVD runs then.
            keep_dense: keep the base layer's dense weight after the factors are set.
            svd_method: ``"auto"``, ``"exact"`` or ``"randomized"`` truncated SVD.
            row_fisher: optional ``(out,)`` accumulated Fisher per output row: the factors then come from the
                Fisher-weighted SVD (:func:`hf_lowrank.ops.fisher.fwsvd`).
            col_fisher: optional ``(in,)`` accumulated Fisher per input column.
            in_factor: optional ``(in, in)`` whitening factor of the calibration input Gram (data-aware WeLore): the
                factors then come from the whitened SVD (:func:`hf_lowrank.ops.fisher.weighted_lowrank`).
            whitened: the adapter is data-aware. Without ``in_factor`` its factors must arrive from a checkpoint:
                the deferred initialisation refuses (:class:`WhitenedFactorsNeedCalibrationError`) rather than fall
                back to the plain SVD, which would not be the factorization the allocation was made for.
            inference_mode: freeze the new factors.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}.")
        limit = min(self.in_features, self.out_features)
        if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
            rank = int(rank)  # a numpy integer from a rank map
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise ValueError(
                f"WeLore rank must be an integer in [1, {limit}] for a ({self.out_features}, {self.in_features}) "
                f"weight, got {rank!r}."
            )
        if self.welore_role and adapter_name not in self.welore_role:
            raise ValueError("WeLoreLRC supports one adapter per model; delete the existing one first.")
        self.welore_role[adapter_name] = role
        self.welore_rank[adapter_name] = rank
        self._keep_dense = bool(keep_dense)
        self._svd_method = svd_method
        kw = {"device": self._device, "dtype": self._factor_dtype}
        if role == "lrc":
            self.welore_down[adapter_name] = nn.Parameter(torch.zeros(rank, self.in_features, **kw))
            self.welore_up[adapter_name] = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        else:
            self.welore_weight[adapter_name] = nn.Parameter(
                torch.zeros(self.out_features, self.in_features, **kw), requires_grad=False
            )
            self.frozen_peft_weight_names = {**self.frozen_peft_weight_names, adapter_name: ("welore_weight",)}
        self._pending[adapter_name] = _PendingInit(row_fisher, col_fisher, in_factor, bool(whitened))
        if init:
            self._materialize()
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def _init_from_svd(self, adapter_name: str, init: _PendingInit) -> None:
        self._assign_factors(adapter_name, *self._svd_factors(adapter_name, init))

    def _svd_factors(self, adapter_name: str, init: _PendingInit) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` of the adapter from the base weight; nothing on the layer changes."""
        if self._dense_dropped:
            raise DenseWeightDroppedError(_dropped_message("Initialising the WeLore factors"))
        name = getattr(self, "_welore_name", None)
        if init.whitened and init.in_factor is None:
            raise WhitenedFactorsNeedCalibrationError(
                f"The WeLore adapter{f' of {name!r}' if name else ''} is data-aware (spectra='whitened'): its factors "
                "are the whitened SVD of the base weight on calibration data, which this config does not carry. Load "
                "its weights with PeftModel.from_pretrained(model, adapter_dir), or give the config the calibration "
                "again (config.with_calibration(batches)) before get_peft_model."
            )
        return welore_factors(
            self.get_base_layer(), self.welore_rank[adapter_name], row_fisher=init.row_fisher,
            col_fisher=init.col_fisher, in_factor=init.in_factor, method=self._svd_method, name=name,
        )

    @torch.no_grad()
    def _assign_factors(self, adapter_name: str, down: torch.Tensor, up: torch.Tensor) -> None:
        """Set the adapter's weights from ``(down, up)`` and mark it initialised (the dense weight is kept)."""
        if self.welore_role[adapter_name] == "lrc":
            d, u = self.welore_down[adapter_name], self.welore_up[adapter_name]
            d.data = down.to(device=d.device, dtype=d.dtype)
            u.data = up.to(device=u.device, dtype=u.dtype)
        else:
            w = self.welore_weight[adapter_name]
            w.data = (up.float() @ down.float()).to(device=w.device, dtype=w.dtype)
        self._pending.pop(adapter_name, None)

    def _materialize(self) -> None:
        """Run the deferred SVD initialisation of adapters whose weights never arrived from a checkpoint."""
        if self._pending:
            for adapter_name, init in list(self._pending.items()):
                self._init_from_svd(adapter_name, init)
        self._maybe_drop_dense()

    def _weights_loaded(self, adapter_name: str) -> None:
        self._pending.pop(adapter_name, None)
        if not self._pending:
            self._maybe_drop_dense()

    def _maybe_drop_dense(self) -> None:
        if self._keep_dense or self._dense_dropped or self._pending or self.merged:
            return
        base = self.get_base_layer()
        base.weight = None  # frees the dense (out, in) weight; the bias stays
        self._dense_dropped = True

    # ---- views ----------------------------------------------------------------------------------------------------

    def _adapter(self) -> str | None:
        for name in self.active_adapters:
            if name in self.welore_role:
                return name
        return None

    def effective_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """The ``(out, in)`` weight the adapter computes with (``up @ down`` or the truncated weight), detached."""
        adapter_name = adapter_name or self._adapter()
        if adapter_name is None:
            raise ValueError("This WeLore layer has no active adapter.")
        self._materialize()
        with torch.no_grad():
            if self.welore_role[adapter_name] == "lrc":
                up, down = self.welore_up[adapter_name], self.welore_down[adapter_name]
                return (up.float() @ down.float()).to(up.dtype)
            return self.welore_weight[adapter_name].detach().clone()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``effective_weight - dense base weight`` (needs ``keep_dense=True``), in the base layer's layout as peft's
        LoRA gives it: ``(out, in)``, or ``(in, out)`` for a ``Conv1D``, so that ``base.weight + delta`` is merged."""
        if self._dense_dropped:
            raise DenseWeightDroppedError(_dropped_message("get_delta_weight()"))
        W = dense_weight(self.get_base_layer()).float()
        delta = (self.effective_weight(adapter_name).float() - W).to(self._factor_dtype)
        return delta.T if self._conv1d else delta

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `layer.weight` (for its dtype or device, e.g. T5) gets the dense weight when kept, and the
        # effective weight of the adapter otherwise, in the base layer's layout: (out, in), or (in, out) for a Conv1D.
        base = self.get_base_layer()
        if base.weight is not None:
            return base.weight
        W = self.effective_weight()
        return W.T if self._conv1d else W

    # ---- merge / unmerge ------------------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the adapter's effective weight into the base layer (the factors stay, for ``unmerge``)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.welore_role]
        if not adapter_names:
            return
        if len(adapter_names) > 1:
            raise ValueError("WeLoreLRC merges one adapter at a time.")
        base = self.get_base_layer()
        if getattr(base.weight, "quant_state", None) is not None or (
            base.weight is not None and not base.weight.is_floating_point()
        ):
            raise ValueError("merge() into a quantized base layer is not supported; use merge_and_unload().")
        W = self.effective_weight(adapter_names[0])
        if safe_merge and not torch.isfinite(W).all():
            raise ValueError(f"NaN/inf in the WeLore weights of adapter '{adapter_names[0]}': the adapter is broken.")
        dtype = base.weight.dtype if base.weight is not None else self._factor_dtype
        if self._conv1d:
            W = W.T.contiguous()  # a Conv1D stores its weight (in, out)
        self._merge_stash.append(base.weight)
        base.weight = nn.Parameter(W.to(dtype), requires_grad=False)
        self.merged_adapters.append(adapter_names[0])

    def unmerge(self) -> None:
        """Undo :meth:`merge`: the base layer gets its previous weight back (``None`` when it was dropped)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            self.merged_adapters.pop()
            base.weight = self._merge_stash.pop()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """What peft's ``BaseTuner`` unloading puts in this layer's place.

        ``merge=True``: the compressed module (:meth:`to_compressed`, in the factors' dtype). ``merge=False``: the
        dense base layer, which needs ``keep_dense=True``.

        Args:
            merge: merge (compress) instead of restoring the dense layer.
            safe_merge: refuse factors with NaN/inf.
            adapter_names: ignored beyond the single WeLore adapter (checked by the tuner).
        """
        prepared = self.__dict__.pop("_welore_unloaded", None)  # computed up front by WeLoreLRCModel (all or nothing)
        if self.merged:
            self.unmerge()
        if merge and prepared is not None:
            return prepared
        if not merge:
            if self._dense_dropped:
                raise DenseWeightDroppedError(_dropped_message("unload()"))
            return self.get_base_layer()
        return self.compressed_module(safe_merge)

    def compressed_module(self, safe_merge: bool = False) -> nn.Module:
        """:meth:`to_compressed` in the factors' dtype and this layer's train/eval mode; ``safe_merge`` refuses
        factors with NaN/inf."""
        new = self.to_compressed(dtype=self._factor_dtype)
        if safe_merge and not all(torch.isfinite(p).all() for p in new.parameters()):
            name = getattr(self, "_welore_name", "this layer")
            raise ValueError(f"NaN/inf in the WeLore weights of '{name}': the adapter is broken.")
        new.train(self.training)
        return new

    def to_compressed(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The plain module this layer stands for: ``LowRankLinear`` for an LRC, ``nn.Linear`` for an N-LRC.

        On a ``Conv1D`` base the ``LowRankLinear`` is marked ``conv1d`` (its ``to_dense`` and the checkpoint format
        give a ``Conv1D`` back) and a truncated N-LRC is a ``Conv1D`` holding the transposed weight, the layout stock
        transformers saves and loads.
        """
        adapter_name = self._adapter() or next(iter(self.welore_role))
        self._materialize()
        base = self.get_base_layer()
        bias = base.bias.detach().clone() if base.bias is not None else None
        with torch.no_grad():
            if self.welore_role[adapter_name] == "lrc":
                down, up = self.welore_down[adapter_name], self.welore_up[adapter_name]
                dtype = dtype or down.dtype
                layer = LowRankLinear.from_factors(down.detach(), up.detach(), bias, dtype=dtype)
                layer.conv1d = self._conv1d
                return layer
            w = self.welore_weight[adapter_name]
            dtype = dtype or w.dtype
            if self._conv1d:
                from transformers.pytorch_utils import Conv1D

                lin = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=dtype)
                w = w.T
            else:
                lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device,
                                dtype=dtype)
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
            lin.requires_grad_(False)
            return lin


@torch.no_grad()
def welore_factors(
    base_layer: nn.Module,
    rank: int,
    *,
    row_fisher: torch.Tensor | None = None,
    col_fisher: torch.Tensor | None = None,
    in_factor: torch.Tensor | None = None,
    method: str = "auto",
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down (r, in), up (out, r))`` of a Linear's (weighted) truncated SVD: a WeLore layer's initial factors.

    Goes through the package's one factorization, :func:`hf_lowrank.ops.fisher.weighted_lowrank`: with a whitening
    ``in_factor`` (data-aware WeLore) the rank-``r`` minimiser of ``||(W - W_hat) L_in||_F``, the factorization whose
    spectrum the data-aware allocation thresholded (the same factor as ``compress_model(grams_in=...)`` uses);
    otherwise :func:`hf_lowrank.ops.fisher.fwsvd` (without Fisher: the plain truncated SVD split into balanced
    factors).

    Raises:
        SVDError: the weight (or its factors) is not finite; names the module.
        ValueError: ``in_factor`` together with Fisher (one weighting at a time).
    """
    if in_factor is not None:
        if row_fisher is not None or col_fisher is not None:
            raise ValueError("WeLore factors take one weighting: Fisher or an input whitening factor, not both.")
        return weighted_lowrank(dense_weight(base_layer), rank, in_factor=in_factor, method=method, name=name)
    return fwsvd(dense_weight(base_layer), rank, row_fisher=row_fisher, col_fisher=col_fisher, method=method, name=name)


def _mark_loaded(module: WeLoreLayer, state_dict, prefix, *args) -> None:
    """Load pre-hook: weights arriving from a checkpoint replace the deferred SVD initialisation."""
    for adapter_name in list(module._pending):
        if module.welore_role[adapter_name] == "lrc":
            keys = (f"{prefix}welore_down.{adapter_name}", f"{prefix}welore_up.{adapter_name}")
        else:
            keys = (f"{prefix}welore_weight.{adapter_name}",)
        if all(k in state_dict for k in keys):
            module._weights_loaded(adapter_name)


class WeLoreLinear(nn.Module, WeLoreLayer):
    """A Linear layer under WeLoreLRC (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, *, role: str, rank: int, **kwargs: Any) -> None:
        super().__init__()
        WeLoreLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, role, rank, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._pending:
            self._materialize()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            if self._dense_dropped:
                raise DenseWeightDroppedError(_dropped_message("Running with the adapter disabled"))
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapter_name = self._adapter()
        if adapter_name is None:
            if self._dense_dropped:
                raise DenseWeightDroppedError(_dropped_message("Running without an active WeLore adapter"))
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        if self.welore_role[adapter_name] == "lrc":
            down = self.welore_down[adapter_name]
            up = self.welore_up[adapter_name]
            result = F.linear(F.linear(cast_input_dtype(self, x, down.dtype), down), up)
        else:
            weight = self.welore_weight[adapter_name]
            result = F.linear(cast_input_dtype(self, x, weight.dtype), weight)
        bias = self.get_base_layer().bias
        if bias is not None:
            result = result + bias.to(result.dtype)
        return result.to(previous_dtype)

    def extra_repr(self) -> str:
        parts = [f"{a}: {self.welore_role[a]} rank={self.welore_rank[a]}" for a in self.welore_role]
        parts.append(f"dense={'dropped' if self._dense_dropped else 'kept'}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return "welore." + super().__repr__()
