"""Group-wise quantization of a low-rank factor pair, with the error-aware refit of ``up``.

Pure math on torch tensors. A Linear ``W (out, in)`` approximated by ``up (out, r) @ down (r, in)`` is stored with
both factors quantized by the package's one quantizer (:func:`hf_lowrank.ops.quant.quantize_rtn`: asymmetric
round-to-nearest, an fp16 scale and offset per group). Groups run along the last dimension of each factor, which is
its input dimension (``in`` for ``down``, ``r`` for ``up``): the reduction axis of the GEMM the factor takes part in,
the grouping GPTQ (Frantar et al., 2022, arXiv:2210.17323) and AWQ (Lin et al., 2023, arXiv:2306.00978) use, so a
fused kernel can apply one scale per group of the dot product.

Two schemes:

- ``"naive"``: round both factors independently. The errors of the two factors compound: ``W - U_q D_q`` holds
  ``U (D - D_q)`` and ``(U - U_q) D_q``.
- ``"refit"`` (the default, measured better): quantize ``down`` first, then refit ``up`` in closed form to the
  weighted target before quantizing it. With ``G = L_in L_in^T`` the input-side Gram (the damped, shrunk Gram of the
  module's inputs; the identity when unweighted), the minimiser over ``U`` of ``||L_out^T (W - U D_q) L_in||_F`` is,
  for any invertible output-side factor ``L_out``, ``U = W G D_q^T (D_q G D_q^T)^{-1}`` (the least-squares solution
  of ``U (D_q L_in) = W L_in``): ``up`` absorbs the rounding error of ``down`` in the directions the data uses. The
  same idea as GPTQ's compensation of the not-yet-quantized weights for the quantized ones, here between the two
  factors; it is also the closed-form ``up`` update of the alternating fits in CALDERA (Saha et al., 2024,
  arXiv:2405.18886). The system is solved (Cholesky of the ``(r, r)`` Gram of ``D_q L_in`` in float64, with a
  relative ridge of 1e-10 of its mean diagonal; an eigendecomposition with a clamped spectrum if that still fails),
  never inverted. Cost: one ``(out, in) @ (in, in)`` product and an ``(r, r)`` factorization per module, the order of
  the weighted SVD it follows.
- ``"gptq"``: the refit, with each factor rounded by :func:`gptq_round` instead of to the nearest code: ``down``
  against the input Gram ``G``, ``up`` against the Gram of its own input ``D_q G D_q^T``, each column's rounding
  error moved onto the columns not yet rounded (GPTQ). Costs a Python loop over the columns of each factor.

:data:`DEFAULT_FACTOR_SCHEME` is what ``compress_model(..., factor_bits=...)`` uses (the best measured on SmolLM2,
``benchmarks/factor_quantization.py``).

Run-time cost of the codes: the factor layer (:class:`hf_lowrank.quantized_modules.QuantizedLowRankLinear`)
dequantizes both factors on every forward (unpack the bit stream, ``offset + code * scale`` per element, cast to the
model dtype), then runs the two GEMMs of a float factor pair. That is extra work, not less: the savings are in bytes
stored and held (``bits`` per factor element plus 32 bits of scale and offset per group, against 16 for bf16), not
in time; a fused dequantize-GEMM kernel would be needed to turn the bytes into speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import QuantizedTensor, dequantize_rtn, pack_bits, quantize_rtn

__all__ = [
    "DEFAULT_FACTOR_SCHEME",
    "FACTOR_SCHEMES",
    "QuantizedFactors",
    "factor_bytes",
    "gptq_round",
    "quantize_factor_pair",
    "refit_up",
]

FACTOR_SCHEMES = ("refit", "naive", "gptq")
"""How a factor pair is quantized: ``"refit"`` (``up`` refitted to the quantized ``down``), ``"naive"``, or
``"gptq"`` (the refit, with each factor rounded column by column against its input Hessian, :func:`gptq_round`)."""


DEFAULT_FACTOR_SCHEME = "refit"
"""The scheme of :func:`quantize_factor_pair` and of ``compress_model(..., factor_bits=...)``."""


@dataclass
class QuantizedFactors:
    """A quantized factor pair and its dequantized values.

    Attributes:
        down: codes of ``down (r, in)``, groups along ``in``.
        up: codes of ``up (out, r)``, groups along ``r``.
        down_hat: ``dequantize_rtn(down)``, float32 (float64 for float64 factors).
        up_hat: ``dequantize_rtn(up)``, same dtype.
    """

    down: QuantizedTensor
    up: QuantizedTensor
    down_hat: torch.Tensor
    up_hat: torch.Tensor

    def nbytes(self) -> int:
        """Bytes of both factors' codes, scales and offsets."""
        return self.down.nbytes() + self.up.nbytes()


