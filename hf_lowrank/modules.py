"""``LowRankLinear``: a Linear layer stored as two factors, ``y = up(down(x))``."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._compat import unpack_bnb_cpu_weight
from .ops.fisher import fwsvd

__all__ = ["LowRankLinear", "dense_weight", "is_conv1d", "is_quantized", "linear_shape"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a GPT-2-style ``transformers.pytorch_utils.Conv1D`` (a Linear whose weight is stored
    ``(in, out)``: ``y = x @ weight + bias``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear-like module: ``nn.Linear`` (bitsandbytes ones included) or a
    ``Conv1D`` (``(nf, nx)``; it has no ``in_features`` / ``out_features``)."""
    if is_conv1d(module):
        return module.nf, module.nx
    return module.out_features, module.in_features


def is_quantized(linear: nn.Module) -> bool:
    """Whether ``linear`` holds a quantized weight that peft knows (bitsandbytes 4/8-bit, HQQ, ...).

    peft's own test (``peft.utils.resolve_quantization_backend``; SPSFT layers keep the backend it returns, as peft's
    layers do).
    """
    from peft.utils import resolve_quantization_backend

    return resolve_quantization_backend(linear) is not None


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The dense ``(out, in)`` weight of a Linear-like module, dequantized when it is quantized (bitsandbytes 4/8-bit).

    The package's one way to read a possibly quantized weight: dequantization is peft's
    (``peft.utils.integrations.dequantize_module_weight``, what peft's LoRA merge uses), after undoing bitsandbytes'
    CPU inference repacking of a 4-bit weight (:func:`hf_lowrank._compat.unpack_bnb_cpu_weight`).

    Args:
        linear: an ``nn.Linear`` (or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``), or a transformers
            ``Conv1D``, whose ``(in, out)`` weight is returned transposed.

    Returns:
        ``(out, in)`` floating tensor (a fresh tensor for quantized layers, the parameter's data otherwise: a
        transposed view of it for a ``Conv1D``).
    """
    weight = linear.weight
    if is_conv1d(linear):
        return weight.data.T
    from peft.utils.integrations import dequantize_module_weight

    unpack_bnb_cpu_weight(linear)  # no-op unless a repacked bitsandbytes 4-bit weight
    W = dequantize_module_weight(linear)  # the weight itself when it is not quantized
    if W is weight:
        return weight.data
    return W.reshape(linear_shape(linear))


def _plain(layer: nn.Module) -> bool:
    """An unwrapped ``nn.Linear``: no hooks, no replaced ``forward`` (as accelerate's device hooks do)."""
    return (type(layer) is nn.Linear and not layer._forward_hooks and not layer._forward_pre_hooks
            and not layer._backward_hooks and not layer._backward_pre_hooks and "forward" not in layer.__dict__)


class LowRankLinear(nn.Module):
    """A rank-``r`` factorization of an ``(out, in)`` Linear: ``y = x @ down.T @ up.T + bias``.

    The factors are ordinary ``nn.Linear`` submodules (``down: in -> r`` without bias, ``up: r -> out`` with the
    original bias), so they train, cast, shard and save like any other Linear, and peft can target them by name.

    Args:
        in_features: input width of the replaced Linear.
        out_features: output width of the replaced Linear.
        rank: inner dimension, ``1 <= rank <= min(in_features, out_features)``.
        bias: whether the layer has a bias (kept on ``up``).
        device, dtype: as for ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        limit = min(in_features, out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise ValueError(
                f"LowRankLinear rank must be an integer in [1, {limit}] for a ({out_features}, {in_features}) "
                f"weight, got {rank!r}."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        #: the replaced layer was a GPT-2-style ``Conv1D``: :meth:`to_dense` gives one back (weight ``(in, out)``)
        self.conv1d = False
        self.lay_out_for_speed_()

    def lay_out_for_speed_(self) -> LowRankLinear:
        """Store ``up.weight`` column-major (the ``(out, r)`` transpose of a contiguous ``(r, out)`` tensor), in place.

        The values, the shape, the parameter object and everything that reads the weight are unchanged; only the
        memory order is. A one-token step (decode) is a matrix-vector product bound by reading the weights, and with
        a row-major ``(out, r)`` factor it is ``out`` short dot products of length ``r``; column-major it streams ``r``
        rows of ``out`` values: a whole SmolLM2 decode step at keep 0.9 went from 1.048 to 0.92 of dense (an A/B of
        the two layouts in one process; 0.941 in ``benchmarks/inference_speed.py``), and prefill is no slower. ``down`` (``in`` long rows) is already
        best row-major. Called on construction and by ``from_pretrained`` after loading (which assigns new
        row-major tensors); safe to call again (a no-op when the layout is already there). A layer whose ``up`` is
        wrapped (peft, bitsandbytes) is left alone.

        Returns:
            ``self``.
        """
        up = self._modules["up"]
        w = up._parameters.get("weight") if type(up) is nn.Linear else None
        if (
            isinstance(w, torch.Tensor) and type(w.data) is torch.Tensor  # not a tensor-parallel shard (DTensor)
            and w.dim() == 2 and w.is_floating_point() and w.stride() != (1, w.shape[0])
        ):
            with torch.no_grad():
                w.data = w.data.t().contiguous().t()
        return self

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out, in)`` product ``up @ down`` (a fresh tensor; for inspection, not for training)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``up(down(x))`` for ``x`` of shape ``(..., in)``; returns ``(..., out)`` in ``x``'s dtype.

        Factors stored in another floating dtype than the activations (e.g. fp16 factors in an fp32 model, from
        ``compress_model(..., dtype=torch.float16)``) get ``x`` cast to the factor dtype and the output cast back.
        Under autocast the input is left alone (autocast already picks the matmul dtype).
        """
        # Registered submodules and parameters are read from their dicts, not through nn.Module.__getattr__: that
        # costs about as much as a small decode-step GEMM per access, and a factor pair would pay it six times.
        modules = self._modules
        down, up = modules["down"], modules["up"]
        plain = _plain(down) and _plain(up)
        weight = down._parameters["weight"] if plain else getattr(down, "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else x.dtype
        cast = not (
            x.dtype == dtype
            or not (x.is_floating_point() and dtype.is_floating_point)
            or torch.is_autocast_enabled(x.device.type)
        )
        h = x.to(dtype) if cast else x
        if plain:  # two GEMMs without two module calls: decode steps are call-bound
            up_params = up._parameters
            y = F.linear(F.linear(h, weight), up_params["weight"], up_params["bias"])
        else:  # a wrapped factor (peft adapter, accelerate hook, ...) runs as a module
            y = up(down(h))
        return y.to(x.dtype) if cast else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    @classmethod
    def from_factors(
        cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None, *, dtype: torch.dtype | None = None
    ) -> LowRankLinear:
        """Build from factors ``down (r, in)`` and ``up (out, r)`` (and an optional ``(out,)`` bias)."""
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"Factors must be down (r, in) and up (out, r) with the same r, got {tuple(down.shape)} and "
                f"{tuple(up.shape)}."
            )
        dtype = dtype or down.dtype
        layer = cls(down.shape[1], up.shape[0], down.shape[0], bias=bias is not None, device=down.device, dtype=dtype)
        with torch.no_grad():
            layer.down.weight.copy_(down)
            layer.up.weight.copy_(up)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(
        cls,
        linear: nn.Module,
        rank: int,
        *,
        row_weights: torch.Tensor | None = None,
        col_weights: torch.Tensor | None = None,
        exponent: float = 0.5,
        eps: float = 1e-6,
        method: str = "auto",
        dtype: torch.dtype | None = None,
        name: str | None = None,
    ) -> LowRankLinear:
        """Factorize a dense (or bitsandbytes-quantized) Linear by truncated SVD, optionally Fisher-weighted.

        Args:
            linear: the Linear to replace; its weight is ``(out, in)``.
            rank: kept rank.
            row_weights: optional ``(out,)`` importance per output row (e.g. accumulated Fisher); the SVD then
                minimises ``||D_out (W - W_hat) D_in||_F`` with ``D = diag(importance ** exponent)`` (FWSVD).
            col_weights: optional ``(in,)`` importance per input column.
            exponent, eps: see :func:`hf_lowrank.ops.fisher.fisher_weights`.
            method: ``"auto"``, ``"exact"`` or ``"randomized"`` (see :func:`hf_lowrank.ops.svd.truncated_svd`).
            dtype: dtype of the new factors (default: the weight's dtype, float32 for quantized layers).
            name: module name for error messages.
        """
        W = dense_weight(linear)
        out_dtype = dtype or (W.dtype if W.is_floating_point() else torch.float32)

        down, up = fwsvd(
            W, rank, row_fisher=row_weights, col_fisher=col_weights, exponent=exponent, eps=eps, method=method,
            name=name,
        )
        bias = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
        layer = cls.from_factors(down.to(out_dtype), up.to(out_dtype), bias, dtype=out_dtype)
        return layer.to(W.device)

    def to_dense(self) -> nn.Module:
        """The dense layer holding ``up @ down`` (and the bias), in the factors' dtype and device: an ``nn.Linear``,
        or a ``Conv1D`` (weight ``(in, out)``) when the replaced layer was one, so a decompressed GPT-2 saves the
        layout stock transformers loads."""
        w = self.up.weight
        product = (self.up.weight.float() @ self.down.weight.float()).to(w.dtype)
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype)
            product = product.T
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                              dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(product)
            if self.bias is not None:  # a Conv1D always has one
                dense.bias.copy_(self.bias)
        return dense


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (e.g. ``model.layers.0.mlp.up_proj``) by ``new``.

    The parent is found with ``get_submodule``, so numeric components index a ``ModuleList``. Torch 2.5+ has the
    same as ``nn.Module.set_submodule`` (which also refuses an empty name or a non-module ``new``), but it cannot be
    relied on with torch 2.4, which the package supports: it was added in June 2024 (pytorch#127714) and, until a
    fix in July 2024 (pytorch#130075), refused every parent that is not exactly an ``nn.Module``, such as a
    ``ModuleList``.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
