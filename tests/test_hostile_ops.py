"""Hostile-input suite for ``hf_lowrank.ops``: property-based tests (hypothesis) over shapes, ranks, dtypes and values.

Contract under test: every call either returns finite results of the documented shape and dtype (and, where it is
cheap to check, the documented math: Eckart-Young, half-step quantization error, orthonormal Stiefel projections,
WeLore reaching the closest reachable reduction, ranks inside their bounds) or raises ``ValueError`` /
:class:`~hf_lowrank.ops.svd.SVDError` with a non-empty message that names the offending argument (or module). Any
other exception type fails the test.

Bugs this suite found were pinned by small explicit ``xfail(strict=True)`` tests (and stepped around in the property
tests) until they were fixed; none is left, so every input here is drawn and every case is a plain test.

Examples are bounded and derandomized (``derandomize=True``) so that CI is deterministic and fast.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from hf_lowrank.ops.fisher import fisher_weights, fwsvd, lora_fisher_to_weights, weighted_relative_error
from hf_lowrank.ops.importance import (
    l2_importance,
    quantile_mean,
    quantile_mean_taylor_importance,
    row_dot_from_activations,
    rows_for_ratio,
    taylor_importance,
    top_rows,
)
from hf_lowrank.ops.quant import (
    QuantizedTensor,
    dequantize_rtn,
    pack_bits,
    quantize_rtn,
    stiefel_project,
    unpack_bits,
)
from hf_lowrank.ops.rank_allocation import (
    ere_ranks,
    normalized_spectrum,
    uniform_ranks,
    welore_ranks,
)
from hf_lowrank.ops.svd import (
    SVDError,
    break_even_rank,
    factorized_params,
    full_svd,
    rank_for_keep,
    relative_error,
    singular_values,
    split_factors,
    tail_energy,
    truncated_svd,
)

SETTINGS = settings.get_profile("hostile")  # registered in conftest.py

MORE = settings(SETTINGS, max_examples=max(40, SETTINGS.max_examples))  # tests with several independently invalid arguments

FP32_MAX = float(torch.finfo(torch.float32).max)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
KINDS = ("gauss", "gauss", "gauss", "zero", "lowrank", "const", "huge", "tiny", "nan", "inf")
BAD_NUMBERS = [0.0, -1.0, float("nan"), float("inf"), -float("inf")]


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def assert_clear(exc: BaseException, *names: str, types: tuple = (ValueError,)) -> None:
    """The exception is of an allowed type and its message is non-empty and names one of ``names``."""
    assert isinstance(exc, types), f"expected {[t.__name__ for t in types]}, got {type(exc).__name__}: {exc}"
    msg = str(exc)
    assert msg.strip(), f"{type(exc).__name__} with an empty message"
    low = msg.lower()
    assert any(n.lower() in low for n in names), f"message does not name any of {names}: {msg!r}"


def _event(text: str) -> None:
    """``hypothesis.event`` that is a no-op outside a hypothesis test (the explicit cases share the helpers)."""
    try:
        event(text)
    except InvalidArgument:
        pass


def expect_error(fn, *names: str, types: tuple = (ValueError,)) -> BaseException:
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001  (the point is to catch whatever comes out)
        assert_clear(exc, *names, types=types)
        _event(f"error: {type(exc).__name__} naming {names[0]!r}")
        return exc
    raise AssertionError(f"expected an error naming {names}, got a result: {result!r:.200}")


def mostly(valid, invalid):
    """About four valid draws for one invalid one, so that tests with several arguments still reach the valid path."""
    return st.sampled_from([True, True, True, True, False]).flatmap(lambda ok: valid if ok else invalid)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _scaled_norm(A: torch.Tensor) -> float:
    """Frobenius norm computed without overflow (float64, scaled by the largest entry)."""
    A64 = A.double()
    big = float(A64.abs().max()) if A64.numel() else 0.0
    if big == 0.0 or not math.isfinite(big):
        return big
    return big * float(torch.linalg.matrix_norm(A64 / big))


def make_matrix(m: int, n: int, dtype: torch.dtype, kind: str, seed: int, scale_exp: int = 0) -> torch.Tensor:
    """A hostile ``(m, n)`` matrix of the given dtype (cast last, so fp16 overflow to inf is part of the test)."""
    g = torch.Generator().manual_seed(seed)
    finfo = torch.finfo(dtype)
    scale = 10.0**scale_exp
    if kind == "zero":
        A = torch.zeros(m, n, dtype=torch.float64)
    elif kind == "const":
        A = torch.full((m, n), (torch.rand(1, generator=g, dtype=torch.float64).item() - 0.5) * 4 * scale)
    elif kind == "lowrank":
        k = int(torch.randint(1, max(2, min(m, n)), (1,), generator=g))
        A = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)
        A = A * scale
    elif kind == "huge":  # entries near the top of the dtype's range (the matrix norm may exceed it)
        A = torch.randn(m, n, generator=g, dtype=torch.float64) * (finfo.max / 64)
    elif kind == "tiny":  # entries near the bottom of the dtype's normal range
        A = torch.randn(m, n, generator=g, dtype=torch.float64) * (finfo.tiny * 4)
    else:
        A = torch.randn(m, n, generator=g, dtype=torch.float64) * scale
    if kind in ("nan", "inf"):
        i = int(torch.randint(0, m * n, (1,), generator=g))
        A.view(-1)[i] = float("nan") if kind == "nan" else -float("inf")
    return A.to(dtype)


@st.composite
def matrices(draw, max_side: int = 40, kinds=KINDS, dtypes=DTYPES):
    m = draw(st.integers(1, max_side))
    n = draw(st.integers(1, max_side))
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**16))
    scale_exp = draw(st.integers(-3, 3))
    return make_matrix(m, n, dtype, kind, seed, scale_exp)


def rank_values(k: int):
    return mostly(st.integers(1, k), st.one_of(st.integers(-3, 45), st.sampled_from([None, 2.0, True, "3", math.nan])))


# ---------------------------------------------------------------------------------------------------------------------
# svd.py
# ---------------------------------------------------------------------------------------------------------------------


@settings(MORE, max_examples=max(60, SETTINGS.max_examples))
@given(A=matrices(), data=st.data(), method=st.sampled_from(["auto", "exact", "randomized"]))
def test_truncated_svd_contract(A, data, method):
    m, n = A.shape
    k = min(m, n)
    rank = data.draw(rank_values(k), label="rank")
    call = lambda: truncated_svd(A, rank, method=method, name="blk.q")  # noqa: E731
    if not _finite(A):
        expect_error(call, "blk.q", "inf or nan", types=(SVDError,))
        return
    if not (_is_int(rank) and 1 <= rank <= k):
        expect_error(call, "rank")
        return
    cdtype = _compute_dtype(A.dtype)
    if _scaled_norm(A) > 0.5 * float(torch.finfo(cdtype).max):  # fp64 spectrum beyond float64: may refuse
        try:
            U, S, Vh = call()
        except SVDError as exc:
            assert_clear(exc, "blk.q", types=(SVDError,))
            return
        assert _finite(U, S, Vh)
        return
    U, S, Vh = call()
    event(f"valid ({method})")
    assert U.shape == (m, rank) and S.shape == (rank,) and Vh.shape == (rank, n)
    assert U.dtype == S.dtype == Vh.dtype == cdtype
    assert _finite(U, S, Vh)
    assert bool((S >= 0).all()) and bool((S[:-1] >= S[1:] * (1 - 1e-6)).all())
    A64 = A.double()
    norm = _scaled_norm(A)
    if norm == 0:
        assert float(S.abs().max()) == 0.0
        return
    # compare in units of the matrix norm (tiny/huge matrices included)
    An = A64 / norm
    approx = (U.double() * (S.double() / norm)) @ Vh.double()
    err = float(torch.linalg.matrix_norm(An - approx))
    ref = math.sqrt(float(tail_energy(torch.linalg.svdvals(An))[rank]))
    tol = 1e-9 if cdtype == torch.float64 else 2e-5
    assert err >= ref - tol  # Eckart-Young: nothing beats the best rank-r approximation
    if method in ("exact", "auto"):  # "auto" is exact whenever rank + oversample > min(m, n) / 5, always here
        assert abs(err - ref) <= tol, (err, ref)
    else:
        assert err <= 1.5 * ref + tol, (err, ref)
    down, up = split_factors(U, S, Vh)
    assert down.shape == (rank, n) and up.shape == (m, rank) and _finite(down, up)
    assert torch.allclose((up.double() @ down.double()) / norm, approx, atol=10 * tol)


@SETTINGS
@given(A=matrices())
def test_full_svd_and_singular_values_contract(A):
    if not _finite(A):
        expect_error(lambda: full_svd(A, name="blk.k"), "blk.k", types=(SVDError,))
        expect_error(lambda: singular_values(A, name="blk.k"), "blk.k", types=(SVDError,))
        return
    cdtype = _compute_dtype(A.dtype)
    if _scaled_norm(A) > 0.5 * float(torch.finfo(cdtype).max):
        return  # covered by the truncated test (SVDError or finite)
    m, n = A.shape
    k = min(m, n)
    U, S, Vh = full_svd(A, name="blk.k")
    event("valid")
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert U.dtype == cdtype and _finite(U, S, Vh)
    S2 = singular_values(A, name="blk.k")
    assert S2.shape == (k,) and S2.dtype == cdtype and _finite(S2)
    norm = _scaled_norm(A)
    if norm == 0:
        assert float(S.abs().max()) == 0.0 and float(S2.abs().max()) == 0.0
        return
    ref = torch.linalg.svdvals(A.double() / norm)
    tol = 1e-9 if cdtype == torch.float64 else 2e-5
    assert torch.allclose(S.double() / norm, ref, atol=tol) and torch.allclose(S2.double() / norm, ref, atol=tol)
    recon = (U.double() * (S.double() / norm)) @ Vh.double()
    assert float(torch.linalg.matrix_norm(recon - A.double() / norm)) <= 10 * tol


@SETTINGS
@given(
    k=st.integers(0, 40),
    kind=st.sampled_from(["random", "const", "zero", "spike"]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_tail_energy_is_the_eckart_young_tail(k, kind, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        S = torch.rand(k, generator=g, dtype=torch.float64).sort(descending=True).values * 10
    elif kind == "const":
        S = torch.full((k,), 3.0, dtype=torch.float64)
    elif kind == "zero":
        S = torch.zeros(k, dtype=torch.float64)
    else:
        S = torch.zeros(k, dtype=torch.float64)
        if k:
            S[0] = 1e10
    t = tail_energy(S.to(dtype))
    assert t.shape == (k + 1,) and t.dtype == dtype and _finite(t)
    assert float(t[-1]) == 0.0
    assert bool((t[:-1] >= t[1:]).all())
    expected = torch.tensor([float((S[r:] ** 2).sum()) for r in range(k + 1)], dtype=torch.float64)
    assert torch.allclose(t.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12)


@SETTINGS
@given(
    out_f=st.integers(1, 40),
    in_f=st.integers(1, 40),
    keep=mostly(st.floats(min_value=1e-6, max_value=1.0), st.sampled_from([*BAD_NUMBERS, 1.5, 1 + 1e-9])),
)
def test_rank_helpers(out_f, in_f, keep):
    dense = out_f * in_f
    be = break_even_rank(out_f, in_f)
    assert _is_int(be) and be >= 0 and factorized_params(out_f, in_f, be) < dense
    assert factorized_params(out_f, in_f, be + 1) >= dense
    if not (0 < keep <= 1):
        expect_error(lambda: rank_for_keep(out_f, in_f, keep), "keep")
        return
    r = rank_for_keep(out_f, in_f, keep)
    event("valid")
    assert _is_int(r) and 1 <= r <= min(out_f, in_f)
    budget = keep * dense
    assert r == 1 or factorized_params(out_f, in_f, r) <= budget + 1e-9  # keeps at most `keep` (at least rank 1)
    assert r == min(out_f, in_f) or factorized_params(out_f, in_f, r + 1) > budget - 1e-9  # and is the largest


@SETTINGS
@given(A=matrices(kinds=("gauss", "zero", "lowrank", "const")), seed=st.integers(0, 2**16))
def test_relative_error_contract(A, seed):
    g = torch.Generator().manual_seed(seed)
    B = A.double() + torch.randn(A.shape, generator=g, dtype=torch.float64) * 0.1
    e = relative_error(A, B)
    nA = float(torch.linalg.matrix_norm(A.double()))
    if nA == 0:
        assert e == float("inf")
    else:
        assert math.isfinite(e) and e >= 0
        assert math.isclose(e, float(torch.linalg.matrix_norm(A.double() - B)) / nA, rel_tol=1e-9)
    assert relative_error(A, A) == 0.0
    w = torch.rand(A.shape[0], generator=g, dtype=torch.float64) + 0.1
    assert math.isfinite(weighted_relative_error(A, A, w, None)) and weighted_relative_error(A, A, w, None) == 0.0


def test_svd_of_fp32_matrix_beyond_fp32_range():
    A = torch.full((4, 4), 3e38)  # finite, top singular value 1.2e39 > float32 max
    try:
        U, S, Vh = truncated_svd(A, 1, name="blk.huge")
    except SVDError as exc:
        assert_clear(exc, "blk.huge", types=(SVDError,))
        return
    assert _finite(U, S, Vh)


@pytest.mark.parametrize(
    "call",
    [lambda: rank_for_keep(0, 0, 0.5), lambda: rank_for_keep(0, 5, 0.5), lambda: break_even_rank(0, 0)],
    ids=["rank_for_keep(0,0)", "rank_for_keep(0,5)", "break_even_rank(0,0)"],
)
def test_rank_helpers_reject_zero_sizes(call):
    expect_error(call, "out", "in", "size", "shape")


@pytest.mark.parametrize(
    "call",
    [
        lambda: relative_error(torch.ones(2, 3), torch.zeros(3, 2)),
        lambda: relative_error(torch.ones(2, 3), torch.zeros(2, 3), weights=torch.ones(5)),
        lambda: weighted_relative_error(torch.ones(2, 3), torch.zeros(2, 3), torch.ones(5)),
    ],
    ids=["relative_error-shape", "relative_error-weights", "weighted_relative_error-weights"],
)
def test_error_metrics_reject_mismatched_shapes(call):
    expect_error(call, "shape", "weights", "A_hat")


# ---------------------------------------------------------------------------------------------------------------------
# fisher.py
# ---------------------------------------------------------------------------------------------------------------------

FISHER_KINDS = ("random", "random", "zeros", "sparse", "nan", "inf", "neginf", "negative", "huge", "tiny")


def make_fisher(n: int, kind: str, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(n, generator=g, dtype=torch.float64) ** 2
    if kind == "zeros":
        f.zero_()
    elif kind == "sparse":
        f = f * (torch.rand(n, generator=g, dtype=torch.float64) < 0.2)
    elif kind == "huge":
        f = f * torch.finfo(dtype).max / 8
    elif kind == "tiny":
        f = f * torch.finfo(dtype).tiny
    if n and kind in ("nan", "inf", "neginf", "negative"):
        i = int(torch.randint(0, n, (1,), generator=g))
        f[i] = {"nan": float("nan"), "inf": float("inf"), "neginf": -float("inf"), "negative": -0.5}[kind]
    return f.to(dtype)


@st.composite
def fisher_vectors(draw, n=None):
    n = draw(st.integers(0, 40)) if n is None else n
    kind = draw(st.sampled_from(FISHER_KINDS))
    return make_fisher(n, kind, draw(st.integers(0, 2**16)), draw(st.sampled_from(DTYPES)))


def _has_negative(f: torch.Tensor) -> bool:
    x = f.double()
    return bool((torch.isfinite(x) & (x < 0)).any())


@MORE
@given(
    f=fisher_vectors(),
    exponent=mostly(st.floats(0.0, 4.0), st.sampled_from([-0.5, float("nan"), float("inf")])),
    eps=mostly(st.floats(1e-12, 1.0), st.sampled_from(BAD_NUMBERS)),
)
def test_fisher_weights_contract(f, exponent, eps):
    bad_exp = not (0 <= exponent < math.inf)
    bad_eps = not (0 < eps < math.inf)
    call = lambda: fisher_weights(f, exponent=exponent, eps=eps)  # noqa: E731
    if bad_exp or bad_eps:
        expect_error(call, *(["exponent"] if bad_exp else []), *(["eps"] if bad_eps else []))
        return
    if _has_negative(f):
        expect_error(call, "fisher", ">= 0")
        return
    out_dtype = _compute_dtype(f.dtype)
    w = call()
    event("valid")
    assert w.shape == f.shape and w.dtype == out_dtype
    assert _finite(w) and bool((w > 0).all())
    x = torch.where(torch.isfinite(f.double()), f.double(), torch.zeros((), dtype=torch.float64))
    if f.numel() and float(x.max()) == 0:
        assert bool((w == 1).all())  # no information: no weighting
    if f.numel() > 1 and exponent > 0:  # weights are a monotone function of the (cleaned) Fisher
        # up to a few ulps: torch's vectorised pow and its scalar tail loop may round the same value differently
        order = torch.argsort(x)
        ulps = 4 * torch.finfo(w.dtype).eps
        assert bool((w[order][1:] >= w[order][:-1] * (1 - ulps)).all())


@st.composite
def optional_side_fisher(draw, size: int):
    choice = draw(mostly(st.sampled_from(["none", "ok"]), st.sampled_from(["wrong_len", "2d", "list"])))
    if choice == "none":
        return None
    if choice == "ok":
        return draw(fisher_vectors(n=size))
    if choice == "wrong_len":
        return torch.ones(size + draw(st.integers(1, 3)))
    if choice == "2d":
        return torch.ones(size, 1)
    return [1.0] * size


@MORE
@given(data=st.data(), W=matrices(max_side=30))
def test_fwsvd_contract(data, W):
    out_f, in_f = W.shape
    rank = data.draw(rank_values(min(out_f, in_f)), label="rank")
    row = data.draw(optional_side_fisher(out_f), label="row_fisher")
    col = data.draw(optional_side_fisher(in_f), label="col_fisher")
    exponent = data.draw(st.floats(0.0, 2.0), label="exponent")
    eps = data.draw(st.floats(1e-8, 1.0), label="eps")
    call = lambda: fwsvd(W, rank, row_fisher=row, col_fisher=col, exponent=exponent, eps=eps, name="blk.w")  # noqa: E731

    def bad_side(f, size):
        return f is not None and not (isinstance(f, torch.Tensor) and f.ndim == 1 and f.shape[0] == size)

    problems = []
    if bad_side(row, out_f):
        problems.append("row_fisher")
    if bad_side(col, in_f):
        problems.append("col_fisher")
    if any(isinstance(f, torch.Tensor) and _has_negative(f) for f in (row, col)):
        problems.append("fisher")  # see test_fwsvd_negative_fisher_message_names_side_and_module
    if problems:
        expect_error(call, *problems)
        return
    k = min(out_f, in_f)
    if not _finite(W):
        expect_error(call, "blk.w", "rank", types=(ValueError, SVDError))
        return
    if not (_is_int(rank) and 1 <= rank <= k):
        expect_error(call, "rank")
        return
    big = float(W.double().abs().max())
    benign = big == 0 or 1e-6 <= big <= 1e6  # no under/overflow of the weighted matrix in the compute dtype
    try:
        down, up = call()
    except SVDError as exc:  # allowed only where weights times values leave the compute dtype's range
        assert not benign, f"SVDError on a benign input: {exc}"
        assert_clear(exc, "blk.w", types=(SVDError,))
        return
    cdtype = _compute_dtype(W.dtype)
    event("valid" + (" (Eckart-Young checked)" if benign else ""))
    assert down.shape == (rank, in_f) and up.shape == (out_f, rank)
    assert down.dtype == up.dtype == cdtype and _finite(down, up)
    if not benign:
        return
    # Eckart-Young in the weighted norm: the exact weighted SVD is optimal, so the weighted error is the tail
    d_out = fisher_weights(row, exponent=exponent, eps=eps).double() if row is not None else torch.ones(out_f)
    d_in = fisher_weights(col, exponent=exponent, eps=eps).double() if col is not None else torch.ones(in_f)
    d_out, d_in = d_out.double(), d_in.double()
    A = d_out[:, None] * W.double() * d_in[None, :]
    norm = _scaled_norm(A)
    if norm == 0:
        assert float((up.double() @ down.double()).abs().max()) == 0.0
        return
    R = d_out[:, None] * (W.double() - up.double() @ down.double()) * d_in[None, :]
    err = _scaled_norm(R) / norm
    ref = math.sqrt(float(tail_energy(torch.linalg.svdvals(A / norm))[rank]))
    tol = 1e-9 if cdtype == torch.float64 else 1e-4
    assert err >= ref - tol and abs(err - ref) <= tol, (err, ref, tol)


@SETTINGS
@given(
    r=st.integers(0, 6),
    out_f=st.integers(1, 20),
    in_f=st.integers(1, 20),
    kind=st.sampled_from(["ok", "ok", "ok", "ok", "nan", "inf", "mismatch", "1d"]),
    mode=mostly(st.sampled_from(["row", "two_sided"]), st.sampled_from(["full", "", None, "ROW"])),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
)
def test_lora_fisher_to_weights_contract(r, out_f, in_f, kind, mode, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    FA = (torch.rand(r, in_f, generator=g, dtype=torch.float64) ** 2).to(dtype)
    FB = (torch.rand(out_f, r, generator=g, dtype=torch.float64) ** 2).to(dtype)
    if kind == "nan" and r:
        FA[0, 0] = float("nan")
    if kind == "inf" and r:
        FB[-1, -1] = float("inf")
    if kind == "mismatch":
        FB = torch.ones(out_f, r + 1, dtype=dtype)
    if kind == "1d":
        FA = FA.reshape(-1)
    call = lambda: lora_fisher_to_weights(FA, FB, mode)  # noqa: E731
    if mode not in ("row", "two_sided"):
        expect_error(call, "mode")
        return
    if kind == "1d":
        expect_error(call, "fisher_a")
        return
    if kind == "mismatch":
        expect_error(call, "fisher_a", "fisher_b")
        return
    row, col = call()
    event("valid")
    assert row.shape == (out_f,) and row.dtype == torch.float64
    if mode == "row":
        assert col is None
        assert torch.allclose(row, FB.double() @ FA.double().sum(1), equal_nan=True)
    else:
        assert col.shape == (in_f,) and col.dtype == torch.float64
    if kind == "ok":
        assert _finite(row) and bool((row >= 0).all())
        assert col is None or (_finite(col) and bool((col >= 0).all()))
    # whatever the LoRA Fisher holds, the weights derived from it are finite and positive
    for f in (row, col):
        if f is not None:
            w = fisher_weights(f)
            assert _finite(w) and bool((w > 0).all())


@pytest.mark.parametrize(
    "f, exponent, eps",
    [(torch.tensor([0.0, 1.0]), 4.0, 1e-12), (torch.tensor([0.0, 1.0]), 200.0, 1e-6)],
    ids=["underflow", "overflow"],
)
def test_fisher_weights_stay_in_range(f, exponent, eps):
    try:
        w = fisher_weights(f, exponent=exponent, eps=eps)
    except ValueError as exc:
        assert_clear(exc, "exponent", "eps")
        return
    assert _finite(w) and bool((w > 0).all())


def test_fwsvd_negative_fisher_message_names_side_and_module():
    exc = expect_error(lambda: fwsvd(torch.randn(5, 4), 2, col_fisher=-torch.ones(4), name="blk.w"), "col_fisher")
    assert "blk.w" in str(exc)


# ---------------------------------------------------------------------------------------------------------------------
# rank_allocation.py
# ---------------------------------------------------------------------------------------------------------------------

VALID_SPECTRUM_KINDS = ("decay", "decay", "const", "zero", "len1", "lowrank")
INVALID_SPECTRUM_KINDS = ("nan", "inf", "negative", "empty", "2d")
SPECTRUM_KINDS = VALID_SPECTRUM_KINDS * 2 + INVALID_SPECTRUM_KINDS


def make_spectrum(k: int, kind: str, seed: int, scale_exp: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = 10.0**scale_exp
    if kind == "len1":
        k = 1
    if kind == "empty":
        return torch.zeros(0, dtype=dtype)
    S = torch.rand(k, generator=g, dtype=torch.float64).sort(descending=True).values ** 3 * scale
    if kind == "const":
        S = torch.full((k,), 2.0 * scale, dtype=torch.float64)
    elif kind == "zero":
        S = torch.zeros(k, dtype=torch.float64)
    elif kind == "lowrank":
        S[max(1, k // 3) :] = 0
    elif kind in ("nan", "inf", "negative"):
        S[-1] = {"nan": float("nan"), "inf": float("inf"), "negative": -1.0}[kind]
    elif kind == "2d":
        S = S[:, None]
    if kind != "len1" and kind != "2d":
        S = S[torch.randperm(k, generator=g)]  # any order: the allocators sort
    return S.to(dtype)


def _valid_spectrum(S) -> bool:
    return isinstance(S, torch.Tensor) and S.ndim == 1 and S.numel() > 0 and _finite(S) and bool((S >= 0).all())


@SETTINGS
@given(
    k=st.integers(1, 40),
    kind=st.sampled_from(SPECTRUM_KINDS),
    seed=st.integers(0, 2**16),
    scale_exp=st.integers(-20, 20),
    dtype=st.sampled_from(DTYPES),
)
def test_normalized_spectrum_contract(k, kind, seed, scale_exp, dtype):
    S = make_spectrum(k, kind, seed, scale_exp, torch.float64).to(dtype)
    if not _valid_spectrum(S):
        expect_error(lambda: normalized_spectrum(S), "spectrum")
        return
    s = normalized_spectrum(S)
    event("valid")
    assert s.shape == S.shape and s.dtype == torch.float64 and _finite(s)
    assert bool((s[:-1] >= s[1:]).all()) and float(s.min()) >= 0 and float(s.max()) <= 1
    S64 = S.double()
    if float(S64.max()) == 0:
        assert bool((s == 0).all())
    elif float(S64.max()) == float(S64.min()):
        assert bool((s == 1).all())
    else:
        assert float(s[0]) == 1.0 and float(s[-1]) == 0.0


@st.composite
def shape_maps(draw, allow_invalid: bool = True):
    names = draw(st.lists(st.sampled_from(["a", "b.q_proj", "c.0.up", "d", "e"]), min_size=1, max_size=4, unique=True))
    shapes = {n: (draw(st.integers(1, 40)), draw(st.integers(1, 40))) for n in names}
    if allow_invalid and not draw(mostly(st.just(True), st.just(False))):
        shapes[draw(st.sampled_from(names))] = draw(st.sampled_from([(0, 4), (5, -1), (1, 2, 3), None, "ab", (3,)]))
    return shapes


def _valid_shape(s) -> bool:
    return isinstance(s, tuple) and len(s) == 2 and all(_is_int(v) and v >= 1 for v in s)


@MORE
@given(
    shapes=shape_maps(),
    keep=mostly(st.floats(1e-4, 1.0), st.sampled_from([*BAD_NUMBERS, 1.01])),
    lrc_ratio=mostly(st.floats(1e-3, 1.0), st.sampled_from([*BAD_NUMBERS, 2.0])),
)
def test_uniform_ranks_and_the_lrc_split(shapes, keep, lrc_ratio):
    bad_names = [n for n, s in shapes.items() if not _valid_shape(s)]
    bad_keep = not (0 < keep <= 1)
    if bad_names or bad_keep:
        expect_error(lambda: uniform_ranks(shapes, keep), *bad_names, *(["keep"] if bad_keep else []))
        return
    ranks = uniform_ranks(shapes, keep)
    assert set(ranks) == set(shapes)
    for n, r in ranks.items():
        assert _is_int(r) and 1 <= r <= min(shapes[n])
        assert r - rank_for_keep(*shapes[n], keep) in (0, 1)  # the floor, or one above it to fill the budget
    # within the budget, but for modules whose ideal rank is below 1 (they keep rank 1)
    budget = sum(keep * o * i for o, i in shapes.values())
    forced = sum(o + i for o, i in shapes.values() if keep * o * i / (o + i) < 1)
    assert sum(r * sum(shapes[n]) for n, r in ranks.items()) <= budget + forced + 1e-6
    # the LRC split of WeLore on these ranks, pinned: a module is an LRC when its rank < lrc_ratio * min(out, in)
    spectra = {n: torch.linspace(2.0, 1.0, min(s)) for n, s in shapes.items()}
    total = sum(min(s) for s in shapes.values())
    removed = sum(min(shapes[n]) - r for n, r in ranks.items() if 0 < lrc_ratio <= 1 and r < lrc_ratio * min(shapes[n]))
    reduction = min(max(removed / total, 1e-9), 1 - 1e-9)
    call = lambda: welore_ranks(spectra, reduction, lrc_ratio=lrc_ratio, pinned=ranks)  # noqa: E731
    if not (0 < lrc_ratio <= 1):
        expect_error(call, "lrc_ratio")
        return
    alloc = call()
    event("valid")
    lrc, nlrc = set(alloc.lrc), set(alloc.nlrc)
    assert lrc | nlrc == set(ranks) and not lrc & nlrc
    for n in ranks:
        assert (n in lrc) == (ranks[n] < lrc_ratio * min(shapes[n]))
    expect_error(lambda: welore_ranks(spectra, reduction, pinned={**ranks, "zz.missing": 1}), "zz.missing")


@st.composite
def spectra_maps(draw, kinds=VALID_SPECTRUM_KINDS, bad_kinds=INVALID_SPECTRUM_KINDS, max_modules=5, max_len=40):
    n = draw(st.integers(1, max_modules))
    bad = -1 if draw(mostly(st.just(True), st.just(False))) else draw(st.integers(0, n - 1))
    out = {}
    for i in range(n):
        kind = draw(st.sampled_from(bad_kinds if i == bad else kinds))
        S = make_spectrum(
            draw(st.integers(1, max_len)),
            kind,
            draw(st.integers(0, 2**16)),
            draw(st.integers(-6, 6)),
            draw(st.sampled_from([torch.float32, torch.float64])),
        )
        out[f"layers.{i}.proj"] = S
    return out


@MORE
@given(
    spectra=spectra_maps(),
    reduction=mostly(st.floats(0.001, 0.999), st.sampled_from([0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.3", None])),
)
def test_welore_ranks_reaches_the_closest_reachable_reduction(spectra, reduction):
    call = lambda: welore_ranks(spectra, reduction, nlrc="truncate")  # noqa: E731  (every removed rank counts)
    bad_red = isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0 < reduction < 1
    bad = [n for n, S in spectra.items() if not _valid_spectrum(S)]
    if bad_red or bad:
        expect_error(call, *(["reduction"] if bad_red else []), *bad)
        return
    full = {n: S.numel() for n, S in spectra.items()}
    total = sum(full.values())
    max_removed = total - len(full)
    beyond, limit = reduction - max_removed / total, max(0.5 / total, 0.005)  # how far past all-rank-1 WeLore allows
    if abs(beyond - limit) < 1e-9:
        return  # on the refusal boundary up to float rounding: either answer is right
    if beyond > limit:  # refused, naming the most that can be removed
        exc = expect_error(call, "reduction")
        assert f"most WeLore can remove is {max_removed / total:.2%}" in str(exc), exc
        return
    alloc = call()
    event("valid")
    assert set(alloc.ranks) == set(spectra)
    for n, r in alloc.ranks.items():
        assert _is_int(r) and 1 <= r <= full[n]
    removed = sum(full[n] - alloc.ranks[n] for n in full)
    assert math.isclose(alloc.achieved_reduction, removed / total, abs_tol=1e-12)
    # every count of removed ranks from 0 to (total - #modules) is reachable; WeLore must land on the closest one
    best = min(abs(j / total - reduction) for j in range(max_removed + 1))
    assert abs(alloc.achieved_reduction - reduction) <= best + 1e-12, (alloc, best)
    assert abs(alloc.achieved_reduction - reduction) <= 0.005 or best > 0.005 - 1e-4  # 0.5pp or closest reachable


@MORE
@given(
    data=st.data(),
    spectra=spectra_maps(bad_kinds=("nan", "empty", "negative"), max_modules=4, max_len=30),
    r_avg=mostly(st.floats(0.1, 40.0), st.sampled_from([*BAD_NUMBERS, "4", None])),
    alpha=mostly(st.floats(0.0, 1.0), st.sampled_from([-0.1, 1.5, float("nan")])),
)
def test_ere_ranks_contract(data, spectra, r_avg, alpha):
    shapes = {}
    for n, S in spectra.items():
        k = max(S.numel(), 1)
        extra = data.draw(st.tuples(st.integers(0, 10), st.integers(0, 10)), label=f"extra {n}")
        shapes[n] = (k + extra[0], k + extra[1])
    fit_range = data.draw(
        mostly(
            st.one_of(st.none(), st.tuples(st.floats(0.0, 0.5), st.floats(0.55, 1.0))),
            st.sampled_from([(0.5, 0.5), (0.8, 0.2), (-0.1, 0.5), (0.0, 1.5), (0.5,)]),
        ),
        label="fit_range",
    )
    call = lambda: ere_ranks(spectra, shapes, r_avg, alpha=alpha, fit_range=fit_range)  # noqa: E731
    bad_r = not (isinstance(r_avg, (int, float)) and 0 < r_avg < math.inf)
    bad_alpha = not (0 <= alpha <= 1)
    bad_fit = fit_range is not None and not (len(fit_range) == 2 and 0 <= fit_range[0] < fit_range[1] <= 1)
    bad = [n for n, S in spectra.items() if not _valid_spectrum(S)]
    if bad_r or bad_alpha or bad_fit or bad:
        expect_error(
            call,
            *(["r_avg"] if bad_r else []),
            *(["alpha"] if bad_alpha else []),
            *(["fit_range"] if bad_fit else []),
            *bad,
        )
        return
    res = call()
    event("valid")
    cost = {n: sum(shapes[n]) for n in spectra}
    cap = {n: S.numel() for n, S in spectra.items()}
    assert math.isclose(res.budget, r_avg * sum(cost.values()), rel_tol=1e-12)
    for table in (res.ranks, res.blended):
        assert set(table) == set(spectra)
        for n, r in table.items():
            assert _is_int(r) and 0 <= r <= cap[n]
    for n, x in res.relaxed.items():
        assert math.isfinite(x) and -1e-9 <= x <= cap[n] + 1e-9
    for n, S in spectra.items():
        if float(S.abs().max()) == 0:
            assert res.blended[n] == 0  # nothing to encode
    assert res.used_pre_blend == sum(res.ranks[n] * cost[n] for n in spectra)
    assert res.used == sum(res.blended[n] * cost[n] for n in spectra)
    assert res.used <= res.budget + 1e-6  # the blend never spends more than the budget
    assert res.used_pre_blend <= res.budget + 1e-6
    full_cost = sum(cap[n] * cost[n] for n in spectra)
    if all(float(S.abs().max()) > 0 for S in spectra.values()):
        if res.budget >= full_cost:
            assert res.ranks == cap
        else:  # budget-aware rounding falls short by less than one module's cost
            assert res.used_pre_blend > res.budget - max(cost.values()) - 1e-6
    assert res.lam >= 0 and not math.isnan(res.lam)


@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_ere_ranks_invariant_to_a_common_scale(scale):
    spectra = {
        "a": torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64),
        "b": torch.tensor([4.0, 0.5, 0.1, 0.01], dtype=torch.float64),
    }
    shapes = {"a": (5, 8), "b": (4, 6)}
    ref = ere_ranks(spectra, shapes, 2.0, alpha=0.0)
    got = ere_ranks({n: S * scale for n, S in spectra.items()}, shapes, 2.0, alpha=0.0)
    assert got.blended == ref.blended and got.ranks == ref.ranks


def test_welore_ranks_rejects_or_survives_max_iter_zero():
    spectra = {"a": torch.arange(50.0), "b": torch.arange(20.0)}
    try:
        alloc = welore_ranks(spectra, 0.3, nlrc="truncate", max_iter=0)
    except ValueError as exc:
        assert_clear(exc, "max_iter")
        return
    assert abs(alloc.achieved_reduction - 0.3) <= 0.5 / 70 + 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# quant.py
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def quant_inputs(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(0 if i == ndim - 1 else 1, 12 if ndim > 1 else 40)) for i in range(ndim))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(("gauss", "gauss", "const", "zero", "huge", "tiny", "nan", "inf", "offset")))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    finfo = torch.finfo(dtype)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** draw(st.integers(-4, 4))
    if kind == "const":
        x = torch.full(shape, float(torch.randn(1, generator=g)) * 100, dtype=torch.float64)
    elif kind == "zero":
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "huge":
        x = torch.randn(shape, generator=g, dtype=torch.float64) * finfo.max / 16
    elif kind == "tiny":
        x = torch.randn(shape, generator=g, dtype=torch.float64) * finfo.tiny * 8
    elif kind == "offset":  # a small spread around a large value: the fp16 offset must be rounded down
        x = 1000.0 + torch.rand(shape, generator=g, dtype=torch.float64)
    if x.numel() and kind in ("nan", "inf"):
        x.view(-1)[int(torch.randint(0, x.numel(), (1,), generator=g))] = float("nan") if kind == "nan" else math.inf
    return x.to(dtype)


@MORE
@given(
    x=quant_inputs(),
    bits=mostly(st.integers(2, 8), st.integers(0, 10)),
    group_size=mostly(st.sampled_from([1, 2, 3, 7, 16, 64, 100]), st.sampled_from([0, -4, True, 2.5])),
    scale_dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_quantize_rtn_roundtrip_within_half_a_step(x, bits, group_size, scale_dtype):
    call = lambda: quantize_rtn(x, bits, group_size=group_size, scale_dtype=scale_dtype)  # noqa: E731
    if not 2 <= bits <= 8:
        expect_error(call, "bits")
        return
    if not (_is_int(group_size) and group_size > 0):
        expect_error(call, "group_size")
        return
    if not _finite(x):
        expect_error(call, "inf or nan")
        return
    q = call()
    event("valid")
    shape = tuple(x.shape)
    n = shape[-1]
    n_groups = -(-n // group_size)
    assert q.shape == shape and q.bits == bits and q.group_size == group_size
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == -(-x.numel() * bits // 8)
    assert tuple(q.scales.shape) == (*shape[:-1], n_groups) == tuple(q.offsets.shape)
    assert _finite(q.scales, q.offsets) and bool((q.scales >= 0).all())
    y = dequantize_rtn(q, torch.float64)
    assert y.shape == x.shape and y.dtype == torch.float64 and _finite(y)
    if x.numel():
        step = q.scales.double().repeat_interleave(group_size, dim=-1)[..., :n]
        err = (y - x.double()).abs()
        # float32 arithmetic (codes are computed in float32 for non-float64 inputs)
        slack = 4 * float(torch.finfo(torch.float32).eps) * (x.double().abs() + y.abs()) + 1e-5 * step
        assert bool((err <= step / 2 + slack).all()), float((err - step / 2 - slack).max())
    # self-contained serialization round trip
    q2 = QuantizedTensor.from_dict(q.to_dict("m.U."), "m.U.")
    assert torch.equal(dequantize_rtn(q2, torch.float64), y)
    assert q.nbytes() == q.packed.numel() + 2 * q.scales.numel() * q.scales.element_size()


@SETTINGS
@given(
    n=st.integers(0, 100),
    bits=mostly(st.integers(2, 8), st.integers(0, 10)),
    seed=st.integers(0, 2**16),
    overflow=st.booleans(),
)
def test_pack_unpack_bits_roundtrip(n, bits, seed, overflow):
    g = torch.Generator().manual_seed(seed)
    hi = 1 << min(max(bits, 1), 8)
    codes = torch.randint(0, hi, (n,), generator=g).to(torch.uint8)
    if not 2 <= bits <= 8:
        expect_error(lambda: pack_bits(codes, bits), "bits")
        expect_error(lambda: unpack_bits(torch.zeros(n, dtype=torch.uint8), bits, n), "bits")
        return
    if overflow and n and bits < 8:
        codes[-1] = hi  # one value too wide for the code width
        expect_error(lambda: pack_bits(codes, bits), "bits", "codes")
        return
    packed = pack_bits(codes, bits)
    event("valid")
    assert packed.dtype == torch.uint8 and packed.shape == (-(-n * bits // 8),)
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    expect_error(lambda: unpack_bits(torch.cat([packed, packed.new_zeros(1)]), bits, n), "bytes", "packed")
    expect_error(lambda: unpack_bits(packed, bits, -1), "numel")
    expect_error(lambda: pack_bits(codes.to(torch.int32), bits), "uint8")


@SETTINGS
@given(
    X=matrices(kinds=("gauss", "gauss", "gauss", "zero", "lowrank", "const", "nan", "inf", "tiny")),
    tall=st.sampled_from([True, True, True, False]),
)
def test_stiefel_project_is_orthonormal_and_nearest(X, tall):
    if tall and X.shape[0] < X.shape[1]:
        X = X.T.contiguous()
    m, k = X.shape
    if m < k:
        expect_error(lambda: stiefel_project(X), "m >= k")
        return
    if not _finite(X):
        expect_error(lambda: stiefel_project(X), "inf or nan", "stiefel", types=(ValueError, SVDError))
        return
    Y = stiefel_project(X)
    event("valid")
    cdtype = _compute_dtype(X.dtype)
    assert Y.shape == (m, k) and Y.dtype == cdtype and _finite(Y)
    tol = 1e-10 if cdtype == torch.float64 else 1e-5
    gram = Y.double().T @ Y.double()
    assert float((gram - torch.eye(k, dtype=torch.float64)).abs().max()) <= tol * k
    # nearest orthonormal matrix: at least as close to X as the (orthonormal) Q factor of X
    Q = torch.linalg.qr(X.double()).Q
    X64 = X.double()
    assert float(torch.linalg.matrix_norm(X64 - Y.double())) <= float(torch.linalg.matrix_norm(X64 - Q)) + 1e-4


@pytest.mark.parametrize(
    "x",
    [
        torch.tensor([[-3e38, 3e38]]),
        torch.tensor([[-3e38, 3e38]], dtype=torch.bfloat16),
        torch.tensor([[-1e300, 1e300]], dtype=torch.float64),
    ],
    ids=["fp32", "bf16", "fp64"],
)
def test_quantize_rtn_range_beyond_float32(x):
    try:
        q = quantize_rtn(x, 4)
    except ValueError as exc:
        assert_clear(exc, "range", "float32", "scale")
        return
    assert _finite(dequantize_rtn(q, torch.float64))


# ---------------------------------------------------------------------------------------------------------------------
# importance.py
# ---------------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(W=matrices(), data=st.data())
def test_row_importance_contract(W, data):
    out_f, in_f = W.shape
    s = l2_importance(W)
    assert s.shape == (out_f,) and s.dtype == torch.float32
    ref = torch.linalg.vector_norm(W.double(), dim=1)
    if _finite(W) and float(ref.max()) < 0.5 * FP32_MAX:
        # float32 scores: norms below float32's range (float64 weights of ~1e-307) round to what float32 holds
        assert _finite(s) and torch.allclose(s.double(), ref.float().double(), rtol=1e-5, atol=0)
    kind = data.draw(st.sampled_from(["same", "same", "transposed", "1d"]), label="G kind")
    G = make_matrix(out_f, in_f, W.dtype, "gauss", data.draw(st.integers(0, 2**16)))
    if kind == "transposed" and out_f != in_f:
        expect_error(lambda: taylor_importance(W, G.T), "shape", "G ")
    elif kind == "1d":
        expect_error(lambda: taylor_importance(W, G.reshape(-1)), "G ")
    t = taylor_importance(W, G)
    assert t.shape == (out_f,) and t.dtype == torch.float32
    tref = (W.double() * G.double()).sum(1).abs()
    if _finite(W) and float(tref.max()) < 0.5 * FP32_MAX:
        assert _finite(t) and torch.allclose(t.double(), tref, rtol=1e-5, atol=1e-30)
    # whatever the scores hold, selecting rows either works or says why
    r = data.draw(mostly(st.integers(1, out_f), st.integers(-2, 45)), label="r")
    for scores in (s, t):
        if not (1 <= r <= out_f):
            expect_error(lambda s=scores: top_rows(s, r), "r=")
        elif not _finite(scores):
            expect_error(lambda s=scores: top_rows(s, r), "inf or nan")
        else:
            idx = top_rows(scores, r)
            event("valid top_rows")
            assert idx.dtype == torch.int64 and idx.shape == (r,)
            assert bool((idx[1:] > idx[:-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < out_f
            rest = torch.ones(out_f, dtype=torch.bool)
            rest[idx] = False
            if bool(rest.any()):
                assert float(scores[idx].min()) >= float(scores[rest].max())


@SETTINGS
@given(
    T=mostly(st.integers(1, 6), st.just(0)),
    out_f=st.integers(1, 30),
    in_f=st.integers(1, 10),
    levels=mostly(
        st.one_of(st.just(None), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5)),
        st.sampled_from([[], [1.5], [-0.1, 0.5], [float("nan")]]),
    ),
    seed=st.integers(0, 2**16),
    as_tensor=st.booleans(),
)
def test_quantile_mean_taylor_contract(T, out_f, in_f, levels, seed, as_tensor):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    grads = torch.randn(T, out_f, in_f, generator=g)
    kw = {} if levels is None else {"levels": levels}
    class_grads = grads if as_tensor else list(grads.unbind(0))
    call = lambda: quantile_mean_taylor_importance(W, class_grads, **kw)  # noqa: E731
    bad_levels = levels is not None and (not levels or any(not 0 <= q <= 1 for q in levels))
    if T == 0:
        expect_error(call, "class_grads", "eta", "class")
        return
    if bad_levels:
        expect_error(call, "quantile levels", "levels")
        return
    score = call()
    event("valid")
    assert score.shape == (out_f,) and score.dtype == torch.float32 and _finite(score)
    eta = torch.stack([taylor_importance(W, G) for G in grads])
    assert bool((score >= eta.min(0).values * (1 - 1e-6) - 1e-6).all())
    assert bool((score <= eta.max(0).values * (1 + 1e-6) + 1e-6).all())
    if T == 1:
        assert torch.allclose(score, eta[0], rtol=1e-6)
    expect_error(lambda: quantile_mean(eta[:, :0][:0]), "eta")


@SETTINGS
@given(
    B=st.integers(1, 3),
    L=st.integers(1, 5),
    in_f=st.integers(1, 12),
    out_f=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
)
def test_row_dot_from_activations_matches_the_full_gradient(B, L, in_f, out_f, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, in_f, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, L, out_f, generator=g, dtype=torch.float64).to(dtype)
    z = x.double() @ W.double().T
    G = torch.einsum("blo,bli->oi", grad.double(), x.double())  # the (out, in) gradient, formed explicitly
    got = row_dot_from_activations(grad, z)
    assert got.shape == (out_f,) and got.dtype == torch.float64
    assert torch.allclose(got, (W.double() * G).sum(1), rtol=1e-9, atol=1e-9)
    per = row_dot_from_activations(grad, z, per_example=True)
    assert per.shape == (B, out_f) and torch.allclose(per.sum(0), got, rtol=1e-9, atol=1e-9)
    expect_error(lambda: row_dot_from_activations(grad, z[..., :0] if out_f > 1 else z[:, :0]), "same shape")


@SETTINGS
@given(out_f=st.integers(1, 40), ratio=mostly(st.floats(1e-6, 1.0), st.sampled_from([*BAD_NUMBERS, 1.5])))
def test_rows_for_ratio_contract(out_f, ratio):
    if not (0 < ratio <= 1):
        expect_error(lambda: rows_for_ratio(out_f, ratio), "ratio")
        return
    r = rows_for_ratio(out_f, ratio)
    event("valid")
    assert _is_int(r) and 1 <= r <= out_f
    assert r == max(1, min(out_f, round(ratio * out_f)))


@pytest.mark.parametrize("value", [1e19, 7e-38], ids=["overflow", "underflow"])
def test_l2_importance_of_extreme_finite_rows(value):
    W = torch.full((2, 40), value)
    s = l2_importance(W)
    assert torch.allclose(s.double(), torch.linalg.vector_norm(W.double(), dim=1), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda: quantile_mean(torch.ones(2, 0)), ("eta", "out")),
        (lambda: row_dot_from_activations(torch.tensor(1.0), torch.tensor(1.0)), ("grad_out", "z", "shape")),
        (lambda: top_rows(torch.ones(5), 2.5), ("r",)),
        (lambda: rows_for_ratio(0, 0.5), ("out_features",)),
    ],
    ids=["quantile_mean-empty", "row_dot-0d", "top_rows-float-r", "rows_for_ratio-0"],
)
def test_importance_rejects_degenerate_inputs(call, names):
    expect_error(call, *names)


# ---------------------------------------------------------------------------------------------------------------------
# empty inputs across the ops
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_empty_matrices(shape):
    A = torch.zeros(shape)
    k = min(shape)
    U, S, Vh = full_svd(A, name="blk.e")
    assert U.shape == (shape[0], k) and S.shape == (0,) and Vh.shape == (k, shape[1])
    assert singular_values(A).shape == (0,)
    expect_error(lambda: truncated_svd(A, 1, name="blk.e"), "rank")
    expect_error(lambda: fwsvd(A, 1, row_fisher=torch.ones(shape[0]), name="blk.e"), "rank")
    assert l2_importance(A).shape == (shape[0],)
    assert taylor_importance(A, A).shape == (shape[0],)
    if shape[0] == 0:
        expect_error(lambda: top_rows(l2_importance(A), 1), "r=")
    else:  # rows without columns all score 0: any row is a valid pick
        assert top_rows(l2_importance(A), 1).tolist() == [0]
    q = quantize_rtn(A, 4, group_size=2)
    assert dequantize_rtn(q).shape == shape
    if shape[0] >= shape[1]:
        assert stiefel_project(A).shape == shape
    assert tail_energy(S).shape == (1,)
    expect_error(lambda: normalized_spectrum(S), "spectrum")
    expect_error(lambda: welore_ranks({"a": S}, 0.3), "spectrum")
    expect_error(lambda: ere_ranks({"a": S}, {"a": (4, 4)}, 2.0), "spectrum")
    expect_error(lambda: welore_ranks({}, 0.3), "spectra")
    expect_error(lambda: ere_ranks({}, {}, 2.0), "spectra")
    w = fisher_weights(torch.zeros(0))
    assert w.shape == (0,)