def factor_bytes(out_features: int, in_features: int, rank: int, bits: int, group_size: int) -> int:
    """Bytes of a quantized ``(out, in)`` factor pair of rank ``rank`` (codes plus an fp16 scale and offset per
    group), without the bias: what :meth:`QuantizedFactors.nbytes` returns for fp16 scales."""
    down = -(-rank * in_features * bits // 8) + rank * -(-in_features // group_size) * 4
    up = -(-out_features * rank * bits // 8) + out_features * -(-rank // group_size) * 4
    return down + up


def _check_in_factor(in_factor: torch.Tensor | None, size: int) -> None:
    if in_factor is None:
        return
    ok = isinstance(in_factor, torch.Tensor) and (
        (in_factor.ndim == 1 and in_factor.shape[0] == size) or (in_factor.ndim == 2 and tuple(in_factor.shape) ==
                                                                  (size, size))
    )
    if not ok:
        shape = tuple(in_factor.shape) if isinstance(in_factor, torch.Tensor) else type(in_factor).__name__
        raise ValueError(f"in_factor must be a ({size},) diagonal or a ({size}, {size}) factor L_in, got {shape}.")


@torch.no_grad()
def refit_up(W: torch.Tensor, down: torch.Tensor, in_factor: torch.Tensor | None = None) -> torch.Tensor:
    """The ``up`` that best completes a fixed ``down``: ``argmin_U ||(W - U down) L_in||_F``.

    Equal to ``W G down^T (down G down^T)^{-1}`` with ``G = L_in L_in^T``; also the minimiser of the two-sided
    error ``||L_out^T (W - U down) L_in||_F`` for any invertible ``L_out`` (the output side factors out of the
    normal equations). Solved by a Cholesky factorization in float64 (see the module docstring for the guard).

    Args:
        W: ``(out, in)`` target weight.
        down: ``(r, in)`` fixed factor (e.g. dequantized).
        in_factor: ``None`` (identity), an ``(in,)`` diagonal or an ``(in, in)`` factor ``L_in``.

    Returns:
        ``(out, r)`` float32 (float64 for a float64 ``W``).
    """
    if W.ndim != 2 or down.ndim != 2 or down.shape[1] != W.shape[1]:
        raise ValueError(f"refit_up needs W (out, in) and down (r, in), got {tuple(W.shape)} and {tuple(down.shape)}.")
    _check_in_factor(in_factor, W.shape[1])
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    A = W.detach().double()
    B = down.detach().to(device=A.device, dtype=torch.float64)
    if in_factor is not None:
        f = in_factor.to(device=A.device, dtype=torch.float64)
        if f.ndim == 1:
            A, B = A * f[None, :], B * f[None, :]
        else:
            A, B = A @ f, B @ f
    H = B @ B.T  # (r, r) = D G D^T
    rhs = A @ B.T  # (out, r) = W G D^T
    r = H.shape[0]
    mean_diag = float(H.diagonal().mean()) if r else 0.0
    if not mean_diag > 0:  # an all-zero down: any up gives W_hat = 0
        return torch.zeros(W.shape[0], r, dtype=dtype, device=W.device)
    eye = torch.eye(r, dtype=torch.float64, device=H.device)
    L, info = torch.linalg.cholesky_ex(H + 1e-10 * mean_diag * eye)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        U = torch.cholesky_solve(rhs.T, L).T
    else:  # numerically singular: solve on the clamped spectrum (a pseudo-inverse with a floor)
        evals, Q = torch.linalg.eigh((H + H.T) / 2)
        floor = 1e-10 * float(evals.abs().max())
        U = ((rhs @ Q) / evals.clamp_min(floor)) @ Q.T
    return U.to(dtype)


@torch.no_grad()
def gptq_round(X: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, *, damping: float = 0.01
               ) -> QuantizedTensor:
    """Round ``X (rows, cols)`` group-wise in the :func:`~hf_lowrank.ops.quant.quantize_rtn` format, column by
    column, each column's rounding error pushed onto the columns not yet rounded so as to minimise
    ``tr((X - X_q) H (X - X_q)^T)``: GPTQ (Frantar et al., 2022, arXiv:2210.17323) with its group-wise scales, each
    group's scale and offset taken from the group's values when its first column is reached.

    Args:
        X: ``(rows, cols)`` float matrix; ``cols`` is the input dimension of the GEMM it takes part in.
        H: ``(cols, cols)`` Gram of that input (positive semi-definite), damped by ``damping`` times its mean
            diagonal.
        bits, group_size: as for :func:`~hf_lowrank.ops.quant.quantize_rtn`.

    Returns:
        The codes (scales and offsets fp16). Codes are clamped to the group's grid, so a column moved by the
        updates beyond its group's range is saturated.
    """
    rows, cols = X.shape
    W = X.detach().double().clone()
    Hd = H.detach().to(device=W.device, dtype=torch.float64)
    mean = float(Hd.diagonal().mean()) if cols else 0.0
    eye = torch.eye(cols, dtype=torch.float64, device=W.device)
    Hd = (Hd + Hd.T) / 2 + (damping * mean if mean > 0 else 1.0) * eye
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:  # not positive definite even damped: plain rounding
        return quantize_rtn(X.detach().to(torch.float64 if X.dtype == torch.float64 else torch.float32), bits,
                            group_size=group_size)
    Uinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper factor of H^{-1}
    levels = (1 << bits) - 1
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    scales, offsets = [], []
    for g0 in range(0, cols, group_size):
        g1 = min(g0 + group_size, cols)
        grid = quantize_rtn(W[:, g0:g1], bits, group_size=g1 - g0)  # this group's scale and offset, fp16
        scale, off = grid.scales[:, 0].double(), grid.offsets[:, 0].double()
        scales.append(grid.scales)
        offsets.append(grid.offsets)
        for j in range(g0, g1):
            c = torch.round((W[:, j] - off) / scale).clamp_(0, levels)
            codes[:, j] = c.to(torch.uint8)
            err = (W[:, j] - (off + c * scale)) / Uinv[j, j]
            if j + 1 < cols:
                W[:, j + 1 :] -= err[:, None] * Uinv[j, j + 1 :][None, :]
    return QuantizedTensor(pack_bits(codes, bits), torch.cat(scales, dim=1), torch.cat(offsets, dim=1),
                           (rows, cols), bits, group_size)


def _input_gram(in_factor: torch.Tensor | None, size: int, device) -> torch.Tensor:
    if in_factor is None:
        return torch.eye(size, dtype=torch.float64, device=device)
    f = in_factor.to(device=device, dtype=torch.float64)
    return torch.diag(f * f) if f.ndim == 1 else f @ f.T


@torch.no_grad()
def quantize_factor_pair(
    down: torch.Tensor,
    up: torch.Tensor,
    bits: int,
    *,
    group_size: int = 64,
    scheme: str = DEFAULT_FACTOR_SCHEME,
    W: torch.Tensor | None = None,
    in_factor: torch.Tensor | None = None,
) -> QuantizedFactors:
    """Quantize a factor pair ``up @ down ~= W`` group-wise, naively or with the refit of ``up``.

    Args:
        down: ``(r, in)`` float factor.
        up: ``(out, r)`` float factor.
        bits: code width, 2..8.
        group_size: elements per group along each factor's input dimension.
        scheme: ``"refit"`` or ``"naive"`` (module docstring).
        W: ``(out, in)`` weight the pair approximates (the refit's target); default ``up @ down``.
        in_factor: input-side weighting ``L_in`` of the refit (``None``, ``(in,)`` or ``(in, in)``).

    Returns:
        :class:`QuantizedFactors`; every dequantized element is within half a stored step of the float value it
        encodes (``|down_hat - down_encoded| <= scale / 2`` per group), where for ``"refit"`` the encoded ``up`` is
        the refitted one.
    """
    if scheme not in FACTOR_SCHEMES:
        raise ValueError(f"scheme must be one of {FACTOR_SCHEMES}, got {scheme!r}.")
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"Factors must be down (r, in) and up (out, r) with the same r, got {tuple(down.shape)} and "
            f"{tuple(up.shape)}."
        )
    dtype = torch.float64 if down.dtype == torch.float64 else torch.float32
    G = _input_gram(in_factor, down.shape[1], down.device) if scheme == "gptq" else None
    if G is not None:
        _check_in_factor(in_factor, down.shape[1])
        qd = gptq_round(down, G, bits, group_size)
    else:
        qd = quantize_rtn(down.detach().to(dtype), bits, group_size=group_size)
    down_hat = dequantize_rtn(qd, dtype)
    if scheme != "naive":
        target = W if W is not None else up.detach().to(dtype) @ down.detach().to(dtype)
        if tuple(target.shape) != (up.shape[0], down.shape[1]):
            raise ValueError(f"W must be ({up.shape[0]}, {down.shape[1]}), got {tuple(target.shape)}.")
        up = refit_up(target.to(dtype), down_hat, in_factor)
    if G is not None:
        D = down_hat.double()
        qu = gptq_round(up, D @ G @ D.T, bits, group_size)  # the input of up is down_hat x
    else:
        qu = quantize_rtn(up.detach().to(dtype), bits, group_size=group_size)
    return QuantizedFactors(qd, qu, down_hat, dequantize_rtn(qu, dtype))
