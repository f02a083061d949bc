"""Truncated and randomized SVD, balanced factor splits, and rank helpers.

Pure math on torch tensors. Every decomposition runs in float32 (float64 when the input is float64) whatever the
weight dtype, and falls back to more robust paths when LAPACK fails to converge. A factor pair that would contain
inf/NaN is never returned: :class:`SVDError` is raised naming the module instead.

Conventions: a Linear weight ``W`` has shape ``(out, in)``; ``down`` is ``(r, in)`` and ``up`` is ``(out, r)`` so that
``W ~= up @ down``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Literal, NamedTuple

import torch

from ..errors import SVDError

__all__ = [
    "SVDError",
    "SVDResult",
    "break_even_rank",
    "factorized_params",
    "full_svd",
    "RANK_MULTIPLE",
    "rank_for_keep",
    "relative_error",
    "singular_values",
    "split_factors",
    "tail_energy",
    "truncated_svd",
]

SVDMethod = Literal["auto", "exact", "randomized"]

RANDOMIZED_SEED = 0
"""Seed of the randomized range finder's test matrix: the same matrix gives the same factors in every process and
every call, whatever the global RNG state (which is left as it was)."""


class SVDResult(NamedTuple):
    """A (possibly truncated) SVD ``A ~= U @ diag(S) @ Vh``.

    Attributes:
        U: ``(m, r)`` left singular vectors.
        S: ``(r,)`` singular values, descending.
        Vh: ``(r, n)`` right singular vectors (transposed).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _where(name: str | None) -> str:
    return f" for module '{name}'" if name else ""


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _check_input(A: torch.Tensor, name: str | None) -> None:
    if A.ndim != 2:
        raise ValueError(f"SVD needs a 2-D matrix{_where(name)}, got shape {tuple(A.shape)}.")
    if not _finite(A):
        raise SVDError(
            f"The matrix{_where(name)} contains inf or NaN values; it cannot be decomposed. "
            "Check the weights (or the Fisher weights applied to them) for overflow."
        )


