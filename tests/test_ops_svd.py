"""Numerics of hf_lowrank.ops.svd against references with error bounds."""

from __future__ import annotations

import pytest
import torch

from hf_lowrank.ops import svd as svd_mod
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


def _low_rank_plus_noise(m: int, n: int, r: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(r, dtype=torch.float64) / (r / 3))
    A = (
        torch.randn(m, r, generator=g, dtype=torch.float64)
        * decay
        @ torch.randn(r, n, generator=g, dtype=torch.float64)
    )
    return A + noise * torch.randn(m, n, generator=g, dtype=torch.float64) * A.std()


def _assert_orthonormal_columns(Q: torch.Tensor, tol: float) -> None:
    eye = torch.eye(Q.shape[1], dtype=Q.dtype)
    assert torch.linalg.matrix_norm(Q.T @ Q - eye) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(90, 60), (60, 90)])
def test_exact_truncated_svd_meets_eckart_young(dtype, shape):
    A = torch.randn(*shape, dtype=torch.float64).to(dtype)
    S_all = torch.linalg.svdvals(A.double())
    tail = tail_energy(S_all)
    for r in (1, 7, 30, min(shape) - 1):
        U, S, Vh = truncated_svd(A, r, method="exact")
        assert U.shape == (shape[0], r) and S.shape == (r,) and Vh.shape == (r, shape[1])
        assert U.dtype == dtype
        err2 = float(torch.linalg.matrix_norm(A.double() - (U * S).double() @ Vh.double()) ** 2)
        assert abs(err2 - float(tail[r])) <= 1e-5 * float(tail[r])
        # the balanced split reproduces the same approximation
        down, up = split_factors(U, S, Vh)
        assert down.shape == (r, shape[1]) and up.shape == (shape[0], r)
        assert torch.allclose(up @ down, (U * S) @ Vh, atol=1e-5 * float(S[0]))


def test_tail_energy_definition():
    S = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert torch.equal(tail_energy(S), torch.tensor([14.0, 5.0, 1.0, 0.0], dtype=torch.float64))


def test_randomized_svd_within_one_percent_of_exact():
    for seed in range(2):
        A = _low_rank_plus_noise(400, 300, 40, noise=0.05, seed=seed).float()
        full = full_svd(A)
        for r in (10, 25):
            err_exact = relative_error(A, (full.U[:, :r] * full.S[:r]) @ full.Vh[:r])
            rand = truncated_svd(A, r, method="randomized")
            err_rand = relative_error(A, (rand.U * rand.S) @ rand.Vh)
            assert err_rand <= 1.01 * err_exact
            assert err_exact <= err_rand + 1e-6  # Eckart-Young: nothing beats the exact SVD
            _assert_orthonormal_columns(rand.U, 1e-4)


def test_randomized_svd_ignores_and_keeps_the_global_rng():
    """The range finder draws from its own fixed seed: the same factors whatever the global RNG state (processes
    under torch.distributed seed it differently), and the global RNG is left where it was."""
    A = _low_rank_plus_noise(200, 150, 20, noise=0.05, seed=3).float()
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = torch.rand(4)
        torch.manual_seed(seed)
        results.append(truncated_svd(A, 8, method="randomized"))
        assert torch.equal(torch.rand(4), expected)  # the global RNG was not advanced
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)


