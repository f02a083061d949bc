"""Numerics of hf_lowrank.ops.fisher: Fisher weights, FWSVD, LoRA Fisher mapping."""

from __future__ import annotations

import pytest
import torch

from hf_lowrank.ops.fisher import fisher_weights, fwsvd, lora_fisher_to_weights, weighted_relative_error
from hf_lowrank.ops.svd import split_factors, tail_energy, truncated_svd


def _low_rank_plus_noise(m: int, n: int, r: int, g: torch.Generator) -> torch.Tensor:
    A = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    return A + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64)


def _random_fisher(n: int, g: torch.Generator) -> torch.Tensor:
    # heavy-tailed, like squared-gradient sums
    return torch.exp(2.0 * torch.randn(n, generator=g, dtype=torch.float64))


# ---------------------------------------------------------------- fisher_weights


def test_fisher_weights_formula_and_scale_invariance():
    f = torch.tensor([0.0, 1.0, 3.0, 8.0])
    w = fisher_weights(f, exponent=0.5, eps=1e-6)
    ref = (f.double() / f.double().mean() + 1e-6).sqrt().float()
    assert torch.allclose(w, ref, rtol=1e-6)
    assert torch.allclose(fisher_weights(1e9 * f), w, rtol=1e-6)
    assert torch.allclose(fisher_weights(f, exponent=1.0), ref.double().square().float(), rtol=1e-6)
    assert torch.equal(fisher_weights(f, exponent=0.0), torch.ones(4))
    assert w.dtype == torch.float32 and fisher_weights(f.double()).dtype == torch.float64
    assert bool((w > 0).all())


def test_fisher_weights_degenerate_inputs():
    assert torch.equal(fisher_weights(torch.zeros(5)), torch.ones(5))
    assert torch.equal(fisher_weights(torch.full((3, 2), float("nan"))), torch.ones(3, 2))
    f = torch.tensor([1.0, float("inf"), float("nan"), 2.0, -float("inf")])
    w = fisher_weights(f)
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all())
    # non-finite entries count as zero Fisher
    assert torch.allclose(w, fisher_weights(torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0])))


def test_fisher_weights_rejects_bad_input():
    with pytest.raises(ValueError, match="grad\\*\\*2"):
        fisher_weights(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="exponent"):
        fisher_weights(torch.ones(3), exponent=-1.0)
    with pytest.raises(ValueError, match="eps"):
        fisher_weights(torch.ones(3), eps=0.0)


# ---------------------------------------------------------------- fwsvd


def test_fwsvd_without_fisher_is_plain_svd():
    W = torch.randn(40, 30)
    down, up = fwsvd(W, 6, method="exact")
    ref_down, ref_up = split_factors(*truncated_svd(W, 6, method="exact"))
    assert torch.equal(down, ref_down) and torch.equal(up, ref_up)


@pytest.mark.parametrize("sides", ["row", "col", "two_sided"])
def test_fwsvd_uniform_fisher_equals_plain_svd(sides):
    W = torch.randn(48, 36)
    norm = torch.linalg.matrix_norm
    ref_down, ref_up = split_factors(*truncated_svd(W, 8, method="exact"))
    row = torch.full((48,), 3.7) if sides in ("row", "two_sided") else None
    col = torch.full((36,), 0.2) if sides in ("col", "two_sided") else None
    down, up = fwsvd(W, 8, row_fisher=row, col_fisher=col, method="exact")
    assert down.shape == (8, 36) and up.shape == (48, 8)
    assert float(norm(up @ down - ref_up @ ref_down) / norm(ref_up @ ref_down)) < 1e-5