def _gram(A64: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the smaller side: ``A^T A`` (n, n) when ``m >= n``, else ``A A^T`` (m, m)."""
    return A64.T @ A64 if A64.shape[0] >= A64.shape[1] else A64 @ A64.T


def _svd_via_gram(A: torch.Tensor) -> SVDResult:
    """Last-resort SVD of a tall ``(m, n)``, ``m >= n``, matrix through the eigendecomposition of its ``(n, n)`` Gram
    (float64); :func:`full_svd` hands a wide matrix over transposed."""
    A64 = A.double()
    evals, V = torch.linalg.eigh(_gram(A64))
    evals, V = evals.flip(0).clamp_min(0), V.flip(1)
    S = evals.sqrt()
    U = A64 @ V / S.clamp_min(torch.finfo(torch.float64).tiny)
    return SVDResult(U, S, V.T)


@torch.no_grad()
def full_svd(A: torch.Tensor, *, name: str | None = None) -> SVDResult:
    """Thin SVD of ``A`` with fallbacks when LAPACK/cuSOLVER fails to converge.

    Tries, in order: ``torch.linalg.svd`` in the compute dtype; on CUDA the ``gesvd`` driver; float64; the
    eigendecomposition of the Gram matrix in float64.

    Args:
        A: ``(m, n)`` matrix of any floating dtype.
        name: module name used in error messages.

    Returns:
        ``SVDResult`` with ``U (m, k)``, ``S (k,)``, ``Vh (k, n)``, ``k = min(m, n)``, in float32 (float64 for a
        float64 input).

    Raises:
        SVDError: if every path fails or yields non-finite factors.
    """
    _check_input(A, name)
    dtype = _compute_dtype(A)
    # A wide matrix is decomposed as its transpose (U and Vh swap roles): LAPACK's thin SVD of the tall orientation is
    # 25-30% faster on CPU (a (576, 1536) fp32 weight on 2 threads: 197 ms, its transpose 146 ms).
    wide = A.shape[0] < A.shape[1]
    B = A.T if wide else A
    attempts: list[tuple[str, callable]] = [("linalg.svd", lambda: torch.linalg.svd(B.to(dtype), full_matrices=False))]
    if A.is_cuda:
        attempts.append(
            ("linalg.svd(gesvd)", lambda: torch.linalg.svd(B.to(dtype), full_matrices=False, driver="gesvd"))
        )
    attempts.append(("linalg.svd(float64)", lambda: torch.linalg.svd(B.double(), full_matrices=False)))
    attempts.append(("gram eigh(float64)", lambda: _svd_via_gram(B)))
    errors = []
    for label, fn in attempts:
        try:
            U, S, Vh = fn()
        except RuntimeError as exc:  # torch raises LinAlgError (a RuntimeError) on non-convergence
            errors.append(f"{label}: {exc}")
            continue
        if wide:
            U, Vh = Vh.T, U.T
        if _finite(U, S, Vh):
            out = SVDResult(U.to(dtype), S.to(dtype), Vh.to(dtype))
            if _finite(*out):
                return out
            # a float64 fallback whose spectrum exceeds the float32 range: no other path can fix that
            raise SVDError(
                f"SVD{_where(name)} of a {tuple(A.shape)} matrix: the singular values (largest "
                f"{float(S.max()):.3g}) do not fit {dtype}, so the factors would contain inf. Rescale the weight or "
                "pass it as float64."
            )
        errors.append(f"{label}: non-finite factors")
    raise SVDError(f"SVD failed{_where(name)} on a {tuple(A.shape)} matrix; tried " + "; ".join(errors))


@torch.no_grad()
def singular_values(A: torch.Tensor, *, name: str | None = None, gram: bool = False) -> torch.Tensor:
    """Singular values of ``A``, descending, with the same fallbacks as :func:`full_svd`.

    Args:
        A: ``(m, n)`` matrix.
        name: module name used in error messages.
        gram: take them from the eigenvalues of the float64 Gram matrix of the smaller side (``sqrt`` of
            ``eigvalsh``), several times faster than ``svdvals`` on CPU. The squares (the tail energies a rank
            allocation reads) are then accurate to about ``1e-16`` of the total energy, far below the ``1e-12``
            relative floor of :func:`hf_lowrank.ops.rank_allocation.ere_ranks`; singular values below about
            ``1e-8 s_max`` lose their own relative accuracy. Falls back to ``svdvals`` when the eigenvalues fail.

    Returns:
        ``(min(m, n),)`` tensor in float32 (float64 for float64 input).
    """
    _check_input(A, name)
    dtype = _compute_dtype(A)
    if gram:
        try:
            ev = torch.linalg.eigvalsh(_gram(A.to(torch.float64)))
            if _finite(ev):
                return ev.clamp_min(0).sqrt().flip(0).to(dtype)
        except RuntimeError:
            pass
    try:
        # The values are those of the transpose; LAPACK's path for a wide matrix is 2-3x slower than for a tall one
        # (a (576, 1536) fp32 weight on 2 CPU threads: 113 ms, its transpose 39 ms).
        S = torch.linalg.svdvals((A.T if A.shape[0] < A.shape[1] else A).to(dtype))
        if _finite(S):
            return S
    except RuntimeError:
        pass
    return full_svd(A, name=name).S


@torch.no_grad()
def truncated_svd(
    A: torch.Tensor,
    rank: int,
    *,
    method: SVDMethod = "auto",
    oversample: int = 10,
    niter: int = 4,
    name: str | None = None,
) -> SVDResult:
    """Rank-``rank`` truncated SVD of ``A``, exact or randomized.

    ``method="auto"`` uses the randomized range finder (``torch.svd_lowrank`` with ``oversample`` extra columns and
    ``niter`` power iterations) when ``rank + oversample`` is at most a fifth of ``min(m, n)``, where it is several
    times cheaper than a full SVD and within a fraction of a percent of its error; otherwise the exact SVD. The
    range finder draws its test matrix from :data:`RANDOMIZED_SEED` (the global RNG is restored afterwards), so the
    result does not depend on the RNG state: processes under ``torch.distributed`` get the same factors.

    Args:
        A: ``(m, n)`` matrix of any floating dtype.
        rank: number of singular triplets kept, ``1 <= rank <= min(m, n)``.
        method: ``"auto"``, ``"exact"`` or ``"randomized"``.
        oversample: extra columns of the randomized range finder.
        niter: power iterations of the randomized range finder.
        name: module name used in error messages.

    Returns:
        ``SVDResult`` with ``U (m, rank)``, ``S (rank,)``, ``Vh (rank, n)``.
    """
    _check_input(A, name)
    k = min(A.shape)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= k:
        raise ValueError(
            f"rank{_where(name)} must be an integer in [1, {k}] for a {tuple(A.shape)} matrix, got {rank!r}."
        )
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}.")
    q = min(rank + max(oversample, 0), k)
    use_random = method == "randomized" or (method == "auto" and 5 * q <= k)
    if use_random and q < k:
        dtype = _compute_dtype(A)
        try:
            with _seeded_rng(A.device):
                U, S, V = torch.svd_lowrank(A.to(dtype), q=q, niter=niter)
            if _finite(U, S, V):
                return SVDResult(U[:, :rank].contiguous(), S[:rank].contiguous(), V[:, :rank].T.contiguous())
        except RuntimeError:
            pass  # fall through to the exact path
    U, S, Vh = full_svd(A, name=name)
    return SVDResult(U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous())


@contextlib.contextmanager
def _seeded_rng(device: torch.device):
    """The default generator of ``device`` seeded with :data:`RANDOMIZED_SEED` inside, its state restored after."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(RANDOMIZED_SEED)
            yield
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]):
            torch.cuda.default_generators[index].manual_seed(RANDOMIZED_SEED)
            yield
    else:  # other accelerators: fork and seed every generator of that kind
        with torch.random.fork_rng(device_type=device.type):
            torch.manual_seed(RANDOMIZED_SEED)
            yield


