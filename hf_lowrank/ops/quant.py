"""Round-to-nearest n-bit quantization with bit packing, and projection onto the Stiefel manifold.

Pure math on torch tensors, used by ERE (the residual encoding of Ryu et al. 2023, arXiv:2305.18425) and by the
quantized factor pairs of :mod:`hf_lowrank.ops.quant_lowrank`.

Scheme (``"rtn-affine-v1"``): asymmetric min/max affine quantization per group of ``group_size`` consecutive
elements along the last dimension. Each group stores an ``offset`` (its minimum) and a ``scale``
(``(max - min) / (2**bits - 1)``), both fp16 by default, and codes ``c = round((x - offset) / scale)`` in
``[0, 2**bits - 1]``; ``x_hat = offset + c * scale``. A float offset (rather than an integer zero point) uses all
``2**bits`` levels over exactly the group's range. The stored fp16 ``offset`` is rounded toward ``-inf`` and the
stored ``scale`` toward ``+inf`` and the codes are computed against those stored values, so the stored grid always
covers the group and every element is within half a stored step of its original: ``|x - x_hat| <= scale / 2``
(up to float32 arithmetic). Tensors whose range does not fit fp16 use float32 scales automatically (float64
scales for a float64 tensor beyond float32). The last
group of a row whose length is not a multiple of ``group_size`` is simply shorter.

Packing: codes are written as one little-endian bit stream (element ``i`` occupies bits ``[i*bits, (i+1)*bits)``,
least significant bit first), padded with zero bits to a whole byte. For 4 bits this is the usual two codes per
byte, low nibble first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .svd import full_svd

__all__ = [
    "QuantizedTensor",
    "dequantize_rtn",
    "pack_bits",
    "quantize_rtn",
    "stiefel_project",
    "unpack_bits",
]

_SCHEME_VERSION = 1
_FP16_MAX = float(torch.finfo(torch.float16).max)
_FP32_MAX = float(torch.finfo(torch.float32).max)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}. Use 4 (the ERE default) or 8.")
    return bits


def _check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer (e.g. 64), got {group_size!r}.")
    return group_size


@dataclass
class QuantizedTensor:
    """A round-to-nearest quantized tensor (scheme in the module docstring).

    Attributes:
        packed: ``(ceil(numel * bits / 8),)`` uint8 bit stream of the codes, in row-major element order.
        scales: ``(*shape[:-1], n_groups)`` per-group step, fp16 (fp32 when the range does not fit fp16).
        offsets: ``(*shape[:-1], n_groups)`` per-group minimum, same dtype as ``scales``.
        shape: shape of the original tensor.
        bits: code width, 2..8.
        group_size: elements per group along the last dimension.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, ...]
    bits: int
    group_size: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def nbytes(self) -> int:
        """Storage in bytes (codes, scales and offsets)."""
        return (
            self.packed.numel()
            + self.scales.numel() * self.scales.element_size()
            + self.offsets.numel() * self.offsets.element_size()
        )

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Plain tensors for ``safetensors.torch.save_file``, self-contained (no header metadata needed).

        Args:
            prefix: prepended to every key (e.g. ``"layers.0.q_proj.U."``), so several tensors share one file.

        Returns:
            ``{prefix + "packed": uint8, prefix + "scales": ..., prefix + "offsets": ...,
            prefix + "qmeta": int64 [version, bits, group_size, ndim, *shape]}``.
        """
        meta = torch.tensor(
            [_SCHEME_VERSION, self.bits, self.group_size, len(self.shape), *self.shape], dtype=torch.int64
        )
        return {
            f"{prefix}packed": self.packed.contiguous(),
            f"{prefix}scales": self.scales.contiguous(),
            f"{prefix}offsets": self.offsets.contiguous(),
            f"{prefix}qmeta": meta,
        }

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> QuantizedTensor:
        """Inverse of :meth:`to_dict`.

        Args:
            tensors: a mapping holding the keys written by :meth:`to_dict` (other keys are ignored).
            prefix: the prefix used when writing.

        Raises:
            ValueError: missing keys, an unknown scheme version, or sizes that disagree with the metadata.
        """
        keys = [f"{prefix}{k}" for k in ("packed", "scales", "offsets", "qmeta")]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"Quantized tensor entries {missing} not found; check the prefix {prefix!r}.")
        meta = [int(v) for v in tensors[keys[3]].tolist()]
        if len(meta) < 4 or meta[0] != _SCHEME_VERSION or len(meta) != 4 + meta[3]:
            raise ValueError(
                f"Unsupported quantization metadata {meta} under prefix {prefix!r}: expected scheme version "
                f"{_SCHEME_VERSION}. Re-encode with this version of hf_lowrank."
            )
        bits, group_size, shape = _check_bits(meta[1]), _check_group_size(meta[2]), tuple(meta[4:])
        q = cls(tensors[keys[0]], tensors[keys[1]], tensors[keys[2]], shape, bits, group_size)
        n_groups = -(-shape[-1] // group_size) if shape else 1
        expected = (*shape[:-1], n_groups)
        if q.packed.dtype != torch.uint8 or q.packed.numel() != -(-q.numel * bits // 8):
            raise ValueError(f"Packed codes under prefix {prefix!r} do not match shape {shape} at {bits} bits.")
        if tuple(q.scales.shape) != expected or tuple(q.offsets.shape) != expected:
            raise ValueError(
                f"Scales under prefix {prefix!r} should have shape {expected}, got {tuple(q.scales.shape)}."
            )
        return q


@torch.no_grad()
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-wide codes into a little-endian byte stream.

    Args:
        codes: uint8 tensor of any shape (flattened in row-major order), values in ``[0, 2**bits - 1]``.
        bits: code width, 2..8.

    Returns:
        ``(ceil(numel * bits / 8),)`` uint8 tensor.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}. Convert with .to(torch.uint8) after range checks.")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= (1 << bits):
        raise ValueError(f"codes must be < 2**bits = {1 << bits} for bits={bits}, got a maximum of {int(flat.max())}.")
    if bits == 8:
        return flat.clone()
    n = flat.numel()
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-n) % per
        x = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * bits
        return (x << shifts).sum(dim=1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # (n * bits,) bits, LSB first
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).view(-1, 8).to(torch.int32)
    weights = torch.arange(8, dtype=torch.int32, device=flat.device)
    return (stream << weights).sum(dim=1).to(torch.uint8)


@torch.no_grad()
def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: ``(ceil(numel * bits / 8),)`` uint8 stream.
        bits: code width, 2..8.
        numel: number of codes to read.

    Returns:
        ``(numel,)`` uint8 codes.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}.")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative integer, got {numel!r}.")
    flat = packed.reshape(-1)
    need = -(-numel * bits // 8)
    if flat.numel() != need:
        raise ValueError(f"{numel} codes at {bits} bits need {need} packed bytes, got {flat.numel()}.")
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8, device=flat.device) * bits
        codes = (flat[:, None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:numel].contiguous()
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)[: numel * bits].view(numel, bits).to(torch.int32)
    weights = torch.arange(bits, dtype=torch.int32, device=flat.device)
    return (stream << weights).sum(dim=1).to(torch.uint8)


def _grouped(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """``(rows, n) -> (rows, n_groups, group_size)`` padding the last group by repeating its last element."""
    rows, n = x.shape
    n_groups = -(-n // group_size)
    pad = n_groups * group_size - n
    if pad:
        x = torch.cat([x, x[:, -1:].expand(rows, pad)], dim=1)
    return x.reshape(rows, n_groups, group_size), n_groups


@torch.no_grad()
def quantize_rtn(
    x: torch.Tensor, bits: int, *, group_size: int = 64, scale_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    """Round-to-nearest asymmetric quantization per group along the last dimension, packed.

    Args:
        x: tensor of any floating dtype and shape (``ndim >= 1``), finite.
        bits: code width, 2..8.
        group_size: elements per group along the last dimension, ``> 0``.
        scale_dtype: ``torch.float16`` (default) or ``torch.float32`` for scales and offsets; float32 is used
            anyway when the tensor's values or range do not fit fp16, and float64 when they do not fit float32
            (only possible for a float64 input).

    Group minima, maxima and ranges are computed in float64, and the codes too when a group's range comes near
    the float32 limit, so a finite float32 tensor spanning ``[-3e38, 3e38]`` quantizes correctly.

    Returns:
        :class:`QuantizedTensor` with ``|dequantize_rtn(q) - x| <= q.scales / 2`` per element.

    Raises:
        ValueError: invalid ``bits`` / ``group_size`` / ``scale_dtype``, inf or NaN values, or a float64 group
            whose range (max - min) overflows float64.
    """
    _check_bits(bits)
    _check_group_size(group_size)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"quantize_rtn needs a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}.")
    if x.ndim == 0:
        raise ValueError("quantize_rtn needs a tensor with at least one dimension; reshape a scalar to (1,).")
    if scale_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_rtn got inf or NaN values; they cannot be quantized. Check the tensor upstream.")
    shape = tuple(x.shape)
    levels = (1 << bits) - 1
    n = shape[-1]
    rows = x.numel() // n if n else 0
    n_groups = -(-n // group_size)
    if x.numel() == 0:
        empty = torch.zeros((*shape[:-1], n_groups), dtype=scale_dtype, device=x.device)
        return QuantizedTensor(
            torch.zeros(0, dtype=torch.uint8, device=x.device), empty, empty.clone(), shape, bits, group_size
        )
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    g, _ = _grouped(x.detach().reshape(rows, n).to(cdtype), group_size)
    # group statistics in float64 (min/max are exact in any dtype; the range of a float32 group can exceed float32)
    gmin, gmax = g.amin(dim=2).double(), g.amax(dim=2).double()
    span = gmax - gmin
    if not bool(torch.isfinite(span).all()):
        raise ValueError(
            f"quantize_rtn: the range (max - min) of a group of {group_size} elements exceeds float64 "
            f"({float(gmin.min()):.3g} to {float(gmax.max()):.3g}), so no finite scale exists. Rescale the tensor "
            "(e.g. divide it by its largest magnitude) before quantizing."
        )
    big = max(float(gmin.abs().max()), float(gmax.abs().max()), float(span.max()))
    if cdtype == torch.float32 and big >= 0.25 * _FP32_MAX:
        cdtype = torch.float64  # x - offset (up to 2 * float32 max) would overflow float32 arithmetic
        g = g.double()
    step = float(span.max()) / levels
    big = max(float(gmin.abs().max()), float(gmax.abs().max()), step)
    if scale_dtype == torch.float16 and big * 1.01 >= _FP16_MAX:
        scale_dtype = torch.float32
    if scale_dtype == torch.float32 and big * 1.01 >= _FP32_MAX:
        scale_dtype = torch.float64  # only reachable for a float64 input whose values or range exceed float32
    # Directed rounding of the per-group parameters (small: numel / group_size), done on the CPU in float64 where
    # torch.nextafter supports every float dtype. The offset rounds toward -inf so the grid starts at or below
    # the group minimum; the scale toward +inf so the grid reaches the group maximum.
    gmin_c, gmax_c = gmin.cpu(), gmax.cpu()
    off = gmin_c.to(scale_dtype)
    down = off.double() > gmin_c
    if bool(down.any()):
        off = torch.where(down, torch.nextafter(off, torch.full_like(off, -float("inf"))), off)
    off_c = off.double()
    scale = ((gmax_c - off_c) / levels).to(scale_dtype)
    up = scale.double() * levels + off_c < gmax_c
    if bool(up.any()):
        scale = torch.where(up, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.where(scale > 0, scale, torch.full_like(scale, tiny))  # constant group: any positive step
    off, scale = off.to(x.device), scale.to(x.device)
    off_c = off.to(cdtype)
    scale_c = scale.to(cdtype)
    codes = torch.round((g - off_c[..., None]) / scale_c[..., None]).clamp_(0, levels).to(torch.uint8)
    codes = codes.reshape(rows, n_groups * group_size)[:, :n]
    packed = pack_bits(codes, bits)
    return QuantizedTensor(
        packed=packed,
        scales=scale.reshape(*shape[:-1], n_groups),
        offsets=off.reshape(*shape[:-1], n_groups),
        shape=shape,
        bits=bits,
        group_size=group_size,
    )


@torch.no_grad()
def dequantize_rtn(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct a tensor from :func:`quantize_rtn` output.

    Args:
        q: the quantized tensor.
        dtype: output floating dtype.

    Returns:
        Tensor of shape ``q.shape`` and dtype ``dtype``, ``offset + code * scale`` per element (computed in float64
        when that would overflow float32, and saturated to the finite range of ``dtype``).
    """
    _check_bits(q.bits)
    _check_group_size(q.group_size)
    shape = tuple(q.shape)
    numel = q.numel
    if numel == 0:
        return torch.zeros(shape, dtype=dtype, device=q.packed.device)
    n = shape[-1]
    rows = numel // n
    gs = q.group_size
    n_groups = -(-n // gs)
    codes = unpack_bits(q.packed, q.bits, numel).reshape(rows, n)
    pad = n_groups * gs - n
    if pad:
        codes = torch.cat([codes, codes.new_zeros(rows, pad)], dim=1)
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    levels = (1 << q.bits) - 1
    # fp16 scales and offsets cannot reach float32's limit (no host sync then: the factor layers dequantize per
    # forward); wider ones are checked
    top = 0.0 if q.scales.dtype == torch.float16 and q.offsets.dtype == torch.float16 else (
        float(q.offsets.double().abs().max()) + levels * float(q.scales.double().abs().max()))
    if q.scales.dtype == torch.float64 or top >= 0.25 * _FP32_MAX:
        cdtype = torch.float64  # offset + code * scale would overflow float32 arithmetic
    scale = q.scales.reshape(rows, n_groups, 1).to(cdtype)
    off = q.offsets.reshape(rows, n_groups, 1).to(cdtype)
    x = off + codes.reshape(rows, n_groups, gs).to(cdtype) * scale
    if dtype != cdtype and dtype.is_floating_point:
        info = torch.finfo(dtype)  # saturate: the grid may reach a hair beyond the largest finite value
        x = x.clamp(-info.max, info.max)
    return x.reshape(rows, n_groups * gs)[:, :n].reshape(shape).to(dtype)


@torch.no_grad()
def stiefel_project(X: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (the polar factor), in Frobenius norm.

    With the thin SVD ``X = P Sigma Q^T``, returns ``P Q^T``, which minimises ``||X - Y||_F`` over ``Y`` with
    ``Y^T Y = I`` (used by ERE to restore the orthonormality of dequantized ``U`` and ``V``).

    Args:
        X: ``(m, k)`` matrix with ``m >= k``.

    Returns:
        ``(m, k)`` matrix with orthonormal columns, float32 (float64 for a float64 input).
    """
    if not isinstance(X, torch.Tensor) or X.ndim != 2:
        shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
        raise ValueError(f"stiefel_project needs a 2-D (m, k) matrix, got {shape}.")
    m, k = X.shape
    if m < k:
        raise ValueError(
            f"stiefel_project needs m >= k to give orthonormal columns, got {(m, k)}. Pass the transpose (e.g. "
            "V = Vh.T) and transpose the result back."
        )
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    if k == 0:
        return X.to(dtype)
    P, _, Qh = full_svd(X, name="stiefel_project")
    return (P @ Qh).to(dtype)
