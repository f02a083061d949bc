"""Fisher-weighted SVD (FWSVD) and the Fisher of a LoRA product.

Pure math on torch tensors. FWSVD: Hsu, Hua, Chang, Lou, Shen and Jin, 2022, "Language model compression with
weighted low-rank factorization", arXiv:2207.00112. Fisher from LoRA adapters: Moskovskiy, Pletenev, Zagoruyko and
Panchenko, 2025, "Memory Efficient LM Compression using Fisher Information from Low-Rank Representations" (NLDB 2025).
Kronecker-factored Fisher sides: Martens and Grosse, 2015, arXiv:1503.05671 (K-FAC); Chekalina et al., 2025,
arXiv:2505.17974 (GFWSVD). Input-side whitening: Wang, Zheng, Wan and Zhang, 2024, arXiv:2403.07378 (SVD-LLM).

Conventions: a Linear weight ``W`` has shape ``(out, in)``; the factor pair is ``down (r, in)`` and ``up (out, r)``
with ``W ~= up @ down``. PEFT LoRA: ``A (r, in)``, ``B (out, r)``, ``dW = s * B @ A``.

Fisher-weighted SVD solves ``min ||D_out (W - W_hat) D_in||_F`` over rank-``r`` matrices ``W_hat`` exactly: take
the truncated SVD of ``D_out W D_in = U S V^T`` and divide the weights back out of the factors,
``up = D_out^{-1} U sqrt(S)``, ``down = sqrt(S) V^T D_in^{-1}``. With only ``D_out`` this is FWSVD (Hsu et al.,
2022); with both sides it is the two-sided weighting of the FisherLoRA authors' code (Moskovskiy et al., 2025).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from .svd import SVDError, SVDMethod, singular_values, split_factors, truncated_svd

__all__ = [
    "DEFAULT_DAMPING",
    "GramFactor",
    "fisher_weights",
    "gram_factor",
    "gram_shrinkage",
    "weighted_lowrank",
    "weighted_spectrum",
    "fwsvd",
    "lora_fisher_to_weights",
    "weighted_relative_error",
]

FisherMode = Literal["row", "two_sided"]


def _where(name: str | None) -> str:
    return f" for module '{name}'" if name else ""


@torch.no_grad()
def fisher_weights(f: torch.Tensor, *, exponent: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """Turn accumulated Fisher sums into strictly positive, finite weights.

    Steps: non-finite entries (inf/NaN from an overflowed or broken gradient) are set to 0; the values are divided
    by their mean (the overall scale of a Fisher sum cancels in the weighted SVD, and this makes ``eps`` relative);
    then ``w = (f / mean(f) + eps) ** exponent``. An all-zero (or all non-finite) input gives all ones, i.e. no
    weighting. ``exponent=0.5`` turns a squared-gradient sum into the ``sqrt(F)`` scaling of FWSVD.

    Args:
        f: Fisher sums of any shape, ``>= 0`` (e.g. ``(out,)`` row sums).
        exponent: power applied to the normalised Fisher, ``>= 0``.
        eps: floor added before the power, ``> 0``; keeps zero-Fisher rows strictly positive (weight
            ``eps ** exponent`` relative to a row of average importance).

    Returns:
        Weights of the same shape as ``f``, float32 (float64 for a float64 input), all finite and ``> 0``:
        values outside the output dtype's range (an extreme ``exponent`` / ``eps``) are clamped to
        ``[finfo.tiny, finfo.max]`` of that dtype.

    Raises:
        ValueError: for negative Fisher values or invalid ``exponent`` / ``eps``.
    """
    if not isinstance(f, torch.Tensor):
        raise ValueError(f"Fisher values must be a torch.Tensor, got {type(f).__name__}.")
    if not (exponent >= 0 and exponent < float("inf")):
        raise ValueError(f"exponent must be a finite number >= 0 (0.5 is the FWSVD default), got {exponent!r}.")
    if not (eps > 0 and eps < float("inf")):
        raise ValueError(f"eps must be a finite number > 0 (default 1e-6), got {eps!r}.")
    out_dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
    x = f.detach().to(torch.float64)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    if bool((x < 0).any()):
        raise ValueError(
            f"Fisher values must be >= 0 (sums of squared gradients), got a minimum of {float(x.min()):.3g}. "
            "Accumulate grad**2, not grad."
        )
    if x.numel() == 0:
        return x.to(out_dtype)
    mean = x.mean()
    if not bool(mean > 0):
        return torch.ones_like(x, dtype=out_dtype)
    w = (x / mean + eps).pow(exponent)
    # an extreme exponent / eps can leave the output dtype's range (eps=1e-12, exponent=4 underflows float32 to 0;
    # exponent=200 overflows it): clamp so that the promise "finite and > 0" holds (monotonicity is kept)
    info = torch.finfo(out_dtype)
    return w.clamp(info.tiny, info.max).to(out_dtype)


def _side_weights(
    fisher: torch.Tensor | None, size: int, side: str, exponent: float, eps: float, name: str | None
) -> torch.Tensor | None:
    if fisher is None:
        return None
    if not isinstance(fisher, torch.Tensor) or fisher.ndim != 1 or fisher.shape[0] != size:
        shape = tuple(fisher.shape) if isinstance(fisher, torch.Tensor) else type(fisher).__name__
        dim = 1 if side == "row" else 0
        raise ValueError(
            f"{side}_fisher{_where(name)} must be a 1-D tensor of length {size}, got {shape}. "
            f"Reduce a full (out, in) Fisher with .sum(dim={dim})."
        )
    try:
        return fisher_weights(fisher, exponent=exponent, eps=eps)
    except ValueError as exc:
        raise ValueError(f"{side}_fisher{_where(name)}: {exc}") from None


DEFAULT_DAMPING = 1e-4
"""Default Gram damping ``lambda``: ``G / mean(diag G) + lambda * I`` (chosen in benchmarks/compression_quality.py)."""


class GramFactor(NamedTuple):
    """Lower-triangular factor of a damped, normalised Gram: ``G / scale + damping * I = L @ L.T``.

    Attributes:
        L: ``(n, n)`` lower-triangular, float64 (``(n,)``, a diagonal, for a diagonal Gram).
        scale: ``mean(diag(G))`` the Gram was divided by (1.0 for an all-zero Gram, whose factor is the identity).
        fallback: ``None`` when the Cholesky factorization of the damped Gram succeeded; otherwise what was done
            instead, e.g. ``"eigh"`` (eigenvalues clamped to the damping floor, then Cholesky) or ``"zero"``.
    """

    L: torch.Tensor
    scale: float
    fallback: str | None = None


def _check_weight(W: torch.Tensor, name: str | None) -> None:
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"A weighted low-rank approximation needs a 2-D (out, in) weight{_where(name)}, got {shape}.")


@torch.no_grad()
def gram_shrinkage(dim: int, tokens: int) -> float:
    """How far a Gram of ``dim`` features summed over ``tokens`` samples is shrunk toward its diagonal: ``d / (d + n)``.

    A Gram from fewer samples than features is rank-deficient, and one from a few times more is still dominated by
    sampling noise in its small eigenvalues; a weighted factorization then trusts directions the data never
    measured and chases noise.
    Shrinking toward the diagonal, ``(1 - a) G + a diag(G)``, is the classical remedy for a sample covariance with
    few samples per dimension (Ledoit and Wolf, 2004, "A well-conditioned estimator for large-dimensional covariance
    matrices"); ``a = d / (d + n)`` falls from about 1 with no data to 0 as the tokens per dimension grow (the choice
    is compared with other calibration sizes in ``benchmarks/calibration_size.py``).

    Args:
        dim: the Gram's size ``d``.
        tokens: the number of samples ``n`` it was summed over (calibration tokens).
    """
    if dim < 1 or tokens < 0:
        raise ValueError(f"gram_shrinkage needs dim >= 1 and tokens >= 0, got dim={dim!r}, tokens={tokens!r}.")
    return dim / (dim + tokens)


def gram_factor(
    G: torch.Tensor, *, damping: float = DEFAULT_DAMPING, shrinkage: float = 0.0, name: str | None = None
) -> GramFactor:
    """Cholesky factor of a damped Gram matrix ``G = sum x x^T``, never NaN.

    The Gram is symmetrised, divided by the mean of its diagonal (so ``damping`` is relative and the factor is
    scale-free), shrunk toward its diagonal by ``shrinkage`` (see :func:`gram_shrinkage`), damped by
    ``damping * I`` and factorized in float64. A Gram that is not positive definite even then
    (fewer calibration tokens than its size with ``damping=0``, rounding) falls back to an eigendecomposition with
    eigenvalues clamped to ``max(damping, 1e-8)``, followed by the Cholesky factorization of the repaired matrix. An
    all-zero Gram (no data reached the module) gives the identity.

    Args:
        G: ``(n, n)`` symmetric positive semi-definite Gram (any floating dtype, any device), or its diagonal
            ``(n,)`` (then the factor is the diagonal ``sqrt(g / mean(g) + damping)``, 1-D).
        damping: ``lambda >= 0`` added to the normalised diagonal.
        shrinkage: ``a`` in ``[0, 1]``: the Gram used is ``(1 - a) G + a diag(G)`` (no effect on a diagonal Gram).
        name: module name for messages.

    Returns:
        :class:`GramFactor` (``fallback`` says whether and how the factorization was repaired).

    Raises:
        ValueError: non-square or non-finite ``G``, negative damping.
    """
    if not isinstance(G, torch.Tensor) or G.ndim not in (1, 2) or (G.ndim == 2 and G.shape[0] != G.shape[1]):
        shape = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
        raise ValueError(f"A Gram matrix{_where(name)} must be square (n, n) or its diagonal (n,), got {shape}.")
    if not (isinstance(damping, (int, float)) and 0 <= damping < float("inf")):
        raise ValueError(f"damping must be a finite number >= 0 (default {DEFAULT_DAMPING}), got {damping!r}.")
    if not (isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool) and 0 <= shrinkage <= 1):
        raise ValueError(f"shrinkage must be a number in [0, 1], got {shrinkage!r}.")
    A = G.detach().to(torch.float64)
    if not bool(torch.isfinite(A).all()):
        raise ValueError(
            f"The Gram matrix{_where(name)} holds inf or NaN values (an overflowed activation or gradient); collect "
            "it again, in float32, without the offending batch."
        )
    n = A.shape[0]
    if A.ndim == 1:  # a diagonal Gram: its factor is the diagonal sqrt(g / mean + damping)
        scale = float(A.mean()) if n else 0.0
        if not scale > 0:
            return GramFactor(torch.ones_like(A), 1.0, "zero")
        return GramFactor((A.clamp_min(0) / scale + damping).clamp_min(1e-300).sqrt(), scale, None)
    eye = torch.eye(n, dtype=torch.float64, device=A.device)
    scale = float(A.diagonal().mean()) if n else 0.0
    if not scale > 0:
        return GramFactor(eye, 1.0, "zero")
    A = (A + A.T) / (2 * scale)
    if shrinkage > 0:
        A = (1 - shrinkage) * A + shrinkage * torch.diag(A.diagonal())
    A = A + damping * eye
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        return GramFactor(L, scale, None)
    evals, Q = torch.linalg.eigh(A)
    repaired = (Q * evals.clamp_min(max(damping, 1e-8))) @ Q.T
    L, info = torch.linalg.cholesky_ex((repaired + repaired.T) / 2)
    if int(info) != 0 or not bool(torch.isfinite(L).all()):  # pragma: no cover - clamped spectrum is PD
        L = torch.diag(A.diagonal().clamp_min(max(damping, 1e-8)).sqrt())
    return GramFactor(L, scale, "eigh")


def _check_factor(F: torch.Tensor | None, size: int, side: str, name: str | None) -> None:
    if F is None:
        return
    ok = isinstance(F, torch.Tensor) and (
        (F.ndim == 1 and F.shape[0] == size) or (F.ndim == 2 and tuple(F.shape) == (size, size))
    )
    if not ok:
        shape = tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__
        raise ValueError(
            f"{side}_factor{_where(name)} must be a ({size},) diagonal or a ({size}, {size}) lower-triangular factor, "
            f"got {shape}."
        )


def _weighted_matrix(W, out_factor, in_factor, dtype) -> torch.Tensor:
    """``L_out^T W L_in`` (a 1-D factor is a diagonal)."""
    tri = any(f is not None and f.ndim == 2 for f in (out_factor, in_factor))
    A = W.detach().to(torch.float64 if tri else dtype)
    if out_factor is not None:
        f = out_factor.to(device=A.device, dtype=A.dtype)
        A = f[:, None] * A if f.ndim == 1 else f.T @ A
    if in_factor is not None:
        f = in_factor.to(device=A.device, dtype=A.dtype)
        A = A * f[None, :] if f.ndim == 1 else A @ f
    return A.to(dtype)


@torch.no_grad()
def weighted_lowrank(
    W: torch.Tensor,
    rank: int,
    *,
    out_factor: torch.Tensor | None = None,
    in_factor: torch.Tensor | None = None,
    method: SVDMethod = "auto",
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """THE factorization: rank-``rank`` minimiser of ``||L_out^T (W - W_hat) L_in||_F`` as a balanced factor pair.

    With ``M = L_out^T W L_in = U S V^T`` truncated to ``rank``: ``up = L_out^{-T} U sqrt(S)`` and
    ``down = sqrt(S) V^T L_in^{-1}`` (triangular solves, no explicit inverse). A factor may be ``None`` (identity:
    plain SVD on that side), a 1-D tensor of positive weights (a diagonal: FWSVD's ``sqrt(F)``, see
    :func:`fwsvd`) or a 2-D lower-triangular matrix (a whitening factor of an activation or output-gradient Gram,
    see :func:`gram_factor`; SVD-LLM is ``in_factor`` alone, the Kronecker-factored Fisher uses both).

    Args:
        W: ``(out, in)`` weight, any floating dtype.
        rank: kept rank, ``1 <= rank <= min(out, in)``.
        out_factor: ``None``, ``(out,)`` or ``(out, out)``.
        in_factor: ``None``, ``(in,)`` or ``(in, in)``.
        method: ``"auto"``, ``"exact"`` or ``"randomized"`` (see :func:`~hf_lowrank.ops.svd.truncated_svd`).
        name: module name for error messages.

    Returns:
        ``(down (rank, in), up (out, rank))``, float32 (float64 for a float64 ``W``).

    Raises:
        ValueError: bad shapes or rank. SVDError: non-finite ``W`` or factors (names the module).
    """
    _check_weight(W, name)
    out_f, in_f = W.shape
    _check_factor(out_factor, out_f, "out", name)
    _check_factor(in_factor, in_f, "in", name)
    if out_factor is None and in_factor is None:
        return split_factors(*truncated_svd(W, rank, method=method, name=name))
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    down, up = split_factors(*truncated_svd(_weighted_matrix(W, out_factor, in_factor, dtype), rank, method=method,
                                            name=name))
    if out_factor is not None:
        if out_factor.ndim == 1:
            up = up / out_factor.to(device=up.device, dtype=up.dtype)[:, None]
        else:
            L = out_factor.to(device=up.device, dtype=torch.float64)
            up = torch.linalg.solve_triangular(L.T, up.double(), upper=True).to(dtype)
    if in_factor is not None:
        if in_factor.ndim == 1:
            down = down / in_factor.to(device=down.device, dtype=down.dtype)[None, :]
        else:
            L = in_factor.to(device=down.device, dtype=torch.float64)
            down = torch.linalg.solve_triangular(L, down.double(), upper=False, left=False).to(dtype)
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        raise SVDError(
            f"Weighted SVD{_where(name)} produced non-finite factors; the weights span too wide a range. Raise the "
            "damping (Grams) or eps, or lower the exponent (Fisher)."
        )
    return down.contiguous(), up.contiguous()


@torch.no_grad()
def weighted_spectrum(
    W: torch.Tensor,
    *,
    out_factor: torch.Tensor | None = None,
    in_factor: torch.Tensor | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Singular values of ``L_out^T W L_in`` (descending, float64): ``S[k:]**2`` summed is the loss of rank ``k``.

    Args:
        W, out_factor, in_factor, name: as for :func:`weighted_lowrank`.
    """
    _check_weight(W, name)
    _check_factor(out_factor, W.shape[0], "out", name)
    _check_factor(in_factor, W.shape[1], "in", name)
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    return singular_values(_weighted_matrix(W, out_factor, in_factor, dtype), name=name).to(torch.float64)