def test_auto_picks_randomized_only_when_cheap(monkeypatch):
    calls = []
    real = torch.svd_lowrank

    def spy(*args, **kwargs):
        calls.append(kwargs.get("q"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", spy)
    A = torch.randn(300, 200)
    truncated_svd(A, 10)  # q = 20, 5 * 20 <= 200: randomized
    assert calls == [20]
    truncated_svd(A, 60)  # q = 70: exact
    assert calls == [20]


def test_fallback_when_linalg_svd_raises_once(monkeypatch):
    A = torch.randn(70, 50, dtype=torch.float32)
    real = torch.linalg.svd
    state = {"calls": 0}

    def flaky(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == 1:
            raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    U, S, Vh = full_svd(A, name="layers.0.mlp")
    assert state["calls"] == 2  # the float64 retry ran
    assert U.dtype == torch.float32
    assert torch.allclose(S, torch.linalg.svdvals(A.double()).float(), rtol=1e-5, atol=1e-5)
    assert relative_error(A, (U * S) @ Vh) < 1e-5
    _assert_orthonormal_columns(U, 1e-4)


@pytest.mark.parametrize("shape", [(70, 50), (50, 70)])
def test_gram_fallback_when_linalg_svd_always_raises(monkeypatch, shape):
    A = torch.randn(*shape, dtype=torch.float64)
    ref = torch.linalg.svdvals(A)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    U, S, Vh = full_svd(A)
    assert torch.allclose(S, ref, rtol=1e-8)
    assert relative_error(A, (U * S) @ Vh) < 1e-8
    _assert_orthonormal_columns(U, 1e-8)
    _assert_orthonormal_columns(Vh.T, 1e-8)
    # truncated_svd goes through the same fallbacks
    U2, S2, Vh2 = truncated_svd(A, 5, method="exact")
    assert torch.allclose(S2, ref[:5], rtol=1e-8)


@pytest.mark.parametrize("shape", [(70, 50), (50, 70), (40, 40)])
def test_gram_singular_values_match_svdvals(monkeypatch, shape):
    A = _low_rank_plus_noise(*shape, r=12, noise=1e-3)
    ref = torch.linalg.svdvals(A)
    S = singular_values(A, gram=True)
    assert S.dtype == torch.float64 and S.shape == ref.shape and bool((S[:-1] >= S[1:]).all())
    # the squares (tail energies) to ~1e-16 of the total energy
    assert torch.allclose(S.square(), ref.square(), rtol=0, atol=1e-13 * float(ref.square().sum()))
    S32 = singular_values(A.float(), gram=True)  # computed in float64, returned in float32
    assert S32.dtype == torch.float32
    assert torch.allclose(S32, torch.linalg.svdvals(A.float().double()).float(), rtol=1e-5, atol=1e-6 * float(ref[0]))
    with pytest.raises(SVDError, match="enc.dense"):
        singular_values(torch.full(shape, float("nan")), name="enc.dense", gram=True)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigvalsh", broken)  # falls back to svdvals
    assert torch.allclose(singular_values(A, gram=True), ref, rtol=1e-10)


def _record_shapes(monkeypatch, fn: str) -> list[tuple[int, ...]]:
    """Shapes of the matrices passed to ``torch.linalg.<fn>`` from now on (the call still runs)."""
    seen: list[tuple[int, ...]] = []
    original = getattr(torch.linalg, fn)

    def recording(M, *args, **kwargs):
        seen.append(tuple(M.shape))
        return original(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, fn, recording)
    return seen


@pytest.mark.parametrize("shape", [(40, 96), (96, 40)])
def test_singular_values_of_wide_and_tall_matrices_match_float64(monkeypatch, shape):
    # a wide matrix is passed to LAPACK transposed (its tall path is 2-3x faster): same values, same bound
    A = _low_rank_plus_noise(*shape, r=12, noise=1e-2, seed=3).float()
    ref = torch.linalg.svdvals(A.double())
    seen = _record_shapes(monkeypatch, "svdvals")
    S = singular_values(A)
    assert seen == [(96, 40)]
    assert S.dtype == torch.float32 and S.shape == (40,) and bool((S[:-1] >= S[1:]).all())
    assert torch.allclose(S.double(), ref, rtol=0, atol=1e-5 * float(ref[0]))
    assert torch.allclose(S, singular_values(A.T.contiguous()), rtol=0, atol=1e-6 * float(ref[0]))


@pytest.mark.parametrize("shape", [(40, 96), (96, 40)])
def test_full_svd_of_a_wide_matrix_decomposes_its_transpose(monkeypatch, shape):
    # LAPACK's thin SVD is faster on the tall orientation: a wide matrix goes in transposed, U and Vh swap back
    A = _low_rank_plus_noise(*shape, r=12, noise=1e-2, seed=5).float()
    seen = _record_shapes(monkeypatch, "svd")
    U, S, Vh = full_svd(A)
    assert seen == [(96, 40)]
    assert U.shape == (shape[0], 40) and S.shape == (40,) and Vh.shape == (40, shape[1])
    assert relative_error(A, (U * S) @ Vh) < 1e-5
    _assert_orthonormal_columns(U, 1e-4)
    _assert_orthonormal_columns(Vh.T, 1e-4)
    ref = torch.linalg.svdvals(A.double())
    assert torch.allclose(S.double(), ref, rtol=0, atol=1e-5 * float(ref[0]))
    down, up = split_factors(*truncated_svd(A, 12, method="exact"))
    err2 = float(torch.linalg.matrix_norm(A.double() - (up @ down).double()) ** 2)
    assert abs(err2 - float(tail_energy(ref)[12])) <= 1e-4 * float(tail_energy(ref)[12])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_svd_error_naming_module(bad):
    A = torch.randn(8, 6)
    A[2, 3] = bad
    with pytest.raises(SVDError, match="model.layers.3.self_attn.q_proj"):
        full_svd(A, name="model.layers.3.self_attn.q_proj")
    with pytest.raises(SVDError, match="enc.dense"):
        truncated_svd(A, 2, name="enc.dense")
    with pytest.raises(SVDError, match="enc.dense"):
        singular_values(A, name="enc.dense")


def test_bad_rank_and_shape_raise_value_error():
    A = torch.randn(10, 6)
    for r in (0, 7, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            truncated_svd(A, r)
    with pytest.raises(ValueError, match="method"):
        truncated_svd(A, 2, method="lanczos")
    with pytest.raises(ValueError, match="2-D"):
        full_svd(torch.randn(3, 4, 5))


def test_low_precision_inputs_decompose_in_float32():
    A = torch.randn(40, 30)
    for dtype in (torch.float16, torch.bfloat16):
        U, S, Vh = truncated_svd(A.to(dtype), 5, method="exact")
        assert U.dtype == S.dtype == Vh.dtype == torch.float32
        ref = torch.linalg.svdvals(A.to(dtype).float())[:5]
        assert torch.allclose(S, ref, rtol=1e-5)
    assert singular_values(A.half()).dtype == torch.float32


def test_rank_helpers():
    for out_f, in_f in [(64, 64), (128, 32), (3, 5), (1536, 384), (1, 1)]:
        r = break_even_rank(out_f, in_f)
        if r > 0:
            assert factorized_params(out_f, in_f, r) < out_f * in_f
        assert factorized_params(out_f, in_f, r + 1) >= out_f * in_f
        for keep in (0.05, 0.3, 0.9, 1.0):
            rk = rank_for_keep(out_f, in_f, keep)
            assert 1 <= rk <= min(out_f, in_f)
            if rk > 1 and rk < min(out_f, in_f):
                assert factorized_params(out_f, in_f, rk) <= keep * out_f * in_f
                assert factorized_params(out_f, in_f, rk + 1) > keep * out_f * in_f
    for keep in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep"):
            rank_for_keep(10, 10, keep)


def test_relative_error_reference():
    A, B = torch.randn(12, 9), torch.randn(12, 9)
    w = torch.rand(12) + 0.1
    ref = torch.linalg.matrix_norm(w[:, None] * (A - B)) / torch.linalg.matrix_norm(w[:, None] * A)
    assert abs(relative_error(A, B, w) - float(ref)) < 1e-6
    assert relative_error(torch.zeros(3, 3), torch.zeros(3, 3)) == 0.0
    assert relative_error(torch.zeros(3, 3), torch.ones(3, 3)) == float("inf")


def test_module_exports():
    for name in svd_mod.__all__:
        assert hasattr(svd_mod, name)