@pytest.mark.parametrize("sides", ["row", "col", "two_sided"])
def test_fwsvd_weighted_error_never_above_plain_and_is_optimal(sides):
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        m, n = int(torch.randint(20, 50, (1,), generator=g)), int(torch.randint(20, 50, (1,), generator=g))
        W = _low_rank_plus_noise(m, n, 6, g)
        row = _random_fisher(m, g) if sides in ("row", "two_sided") else None
        col = _random_fisher(n, g) if sides in ("col", "two_sided") else None
        d_row = fisher_weights(row) if row is not None else None
        d_col = fisher_weights(col) if col is not None else None
        for rank in (1, 4, 10):
            down, up = fwsvd(W, rank, row_fisher=row, col_fisher=col, method="exact")
            assert down.dtype == torch.float64
            pd, pu = split_factors(*truncated_svd(W, rank, method="exact"))
            err_f = weighted_relative_error(W, up @ down, d_row, d_col)
            err_p = weighted_relative_error(W, pu @ pd, d_row, d_col)
            assert err_f <= err_p + 1e-12
            # exact optimum: the weighted error equals the Eckart-Young tail of the weighted matrix
            DW = W * (d_row[:, None] if d_row is not None else 1.0) * (d_col[None, :] if d_col is not None else 1.0)
            tail = tail_energy(torch.linalg.svdvals(DW))
            opt = float((tail[rank] / tail[0]).sqrt())
            assert abs(err_f - opt) <= 1e-8 + 1e-6 * opt


def test_fwsvd_row_weighting_protects_important_rows():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(60, 40, generator=g)
    row = torch.ones(60)
    row[:10] = 1e4  # ten rows dominate the Fisher
    down, up = fwsvd(W, 10, row_fisher=row, method="exact")
    pd, pu = split_factors(*truncated_svd(W, 10, method="exact"))
    err_rows_f = torch.linalg.matrix_norm(W[:10] - (up @ down)[:10])
    err_rows_p = torch.linalg.matrix_norm(W[:10] - (pu @ pd)[:10])
    assert err_rows_f < 0.1 * err_rows_p


@pytest.mark.parametrize("bad", [0.0, float("inf"), float("nan")])
def test_fwsvd_degenerate_fisher_gives_finite_factors(bad):
    W = torch.randn(30, 20)
    row = torch.rand(30)
    row[::3] = bad
    col = torch.rand(20)
    col[1] = bad
    for kwargs in ({"row_fisher": row}, {"col_fisher": col}, {"row_fisher": row, "col_fisher": col}):
        down, up = fwsvd(W, 5, method="exact", **kwargs)
        assert bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())
        assert weighted_relative_error(W, up @ down) < 1.0
    down, up = fwsvd(W, 5, row_fisher=torch.zeros(30), col_fisher=torch.full((20,), float("nan")), method="exact")
    pd, pu = split_factors(*truncated_svd(W, 5, method="exact"))
    assert torch.allclose(up @ down, pu @ pd, atol=1e-5)  # all-zero Fisher means no weighting


def test_fwsvd_dtypes_and_validation():
    W = torch.randn(16, 12)
    for dtype, expect in (
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ):
        down, up = fwsvd(W.to(dtype), 3, row_fisher=torch.rand(16))
        assert down.dtype == up.dtype == expect
    with pytest.raises(ValueError, match="sum\\(dim=1\\)"):
        fwsvd(W, 3, row_fisher=torch.rand(12), name="mlp.up_proj")
    with pytest.raises(ValueError, match="length 12"):
        fwsvd(W, 3, col_fisher=torch.rand(16, 12))
    with pytest.raises(ValueError, match="rank"):
        fwsvd(W, 0, row_fisher=torch.rand(16))
    with pytest.raises(ValueError, match="2-D"):
        fwsvd(torch.randn(4), 1)


# ---------------------------------------------------------------- LoRA Fisher mapping