@torch.no_grad()
def fwsvd(
    W: torch.Tensor,
    rank: int,
    *,
    row_fisher: torch.Tensor | None = None,
    col_fisher: torch.Tensor | None = None,
    exponent: float = 0.5,
    eps: float = 1e-6,
    method: SVDMethod = "auto",
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fisher-weighted truncated SVD of a Linear weight, split into a balanced factor pair.

    With ``d_out = fisher_weights(row_fisher)`` and ``d_in = fisher_weights(col_fisher)`` (identity when absent),
    computes the rank-``rank`` SVD of ``diag(d_out) @ W @ diag(d_in) = U S V^T`` and returns
    ``down = sqrt(S) V^T diag(d_in)^{-1}`` and ``up = diag(d_out)^{-1} U sqrt(S)``. With the exact SVD,
    ``up @ down`` is the minimiser of ``||diag(d_out) (W - W_hat) diag(d_in)||_F`` over rank-``rank`` matrices.
    Row-only weighting is FWSVD; column-only and two-sided are the generalisations. Without any Fisher this is the
    plain SVD split ``split_factors(*truncated_svd(W, rank))``.

    Args:
        W: ``(out, in)`` weight, any floating dtype.
        rank: kept rank, ``1 <= rank <= min(out, in)``.
        row_fisher: optional ``(out,)`` Fisher sums per output row (``F.sum(dim=1)``), ``>= 0``.
        col_fisher: optional ``(in,)`` Fisher sums per input column (``F.sum(dim=0)``), ``>= 0``.
        exponent: power applied to the normalised Fisher (see :func:`fisher_weights`).
        eps: floor of the normalised Fisher (see :func:`fisher_weights`).
        method: ``"auto"``, ``"exact"`` or ``"randomized"`` (see :func:`~hf_lowrank.ops.svd.truncated_svd`).
        name: module name used in error messages.

    Returns:
        ``(down, up)`` with ``down (rank, in)`` and ``up (out, rank)``, float32 (float64 for a float64 ``W``).

    Raises:
        ValueError: bad shapes or rank. SVDError: non-finite ``W`` or factors (names the module).
    """
    _check_weight(W, name)
    out_f, in_f = W.shape
    d_out = _side_weights(row_fisher, out_f, "row", exponent, eps, name)
    d_in = _side_weights(col_fisher, in_f, "col", exponent, eps, name)
    return weighted_lowrank(W, rank, out_factor=d_out, in_factor=d_in, method=method, name=name)


@torch.no_grad()
def lora_fisher_to_weights(
    fisher_A: torch.Tensor, fisher_B: torch.Tensor, mode: FisherMode = "row"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fisher sums of a LoRA pair mapped to per-row (and per-column) Fisher of the adapted weight ``W``.

    Derivation. With ``dW = s B A`` and ``G = dL/dW (out, in)`` the gradient with respect to the full weight, the
    chain rule gives ``grad_B = s G A^T`` ``(out, r)`` and ``grad_A = s B^T G`` ``(r, in)``. So
    ``F_B[o, j] = sum_t (s G_t[o, :] . A[j, :])^2`` measures how much output row ``o`` of ``G`` lies in the row space
    of ``A`` (an output-side importance), and ``F_A[j, i] = sum_t (s B[:, j] . G_t[:, i])^2`` how much input column
    ``i`` of ``G`` lies in the column space of ``B`` (an input-side importance). The scale ``s`` and whether the
    accumulation is a sum or a mean cancel in :func:`fisher_weights`.

    - ``"row"`` (the paper, eq. 4 and 6): the element Fisher of ``W`` is approximated by the product of the two
      factor Fishers, ``F_W ~= F_B @ F_A`` ``(out, in)``; its row sums are the FWSVD row importance
      ``f = F_W.sum(1) = F_B @ F_A.sum(1)`` ``(out,)``, with no column side.
    - ``"two_sided"`` (the authors' published code, made explicit here): output side ``F_B.sum(1)`` ``(out,)`` (the
      total output-row sensitivity over all ``r`` directions), input side ``F_A.sum(0)`` ``(in,)`` (the total
      input-column sensitivity); feed both to :func:`fwsvd` as ``row_fisher`` and ``col_fisher``.

    Args:
        fisher_A: ``(r, in)`` accumulated ``grad(A)**2``.
        fisher_B: ``(out, r)`` accumulated ``grad(B)**2``.
        mode: ``"row"`` or ``"two_sided"``.

    Returns:
        ``(row_fisher (out,), col_fisher (in,) or None)``, float64 (so that sums of large squared gradients cannot
        overflow); ``col_fisher`` is ``None`` in ``"row"`` mode.

    Raises:
        ValueError: unknown mode or inconsistent shapes.
    """
    if mode not in ("row", "two_sided"):
        raise ValueError(f"mode must be 'row' (paper eq. 4/6) or 'two_sided' (authors' code), got {mode!r}.")
    for label, t in (("fisher_A", fisher_A), ("fisher_B", fisher_B)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{label} must be a 2-D tensor, got {shape}. Pass the accumulated grad**2 of the factor.")
    if fisher_B.shape[1] != fisher_A.shape[0]:
        raise ValueError(
            f"LoRA Fisher shapes disagree: fisher_A is {tuple(fisher_A.shape)} (r, in) and fisher_B is "
            f"{tuple(fisher_B.shape)} (out, r); their ranks must match. Pass lora_A's Fisher first, lora_B's second."
        )
    FA = fisher_A.detach().to(torch.float64)
    FB = fisher_B.detach().to(device=FA.device, dtype=torch.float64)
    if mode == "row":
        return FB @ FA.sum(dim=1), None
    return FB.sum(dim=1), FA.sum(dim=0)


@torch.no_grad()
def weighted_relative_error(
    W: torch.Tensor,
    W_hat: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    col_weights: torch.Tensor | None = None,
) -> float:
    """Relative weighted Frobenius error ``||D_r (W - W_hat) D_c||_F / ||D_r W D_c||_F``.

    Args:
        W: ``(out, in)`` reference.
        W_hat: ``(out, in)`` approximation.
        row_weights: optional ``(out,)`` weights ``D_r`` (identity when absent), or an ``(out, out)`` factor
            ``L_out`` (then ``D_r = L_out^T``, as in :func:`weighted_lowrank`).
        col_weights: optional ``(in,)`` weights ``D_c`` (identity when absent), or an ``(in, in)`` factor ``L_in``.

    Returns:
        The relative error as a float (0 when both norms are 0, inf when only the reference's is 0).

    Raises:
        ValueError: mismatched shapes, or weights whose length is not ``out`` / ``in``.
    """
    if W.shape != W_hat.shape or W.ndim != 2:
        raise ValueError(
            f"W and W_hat must be 2-D with the same shape, got {tuple(W.shape)} and {tuple(W_hat.shape)}."
        )
    if any(isinstance(w, torch.Tensor) and w.ndim == 2 for w in (row_weights, col_weights)):
        _check_factor(row_weights, W.shape[0], "out", None)
        _check_factor(col_weights, W.shape[1], "in", None)
    else:
        sides = (("row_weights", row_weights, W.shape[0], "out"), ("col_weights", col_weights, W.shape[1], "in"))
        for label, wts, size, side in sides:
            if wts is not None and (not isinstance(wts, torch.Tensor) or wts.numel() != size):
                shape = tuple(wts.shape) if isinstance(wts, torch.Tensor) else type(wts).__name__
                raise ValueError(f"{label} must hold one weight per {side} feature ({size}) of W, got {shape}.")
        row_weights = row_weights.reshape(-1) if row_weights is not None else None
        col_weights = col_weights.reshape(-1) if col_weights is not None else None
    A = _weighted_matrix(W, row_weights, col_weights, torch.float64)
    diff = _weighted_matrix(W.detach().double() - W_hat.detach().to(W.device).double(), row_weights, col_weights,
                            torch.float64)
    denom = torch.linalg.matrix_norm(A)
    num = torch.linalg.matrix_norm(diff)
    if denom == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / denom)
