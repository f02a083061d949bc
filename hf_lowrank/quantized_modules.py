"""``QuantizedLowRankLinear``: a factor pair stored as group-wise integer codes, computed in the model dtype.

The codes, scales and offsets of each factor are persistent buffers (``down.packed``, ``down.scales``,
``down.offsets``, ``up.packed``, ...; the bias stays a float parameter ``up.bias``), so ``save_pretrained`` writes
them and a factorized checkpoint with ``quantization_config.factor_quantization`` rebuilds this layer before the
weights load. The scheme is :func:`hf_lowrank.ops.quant.quantize_rtn`'s (asymmetric round-to-nearest, an fp16
scale and offset per group of ``group_size`` along each factor's input dimension), fitted by
:func:`hf_lowrank.ops.quant_lowrank.quantize_factor_pair`.

Compute: every forward dequantizes both factors to the model dtype and runs the two GEMMs of a float pair. That costs
time (unpacking ``r * (in + out)`` codes per call; see ``forward``), and saves bytes on disk and in the resident
weights, not work. Casts of the model (``.half()``, ``.float()``, ``.to(torch.bfloat16)``) change the dtype the
layer computes in and leave the codes, scales and offsets exactly as stored (a bf16 copy of an fp16 scale would
change the model).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .compression.checkpoint_checks import FACTOR_CODE_FORMAT
from .modules import LowRankLinear, set_submodule
from .ops.quant import QuantizedTensor, dequantize_rtn
from .ops.quant_lowrank import DEFAULT_FACTOR_SCHEME, FACTOR_SCHEMES, factor_bytes, quantize_factor_pair

__all__ = [
    "QuantizedFactor",
    "QuantizedLowRankLinear",
    "dequantize_factors",
    "quantize_lowrank",
    "recorded_factor_quantization",
]

_CODE_BUFFERS = ("packed", "scales", "offsets")


class QuantizedFactor(nn.Module):
    """One factor ``(out_features, in_features)`` held as codes; ``forward`` is ``F.linear`` with its dequantized
    weight (and the optional float bias).

    Args:
        in_features, out_features: the factor's shape is ``(out_features, in_features)``.
        bits: code width, 2..8.
        group_size: codes per fp16 scale and offset, along ``in_features``.
        bias: whether the factor has a float bias (``up`` carries the replaced layer's).
        device: where the buffers go (``"meta"`` when transformers builds the model before loading).
        dtype: the floating dtype the factor computes in (and of the bias).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.compute_dtype = dtype or torch.get_default_dtype()
        n_groups = -(-in_features // group_size)
        numel = in_features * out_features
        self.register_buffer("packed", torch.zeros(-(-numel * bits // 8), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.compute_dtype)) if bias else None

    def codes(self) -> QuantizedTensor:
        """The stored codes as a :class:`~hf_lowrank.ops.quant.QuantizedTensor` (views of the buffers)."""
        return QuantizedTensor(self.packed, self.scales, self.offsets, (self.out_features, self.in_features),
                               self.bits, self.group_size)

    def load_codes_(self, q: QuantizedTensor) -> QuantizedFactor:
        """Copy ``q`` (of this factor's shape, bits and group size, fp16 scales) into the buffers, in place."""
        if tuple(q.shape) != (self.out_features, self.in_features) or (q.bits, q.group_size) != (self.bits,
                                                                                                  self.group_size):
            raise ValueError(
                f"Codes of shape {tuple(q.shape)} at {q.bits} bits, group {q.group_size} do not fit a "
                f"({self.out_features}, {self.in_features}) factor at {self.bits} bits, group {self.group_size}."
            )
        if q.scales.dtype != torch.float16 or q.offsets.dtype != torch.float16:
            raise ValueError(
                f"A factor's values span beyond float16 (scales came out {q.scales.dtype}); the quantized layer "
                "stores fp16 scales. Keep this model's factors in floating point (factor_bits=None)."
            )
        with torch.no_grad():
            for name in _CODE_BUFFERS:
                getattr(self, name).copy_(getattr(q, name))
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``(out, in)`` weight in the compute dtype (a fresh tensor, no gradient)."""
        return dequantize_rtn(self.codes(), self.compute_dtype)

    def check_codes(self, name: str = "") -> None:
        """Raise ``ValueError`` naming the factor when the buffers do not hold valid codes of its shape (a truncated
        or edited checkpoint): wrong sizes or dtypes, or non-finite / negative scales."""
        where = f" of '{name}'" if name else ""
        want = {"packed": ((-(-self.in_features * self.out_features * self.bits // 8),), torch.uint8),
                "scales": ((self.out_features, -(-self.in_features // self.group_size)), torch.float16),
                "offsets": ((self.out_features, -(-self.in_features // self.group_size)), torch.float16)}
        for key, (shape, dtype) in want.items():
            t = getattr(self, key)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"The quantized factor{where} holds {key} of shape {tuple(t.shape)} ({t.dtype}), expected {shape} "
                    f"({dtype}) for a ({self.out_features}, {self.in_features}) factor at {self.bits} bits, group "
                    f"{self.group_size}: the checkpoint was truncated or edited. Copy it again from the original save."
                )
        if t.device.type != "meta" and not (bool(torch.isfinite(self.scales).all()) and bool(
                torch.isfinite(self.offsets).all()) and bool((self.scales >= 0).all())):
            raise ValueError(f"The quantized factor{where} has non-finite or negative scales: the checkpoint is "
                             "corrupt. Copy it again from the original save.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        # Casts change the compute dtype and the bias; the codes only move (their dtype is part of the format).
        probe = fn(torch.zeros((), dtype=self.compute_dtype, device=self.scales.device))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        saved = {k: self._buffers.pop(k) for k in _CODE_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for key, buf in saved.items():
                moved = fn(buf)
                self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class QuantizedLowRankLinear(LowRankLinear):
    """A :class:`~hf_lowrank.modules.LowRankLinear` whose ``down`` and ``up`` are :class:`QuantizedFactor` codes.

    Everything that handles a ``LowRankLinear`` sees one: ``rank``, ``weight`` (``up @ down`` dequantized, for
    inspection), ``bias``, ``to_dense`` (and so ``decompress_model``), the checkpoint's rank map. The factors do not
    train (codes are buffers; the bias does) and peft cannot wrap them (they are not ``nn.Linear``: peft refuses
    them by name); :func:`dequantize_factors` turns the layers back into float ``LowRankLinear`` for that.

    Args:
        in_features, out_features, rank, bias, device, dtype: as for ``LowRankLinear`` (``dtype`` is the compute
            dtype).
        bits: code width, 2..8.
        group_size: codes per scale along each factor's input dimension.
        scheme: how the codes were fitted (``"refit"`` / ``"naive"``), recorded in the checkpoint.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int = 4, group_size: int = 64,
                 bias: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 scheme: str = "refit") -> None:
        nn.Module.__init__(self)
        limit = min(in_features, out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise ValueError(f"QuantizedLowRankLinear rank must be an integer in [1, {limit}], got {rank!r}.")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an integer in [2, 8] (4 or 8 are usual), got {bits!r}.")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer (e.g. 64), got {group_size!r}.")
        if scheme not in FACTOR_SCHEMES:
            raise ValueError(f"scheme must be one of {FACTOR_SCHEMES}, got {scheme!r}.")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.scheme = bits, group_size, scheme
        self.down = QuantizedFactor(in_features, rank, bits, group_size, False, device, dtype)
        self.up = QuantizedFactor(rank, out_features, bits, group_size, bias, device, dtype)
        self.conv1d = False

    def lay_out_for_speed_(self) -> QuantizedLowRankLinear:
        """A no-op: the codes have one layout (``LowRankLinear``'s column-major ``up`` does not apply)."""
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.down.compute_dtype

    def nbytes(self) -> int:
        """Bytes stored: both factors' codes, scales and offsets, plus the bias."""
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return factor_bytes(self.out_features, self.in_features, self.rank, self.bits, self.group_size) + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``up(down(x))`` with both factors dequantized to the compute dtype on this call.

        ``x`` is cast to the compute dtype when it differs (and the output back), as ``LowRankLinear`` does with
        its factor dtype; under autocast the input is left alone. Cost per call, beyond the two GEMMs: unpacking
        ``rank * (in + out)`` codes and writing the same number of dequantized values (one pass over the codes,
        a temporary factor pair in the compute dtype).
        """
        dtype = self.compute_dtype
        cast = not (x.dtype == dtype or not x.is_floating_point() or torch.is_autocast_enabled(x.device.type))
        h = x.to(dtype) if cast else x
        down, up = self.down, self.up
        y = F.linear(F.linear(h, down.weight), up.weight, up.bias)
        return y.to(x.dtype) if cast else y

    def check_codes(self, name: str = "") -> None:
        """:meth:`QuantizedFactor.check_codes` of both factors."""
        self.down.check_codes(f"{name}.down" if name else "down")
        self.up.check_codes(f"{name}.up" if name else "up")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, group_size={self.group_size}")

    @classmethod
    def from_codes(cls, down: QuantizedTensor, up: QuantizedTensor, bias: torch.Tensor | None = None, *,
                   dtype: torch.dtype = torch.float32, scheme: str = "refit") -> QuantizedLowRankLinear:
        """Build from the codes of ``down (r, in)`` and ``up (out, r)`` (same bits and group size)."""
        if len(down.shape) != 2 or len(up.shape) != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"Codes must be of down (r, in) and up (out, r), got {down.shape} and {up.shape}.")
        if (down.bits, down.group_size) != (up.bits, up.group_size):
            raise ValueError("Both factors must share bits and group_size.")
        r, n_in = down.shape
        layer = cls(n_in, up.shape[0], r, down.bits, down.group_size, bias=bias is not None,
                    device=down.packed.device, dtype=dtype, scheme=scheme)
        layer.down.load_codes_(down)
        layer.up.load_codes_(up)
        if bias is not None:
            with torch.no_grad():
                layer.up.bias.copy_(bias)
        return layer

    def to_lowrank(self) -> LowRankLinear:
        """The float ``LowRankLinear`` holding the dequantized factors (in the compute dtype)."""
        layer = LowRankLinear.from_factors(self.down.weight, self.up.weight, self.bias, dtype=self.compute_dtype)
        layer.conv1d = self.conv1d
        return layer.train(self.training)


def dequantize_factors(model: nn.Module) -> nn.Module:
    """Replace every :class:`QuantizedLowRankLinear` in ``model`` by the float ``LowRankLinear`` of its dequantized
    factors (in place; the values are unchanged), and record the model as a float factorized model again, so that
    its factors train, peft can wrap them, and ``save_pretrained`` writes float factors (for vLLM, which does not
    read the codes). Returns ``model``."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLowRankLinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_lowrank())
    if names:
        from .compression.checkpoint import LowRankConfig, mark_compressed

        quant = getattr(getattr(model, "config", None), "quantization_config", None)
        method = quant.method if isinstance(quant, LowRankConfig) else "svd"
        extra = dict(quant.extra) if isinstance(quant, LowRankConfig) else None
        mark_compressed(model, {}, method=method, extra=extra)
    return model


def recorded_factor_quantization(model: nn.Module) -> dict | None:
    """The ``factor_quantization`` a checkpoint of ``model`` records: ``None`` when no factorized module holds codes,
    else ``{"bits", "group_size", "scheme", "format"}`` shared by all of them.

    Raises:
        ValueError: a model mixing quantized and float factor pairs, or several bit widths / group sizes (one
            checkpoint records one factor quantization).
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    quantized = {n: m for n, m in layers.items() if isinstance(m, QuantizedLowRankLinear)}
    if not quantized:
        return None
    codes = {(m.bits, m.group_size, m.scheme) for m in quantized.values()}
    floats = [n for n in layers if n not in quantized]
    if floats or len(codes) != 1:
        raise ValueError(
            f"A checkpoint records one factor quantization for all its factorized modules, but this model mixes "
            f"{'float factors (e.g. ' + repr(floats[0]) + ') with ' if floats else ''}codes {sorted(codes)} "
            "(bits, group size, scheme). Quantize every factorized module the same way, or run "
            "hf_lowrank.quantized_modules.dequantize_factors(model) to keep float factors."
        )
    bits, group_size, scheme = codes.pop()
    return {"bits": bits, "group_size": group_size, "scheme": scheme, "format": FACTOR_CODE_FORMAT}


@torch.no_grad()
def quantize_lowrank(layer: LowRankLinear, bits: int, *, group_size: int = 64, scheme: str = DEFAULT_FACTOR_SCHEME,
                     W: torch.Tensor | None = None, in_factor: torch.Tensor | None = None) -> QuantizedLowRankLinear:
    """The :class:`QuantizedLowRankLinear` of a float factor pair (the layer itself is left unchanged).

    Args:
        layer: a float ``LowRankLinear``.
        bits, group_size, scheme: see :func:`hf_lowrank.ops.quant_lowrank.quantize_factor_pair`.
        W: the dense ``(out, in)`` weight the pair approximates: the refit's target (default ``up @ down``).
        in_factor: the input-side weighting ``L_in`` the pair was fitted with (``None``: unweighted).

    Returns:
        The quantized layer, computing in the factors' dtype, on their device, with the same bias and ``conv1d``.
    """
    if isinstance(layer, QuantizedLowRankLinear) or not isinstance(layer, LowRankLinear):
        raise ValueError(f"quantize_lowrank needs a float LowRankLinear, got {type(layer).__name__}.")
    down, up = layer.down.weight, layer.up.weight
    q = quantize_factor_pair(down.float(), up.float(), bits, group_size=group_size, scheme=scheme,
                             W=None if W is None else W.float(), in_factor=in_factor)
    new = QuantizedLowRankLinear.from_codes(q.down, q.up, layer.bias, dtype=down.dtype, scheme=scheme)
    new.conv1d = layer.conv1d
    return new.to(down.device).train(layer.training)