def test_lora_fisher_to_weights_matches_einsum_references():
    g = torch.Generator().manual_seed(0)
    r, out_f, in_f = 4, 24, 18
    FA = torch.rand(r, in_f, generator=g)
    FB = torch.rand(out_f, r, generator=g)
    row, col = lora_fisher_to_weights(FA, FB, mode="row")
    assert col is None and row.shape == (out_f,)
    ref_row = torch.einsum("oj,ji->oi", FB.double(), FA.double()).sum(1)  # row sums of F_W ~= F_B @ F_A
    assert torch.allclose(row, ref_row, rtol=1e-12)
    row2, col2 = lora_fisher_to_weights(FA, FB, mode="two_sided")
    assert row2.shape == (out_f,) and col2.shape == (in_f,)
    assert torch.allclose(row2, torch.einsum("oj->o", FB.double()), rtol=1e-12)
    assert torch.allclose(col2, torch.einsum("ji->i", FA.double()), rtol=1e-12)


def test_lora_fisher_derivation_from_autograd():
    """F_B rows and F_A columns measure G's rows / columns projected on A's rows / B's columns (the docstring)."""
    g = torch.Generator().manual_seed(2)
    r, out_f, in_f, s = 3, 10, 7, 2.0
    A = torch.randn(r, in_f, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(out_f, r, generator=g, dtype=torch.float64, requires_grad=True)
    FA, FB = torch.zeros(r, in_f, dtype=torch.float64), torch.zeros(out_f, r, dtype=torch.float64)
    Gs = [torch.randn(out_f, in_f, generator=g, dtype=torch.float64) for _ in range(3)]
    for G in Gs:  # loss whose gradient w.r.t. W = W0 + s B A is G
        A.grad = B.grad = None
        (G * (s * B @ A)).sum().backward()
        FA += A.grad**2
        FB += B.grad**2
    with torch.no_grad():
        ref_FB = sum((s * G @ A.T) ** 2 for G in Gs)
        ref_FA = sum((s * B.T @ G) ** 2 for G in Gs)
    assert torch.allclose(FB, ref_FB) and torch.allclose(FA, ref_FA)
    row, col = lora_fisher_to_weights(FA, FB, mode="two_sided")
    assert torch.allclose(row, ref_FB.sum(1)) and torch.allclose(col, ref_FA.sum(0))


def test_lora_fisher_to_weights_validation():
    with pytest.raises(ValueError, match="mode"):
        lora_fisher_to_weights(torch.rand(2, 5), torch.rand(6, 2), mode="columns")
    with pytest.raises(ValueError, match="ranks must match"):
        lora_fisher_to_weights(torch.rand(3, 5), torch.rand(6, 2))
    with pytest.raises(ValueError, match="2-D"):
        lora_fisher_to_weights(torch.rand(5), torch.rand(6, 2))


def test_lora_fisher_feeds_fwsvd_end_to_end():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(24, 18, generator=g)
    FA, FB = torch.rand(4, 18, generator=g), torch.rand(24, 4, generator=g)
    FB[3] = 0.0  # a dead output row must not break anything
    for mode in ("row", "two_sided"):
        row, col = lora_fisher_to_weights(FA, FB, mode=mode)
        down, up = fwsvd(W, 5, row_fisher=row, col_fisher=col)
        assert down.shape == (5, 18) and up.shape == (24, 5)
        assert bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())


def test_weighted_relative_error_reference():
    W, Wh = torch.randn(9, 7), torch.randn(9, 7)
    rw, cw = torch.rand(9) + 0.1, torch.rand(7) + 0.1
    D = rw[:, None] * cw[None, :]
    ref = torch.linalg.matrix_norm(D * (W - Wh)) / torch.linalg.matrix_norm(D * W)
    assert abs(weighted_relative_error(W, Wh, rw, cw) - float(ref)) < 1e-6
    ref_plain = torch.linalg.matrix_norm(W - Wh) / torch.linalg.matrix_norm(W)
    assert abs(weighted_relative_error(W, Wh) - float(ref_plain)) < 1e-6
    with pytest.raises(ValueError, match="same shape"):
        weighted_relative_error(W, Wh.T)