@torch.no_grad()
def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced split of a truncated SVD into two factors.

    Args:
        U: ``(out, r)``; S: ``(r,)``; Vh: ``(r, in)``.

    Returns:
        ``(down, up)`` with ``down = sqrt(S) Vh`` of shape ``(r, in)`` and ``up = U sqrt(S)`` of shape ``(out, r)``.
    """
    root = S.clamp_min(0).sqrt()
    return root[:, None] * Vh, U * root[None, :]


def tail_energy(S: torch.Tensor) -> torch.Tensor:
    """Energy left out by each truncation rank (Eckart-Young).

    Args:
        S: ``(k,)`` singular values, descending.

    Returns:
        ``(k + 1,)`` tensor ``t`` with ``t[r] = sum_{i >= r} S[i]^2`` (so ``t[0]`` is the total, ``t[k] = 0``),
        the squared Frobenius error of the best rank-``r`` approximation.
    """
    sq = S.double().square()
    tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)]).to(S.dtype if S.is_floating_point() else torch.float64)


def _check_sizes(out_features: int, in_features: int) -> None:
    for label, v in (("out_features", out_features), ("in_features", in_features)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{label} must be an integer >= 1 (the weight shape is (out, in)), got {v!r}.")


def factorized_params(out_features: int, in_features: int, rank: int) -> int:
    """Parameters of a rank-``rank`` factor pair replacing an ``(out, in)`` matrix (no bias)."""
    return rank * (out_features + in_features)


def break_even_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose factor pair has strictly fewer parameters than the dense ``(out, in)`` matrix.

    Factorization only saves memory when ``rank < out * in / (out + in)``; returns 0 when no rank does.

    Raises:
        ValueError: if ``out_features`` or ``in_features`` is not an integer >= 1.
    """
    _check_sizes(out_features, in_features)
    return max(0, math.ceil(out_features * in_features / (out_features + in_features)) - 1)


#: Ranks chosen from a keep fraction are multiples of this (``compress_model(rank_multiple=...)``): a factor pair
#: whose inner dimension is not a multiple of 8 runs slower than its FLOP ratio on CPU GEMM kernels and aligned ones
#: run at it (``benchmarks/inference_speed.py``). Costs at most 7 ranks of a module's budget.
RANK_MULTIPLE = 8


def rank_for_keep(out_features: int, in_features: int, keep: float, *, multiple: int = 1) -> int:
    """Rank whose factor pair keeps at most ``keep`` of the dense parameters (at least 1).

    Args:
        out_features, in_features: shape of the dense weight.
        keep: fraction of parameters kept, in ``(0, 1]``.
        multiple: round a rank of at least ``multiple`` down to a multiple of it (aligned inner dimensions: see
            :data:`RANK_MULTIPLE`).
    """
    _check_sizes(out_features, in_features)
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}.")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}.")
    r = int(min(max(math.floor(keep * out_features * in_features / (out_features + in_features)), 1),
                min(out_features, in_features)))
    return r // multiple * multiple if r >= multiple else r


@torch.no_grad()
def relative_error(A: torch.Tensor, A_hat: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Relative Frobenius error ``||D (A - A_hat)|| / ||D A||`` (``D = diag(weights)`` on rows, or identity).

    Args:
        A: ``(m, n)`` reference; A_hat: ``(m, n)`` approximation; weights: optional ``(m,)`` row weights.

    Raises:
        ValueError: if the shapes of ``A`` and ``A_hat`` differ or ``weights`` is not ``(m,)``.
    """
    if A.shape != A_hat.shape:
        raise ValueError(
            f"relative_error needs A and A_hat of the same shape, got {tuple(A.shape)} and {tuple(A_hat.shape)}."
        )
    if weights is not None and (weights.ndim != 1 or A.ndim < 1 or weights.shape[0] != A.shape[0]):
        raise ValueError(
            f"weights must be a 1-D tensor with one entry per row of A ({A.shape[0] if A.ndim else 0}), got shape "
            f"{tuple(weights.shape)}."
        )
    A64, B64 = A.double(), A_hat.double()
    diff = A64 - B64
    if weights is not None:
        w = weights.double()[:, None]
        diff, A64 = diff * w, A64 * w
    denom = torch.linalg.matrix_norm(A64)
    num = torch.linalg.matrix_norm(diff)
    if denom == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / denom)
