"""Numerics of hf_lowrank.ops.importance against direct references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_lowrank.ops.importance import (
    QUANTILE_LEVELS,
    l2_importance,
    quantile_mean,
    quantile_mean_taylor_importance,
    row_dot_from_activations,
    rows_for_ratio,
    taylor_importance,
    top_rows,
)


def test_l2_importance_matches_row_norms():
    W = torch.randn(7, 5, dtype=torch.float64)
    expected = torch.tensor([float(np.linalg.norm(row)) for row in W.numpy()], dtype=torch.float64)
    torch.testing.assert_close(l2_importance(W).double(), expected, rtol=1e-6, atol=0)


def test_taylor_importance_is_abs_rowwise_dot():
    W, G = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    expected = torch.tensor(
        [abs(sum(W[i, j].item() * G[i, j].item() for j in range(4))) for i in range(6)], dtype=torch.float64
    )
    torch.testing.assert_close(taylor_importance(W, G).double(), expected, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        taylor_importance(W, G[:, :3])


def test_quantile_mean_matches_numpy_linear_quantiles():
    eta = torch.rand(13, 9, dtype=torch.float64)
    expected = np.mean([np.quantile(eta.numpy(), q, axis=0) for q in QUANTILE_LEVELS], axis=0)
    torch.testing.assert_close(quantile_mean(eta).double(), torch.from_numpy(expected), rtol=1e-6, atol=1e-9)
    # one class: every quantile is that class's value
    torch.testing.assert_close(quantile_mean(eta[:1]), eta[0].float())


def test_quantile_mean_lies_between_mean_and_max_spread():
    # eq. 7 sits between the class-agnostic mean and the max: check on a skewed example
    eta = torch.tensor([[0.0], [0.0], [0.0], [10.0]])
    qm = quantile_mean(eta).item()
    assert 0.0 < qm < 10.0


def test_quantile_mean_taylor_accepts_stack_or_list():
    W = torch.randn(5, 3, dtype=torch.float64)
    grads = torch.randn(4, 5, 3, dtype=torch.float64)
    eta = torch.stack([(W * g).sum(1).abs() for g in grads])
    expected = np.mean([np.quantile(eta.numpy(), q, axis=0) for q in QUANTILE_LEVELS], axis=0)
    a = quantile_mean_taylor_importance(W, grads)
    b = quantile_mean_taylor_importance(W, list(grads))
    torch.testing.assert_close(a.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="at least one class"):
        quantile_mean_taylor_importance(W, [])


def test_row_dot_from_activations_equals_weight_gradient_dot():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    y = lin(x)
    loss = (y.sin() * torch.randn_like(y)).sum()
    grad_y, G = torch.autograd.grad(loss, [y, lin.weight])
    z = (y - lin.bias).detach()
    expected = (lin.weight.detach() * G).sum(dim=1)
    torch.testing.assert_close(row_dot_from_activations(grad_y, z), expected, rtol=1e-10, atol=1e-12)
    per_ex = row_dot_from_activations(grad_y, z, per_example=True)
    assert per_ex.shape == (3, 4)
    torch.testing.assert_close(per_ex.sum(0), expected, rtol=1e-10, atol=1e-12)


def test_top_rows_sorted_deterministic_and_validated():
    scores = torch.tensor([0.1, 5.0, 3.0, 5.0, -1.0, 3.0])
    idx = top_rows(scores, 3)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [1, 2, 3]  # ties broken towards the lower index
    assert top_rows(scores, 6).tolist() == list(range(6))
    with pytest.raises(ValueError, match="r=7"):
        top_rows(scores, 7)
    with pytest.raises(ValueError, match="r=0"):
        top_rows(scores, 0)
    with pytest.raises(ValueError, match="NaN"):
        top_rows(torch.tensor([1.0, float("nan")]), 1)


def test_rows_for_ratio():
    assert rows_for_ratio(100, 0.05) == 5
    assert rows_for_ratio(10, 0.01) == 1
    assert rows_for_ratio(64, 1.0) == 64
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            rows_for_ratio(64, bad)
