"""Round-to-nearest quantization, bit packing, safetensors round trip and Stiefel projection."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_lowrank.ops.quant import (
    QuantizedTensor,
    dequantize_rtn,
    pack_bits,
    quantize_rtn,
    stiefel_project,
    unpack_bits,
)


def _step_per_element(q: QuantizedTensor) -> torch.Tensor:
    n = q.shape[-1]
    return q.scales.double().repeat_interleave(q.group_size, dim=-1)[..., :n]


def _assert_half_step(x: torch.Tensor, q: QuantizedTensor) -> None:
    y = dequantize_rtn(q, dtype=torch.float64)
    err = (x.double() - y).abs()
    step = _step_per_element(q)
    # half a stored step, plus float32 arithmetic of the dequantizer
    slack = 4 * torch.finfo(torch.float32).eps * (x.double().abs() + step * ((1 << q.bits) - 1))
    assert bool((err <= step / 2 + slack).all()), float((err / (step / 2)).max())


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1001])
def test_pack_unpack_round_trip(bits, numel):
    codes = torch.randint(0, 1 << bits, (numel,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, numel), codes)


def test_pack_layout_is_little_endian_bit_stream():
    codes = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    # 4 bits: low nibble first
    assert pack_bits(codes, 4).tolist() == [0x21, 0x43, 0x05]
    # 3 bits: the codes 1..5 LSB first form the stream 100 010 110 001 101 (+ one zero pad bit)
    assert pack_bits(codes, 3).tolist() == [0b11010001, 0b01011000]
    reference = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert int.from_bytes(bytes(pack_bits(codes, 3).tolist()), "little") == reference
    for bits in (5, 6, 7):
        c = torch.randint(0, 1 << bits, (13,), dtype=torch.uint8)
        ref = sum(int(v) << (bits * i) for i, v in enumerate(c))
        assert int.from_bytes(bytes(pack_bits(c, bits).tolist()), "little") == ref
    assert pack_bits(torch.tensor([3, 0, 1, 2], dtype=torch.uint8), 2).tolist() == [0b10010011]


def test_pack_validation():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="< 2\\*\\*bits"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.tensor([1, 2]), 4)
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 8)


# ---------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_round_trip_error_at_most_half_step(bits):
    g = torch.Generator().manual_seed(bits)
    for shape, gs in (((37, 150), 64), ((4, 3, 64), 32), ((200,), 64), ((16, 10), 128)):
        x = torch.randn(*shape, generator=g) * 3 + 0.5
        q = quantize_rtn(x, bits, group_size=gs)
        assert q.shape == shape and q.bits == bits and q.group_size == gs
        n_groups = -(-shape[-1] // gs)
        assert q.scales.shape == (*shape[:-1], n_groups) and q.scales.dtype == torch.float16
        assert q.packed.numel() == -(-x.numel() * bits // 8)
        _assert_half_step(x, q)
        # the steps are the group ranges over 2**bits - 1 levels (fp16 rounded up)
        xs = x.reshape(-1, shape[-1])
        first = xs[:, :gs]
        span = (first.amax(1) - first.amin(1)) / ((1 << bits) - 1)
        assert torch.allclose(q.scales.reshape(-1, n_groups)[:, 0].float(), span, rtol=2e-3)
        # dequantization is offset + code * scale with the packed codes, element by element
        codes = unpack_bits(q.packed, bits, x.numel()).reshape(shape).double()
        offs = q.offsets.double().repeat_interleave(gs, dim=-1)[..., : shape[-1]]
        assert torch.allclose(dequantize_rtn(q, torch.float64), offs + codes * _step_per_element(q))
        assert int(codes.max()) <= (1 << bits) - 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_quantize_any_float_dtype(dtype):
    x = torch.randn(8, 70).to(dtype)
    q = quantize_rtn(x, 4, group_size=16)
    _assert_half_step(x, q)
    assert dequantize_rtn(q, dtype=dtype).dtype == dtype


def test_quantization_error_shrinks_with_bits():
    x = torch.randn(64, 256)
    errs = [float((dequantize_rtn(quantize_rtn(x, b)) - x).pow(2).mean().sqrt()) for b in range(2, 9)]
    assert all(errs[i + 1] < 0.6 * errs[i] for i in range(len(errs) - 1))


def test_quantize_edge_cases():
    const = torch.full((3, 10), 2.5)
    assert torch.equal(dequantize_rtn(quantize_rtn(const, 3)), const)
    huge = torch.randn(4, 64) * 1e6  # beyond fp16: scales fall back to float32
    q = quantize_rtn(huge, 8)
    assert q.scales.dtype == torch.float32
    _assert_half_step(huge, q)
    tiny = torch.randn(4, 64) * 1e-9  # fp16 subnormal steps still cover the range
    _assert_half_step(tiny, quantize_rtn(tiny, 4))
    q32 = quantize_rtn(torch.randn(5, 9), 4, scale_dtype=torch.float32)
    assert q32.scales.dtype == torch.float32
    for shape in ((5, 0), (0, 8)):
        qe = quantize_rtn(torch.zeros(shape), 4)
        assert dequantize_rtn(qe).shape == shape


def test_quantize_validation():
    x = torch.randn(4, 8)
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            quantize_rtn(x, bits)
    for gs in (0, -4):
        with pytest.raises(ValueError, match="group_size"):
            quantize_rtn(x, 4, group_size=gs)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_rtn(bad, 4)
    with pytest.raises(ValueError, match="floating"):
        quantize_rtn(torch.ones(4, dtype=torch.int32), 4)


def test_storage_size():
    x = torch.randn(512, 128)
    q = quantize_rtn(x, 4, group_size=64)
    assert q.nbytes() == 512 * 128 // 2 + 2 * (512 * 2) * 2  # 4-bit codes + fp16 scale and offset per group
    assert q.nbytes() / (x.numel() * 2) < 0.29  # vs fp16


def test_safetensors_round_trip(tmp_path):
    x = torch.randn(33, 70)
    u = torch.randn(20, 5)
    qx, qu = quantize_rtn(x, 3, group_size=32), quantize_rtn(u, 4)
    tensors = {**qx.to_dict("x."), **qu.to_dict("u.")}
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    path = tmp_path / "q.safetensors"
    save_file(tensors, str(path))
    loaded = load_file(str(path))
    rx, ru = QuantizedTensor.from_dict(loaded, "x."), QuantizedTensor.from_dict(loaded, "u.")
    assert rx.shape == (33, 70) and rx.bits == 3 and rx.group_size == 32
    assert torch.equal(dequantize_rtn(rx), dequantize_rtn(qx))
    assert torch.equal(dequantize_rtn(ru), dequantize_rtn(qu))
    with pytest.raises(ValueError, match="prefix"):
        QuantizedTensor.from_dict(loaded, "v.")
    broken = dict(loaded)
    broken["x.qmeta"] = torch.tensor([99, 3, 32, 2, 33, 70])
    with pytest.raises(ValueError, match="version"):
        QuantizedTensor.from_dict(broken, "x.")
    broken["x.qmeta"] = torch.tensor([1, 3, 32, 2, 33, 71])
    with pytest.raises(ValueError, match="do not match"):
        QuantizedTensor.from_dict(broken, "x.")


# ---------------------------------------------------------------- Stiefel projection


def _polar_reference(X: torch.Tensor) -> torch.Tensor:
    """X (X^T X)^{-1/2} through an eigendecomposition, float64."""
    X = X.double()
    evals, V = torch.linalg.eigh(X.T @ X)
    return X @ (V * evals.rsqrt()) @ V.T


def test_stiefel_projection_is_orthonormal_and_the_polar_factor():
    g = torch.Generator().manual_seed(0)
    for m, k in ((50, 8), (64, 64), (300, 40)):
        X = torch.randn(m, k, generator=g)
        P = stiefel_project(X)
        assert P.shape == (m, k) and P.dtype == torch.float32
        assert float(torch.linalg.matrix_norm(P.T @ P - torch.eye(k))) < 1e-5
        assert torch.allclose(P.double(), _polar_reference(X), atol=1e-4)
    Q = torch.linalg.qr(torch.randn(40, 6, dtype=torch.float64)).Q
    assert torch.allclose(stiefel_project(Q), Q, atol=1e-12)  # already orthonormal: unchanged
    assert stiefel_project(torch.zeros(7, 0)).shape == (7, 0)
    with pytest.raises(ValueError, match="transpose"):
        stiefel_project(torch.randn(3, 5))


def test_stiefel_projection_is_nearest_and_repairs_quantized_factors():
    g = torch.Generator().manual_seed(1)
    Q0 = torch.linalg.qr(torch.randn(128, 16, generator=g)).Q
    for bits in (2, 3, 4):
        X = dequantize_rtn(quantize_rtn(Q0, bits, group_size=16))  # quantization breaks orthonormality
        P = stiefel_project(X)
        assert float(torch.linalg.matrix_norm(P.T @ P - torch.eye(16))) < 1e-5
        # closer to the original orthonormal matrix than the dequantized one
        assert float(torch.linalg.matrix_norm(P - Q0)) < float(torch.linalg.matrix_norm(X - Q0))
        # nearest orthonormal matrix to X: no other orthonormal matrix (Q0, random rotations of P) is closer
        d = float(torch.linalg.matrix_norm(X - P))
        assert d <= float(torch.linalg.matrix_norm(X - Q0)) + 1e-6
        for _ in range(5):
            R = torch.linalg.matrix_exp(1e-2 * (lambda A: A - A.T)(torch.randn(16, 16, generator=g)))
            assert d <= float(torch.linalg.matrix_norm(X - P @ R)) + 1e-6
