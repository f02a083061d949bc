"""hf_lowrank.ops.gram: in-place Gram accumulation against a float64 reference, the blocked symmetric path, and the
non-finite guard that leaves an accumulator untouched."""

import pytest
import torch

from hf_lowrank.ops import gram as gram_ops
from hf_lowrank.ops.gram import contribution_is_finite, gram, gram_accumulate_


def _ref(*chunks):
    return sum(c.double().T @ c.double() for c in chunks)


@pytest.mark.parametrize("shape", [(7, 5), (300, 64), (1100, 1030)])
def test_gram_and_accumulate_match_float64(shape):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g) * 3
    acc = gram(a)
    assert gram_accumulate_(acc, b)
    ref = _ref(a, b)
    err = (acc.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5
    torch.testing.assert_close(acc, acc.T, rtol=1e-6, atol=1e-4)


def test_blocked_path_is_taken_and_agrees_with_one_gemm(monkeypatch):
    rows = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    plain = rows.T @ rows
    monkeypatch.setattr(gram_ops, "BLOCKED_MIN_DIM", 8)
    monkeypatch.setattr(gram_ops, "BLOCKED_MIN_ROWS", 8)
    blocked = gram(rows)
    e = gram_ops._edges(24)
    assert torch.equal(blocked[e[2]:, : e[1]], blocked[: e[1], e[2]:].T)  # a mirrored block
    torch.testing.assert_close(blocked, plain, rtol=1e-5, atol=1e-5)
    acc = blocked.clone()
    assert gram_accumulate_(acc, rows)
    torch.testing.assert_close(acc, 2 * plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e19])
def test_non_finite_contribution_leaves_the_accumulator_untouched(bad):
    rows = torch.randn(16, 8)
    acc = gram(rows)
    before = acc.clone()
    poisoned = rows.clone()
    poisoned[3, 2] = bad  # 3e19 is finite but its square overflows float32
    assert not contribution_is_finite(poisoned)
    assert not gram_accumulate_(acc, poisoned)
    assert torch.equal(acc, before)


def test_shape_and_device_mismatch_is_refused():
    with pytest.raises(ValueError, match="same device"):
        gram_accumulate_(torch.zeros(4, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="tokens, features"):
        gram(torch.randn(2, 3, 4))
