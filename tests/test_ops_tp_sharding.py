"""Tensor-parallel sharding of factor pairs (hf_lowrank.ops.tp_sharding) against the unsharded product, and the
vLLM plugin's checkpoint-name rules and fused-layer grouping (plain Python: no vLLM needed)."""

from __future__ import annotations

import re

import pytest
import torch

from hf_lowrank.compression.checkpoint_checks import STOCK_GUARD_KEY
from hf_lowrank.integrations.vllm import (
    FusedGroup,
    checkpoint_name_rules,
    is_supported_version,
    plan_groups,
    register,
)
from hf_lowrank.ops.tp_sharding import column_spans, factor_params_per_rank, row_parallel_span, take_rows


def _pair(out: int, inp: int, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g, dtype=torch.float64), torch.randn(rank, inp, generator=g,
                                                                                  dtype=torch.float64)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_fused_column_parallel_matches_single_process(tp):
    """q/k/v with different ranks (k dense), 8 query heads and 2 key/value heads of width 16: every rank computes
    its rows; concatenated over ranks in the engine's per-rank layout, they equal the unsharded outputs."""
    heads, kv_heads, head, hidden = 8, 2, 16, 64
    full = [heads * head, kv_heads * head, kv_heads * head]
    # per-rank sizes as the engine computes them: key/value heads replicated when fewer than ranks
    kv_local = max(1, kv_heads // tp) * head
    local = [heads * head // tp, kv_local, kv_local]
    up_q, down_q = _pair(full[0], hidden, 12, 0)
    dense_k = torch.randn(full[1], hidden, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    up_v, down_v = _pair(full[2], hidden, 5, 2)
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference = [x @ (up_q @ down_q).T, x @ dense_k.T, x @ (up_v @ down_v).T]
    for shard, (ref, full_size, local_size) in enumerate(zip(reference, full, local)):
        got = []
        for rank in range(tp):
            span = column_spans([full_size], [local_size], rank, tp)
            if shard == 1:
                got.append(x @ take_rows(dense_k, span).T)
            else:
                up, down = (up_q, down_q) if shard == 0 else (up_v, down_v)
                got.append((x @ down.T) @ take_rows(up, span).T)  # down replicated, up split by rows
        replicas = local_size * tp // full_size
        merged = torch.cat(got[::replicas], dim=1)
        torch.testing.assert_close(merged, ref, rtol=1e-12, atol=1e-12)
        for rank in range(tp):  # replicas hold the same rows
            torch.testing.assert_close(got[rank], got[rank - rank % replicas], rtol=0, atol=0)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_checkpoint_module_spans(tp):
    """A checkpoint that stores q|k|v as one module (Phi-3): the spans of one rank pick its rows of each part."""
    full, hidden = [64, 32, 32], 48
    local = [64 // tp, 32 // tp, 32 // tp]
    up, down = _pair(sum(full), hidden, 7, 4)
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reference = x @ (up @ down).T
    parts = [[], [], []]
    for rank in range(tp):
        spans = column_spans(full, local, rank, tp)
        out = (x @ down.T) @ take_rows(up, spans).T
        for i, piece in enumerate(out.split(local, dim=1)):
            parts[i].append(piece)
    torch.testing.assert_close(torch.cat([torch.cat(p, dim=1) for p in parts], dim=1), reference, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_partial_sums_add_up(tp):
    """Row-parallel: down split by input columns, up replicated; the all-reduce (a sum) gives the unsharded output."""
    out, hidden, rank = 40, 64, 9
    up, down = _pair(out, hidden, rank, 6)
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    total = torch.zeros(4, out, dtype=torch.float64)
    for p in range(tp):
        span = row_parallel_span(hidden, p, tp)
        total += (x[:, span.source : span.source + span.size] @ take_rows(down, [span], dim=1).T) @ up.T
    torch.testing.assert_close(total, x @ (up @ down).T, rtol=1e-12, atol=1e-12)


def test_spans_refuse_sizes_no_split_produces():
    with pytest.raises(ValueError, match="cannot have"):
        column_spans([64], [24], 0, 2)
    with pytest.raises(ValueError, match="outside"):
        column_spans([64], [32], 2, 2)
    with pytest.raises(ValueError, match="do not split"):
        row_parallel_span(63, 0, 2)


def test_replicated_factor_cost_grows_with_tp():
    """At keep ratio ~0.5 a column-parallel pair costs less than the dense shard at tp 1 and more at tp 8."""
    one = factor_params_per_rank(4096, 4096, 1024, 1, "column")
    eight = factor_params_per_rank(4096, 4096, 1024, 8, "column")
    assert one["ratio"] == pytest.approx(0.5)
    assert eight["ratio"] == pytest.approx((1024 * 4096 + 1024 * 512) / (4096 * 512))
    assert eight["ratio"] > 1


def _mapped(rules, name):
    """Apply the rules as vLLM's WeightsMapper does (regex entries in order; None drops the tensor)."""
    for pattern, new in rules.items():
        if pattern.search(name):
            if new is None:
                return None
            name = pattern.sub(new, name)
    return name


def test_checkpoint_name_rules_rename_drop_and_are_idempotent():
    rules = checkpoint_name_rules(["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"])
    q = "model.layers.0.self_attn.q_proj"
    cases = {
        f"{q}.down.weight": f"{q}.hf_lowrank_down",
        f"{q}.up.weight": f"{q}.hf_lowrank_up",
        f"{q}.up.bias": f"{q}.bias",
        f"{q}.weight": None,  # the one-element stock-transformers guard
        STOCK_GUARD_KEY: None,
        "model.layers.0.self_attn.k_proj.weight": "model.layers.0.self_attn.k_proj.weight",  # dense: untouched
        "model.layers.0.self_attn.k_proj.bias": "model.layers.0.self_attn.k_proj.bias",
        "model.layers.1.mlp.down_proj.up.weight": "model.layers.1.mlp.down_proj.hf_lowrank_up",
        # the base model's loader sees the names without "model."
        "layers.1.mlp.down_proj.down.weight": "layers.1.mlp.down_proj.hf_lowrank_down",
        # a module whose name merely ends like a factorized one is not touched
        "model.layers.10.self_attn.q_proj.down.weight": "model.layers.10.self_attn.q_proj.down.weight",
    }
    for name, expected in cases.items():
        once = _mapped(rules, name)
        assert once == expected, name
        if once is not None:
            assert _mapped(rules, once) == once  # vLLM applies the mapper at two levels
    assert all(isinstance(p, re.Pattern) for p in rules)


def test_plan_groups_split_fused_and_dense():
    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.v_proj": 4}
    mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    groups = plan_groups("model.layers.0.self_attn.qkv_proj", 3, mapping, ranks)
    assert groups == [
        FusedGroup("model.layers.0.self_attn.q_proj", (0,), 8),
        FusedGroup("model.layers.0.self_attn.k_proj", (1,), None),
        FusedGroup("model.layers.0.self_attn.v_proj", (2,), 4),
    ]
    # Phi-3: the fused module is one checkpoint module
    fused = plan_groups("model.layers.0.self_attn.qkv_proj", 3, {"qkv_proj": ["qkv_proj"]},
                        {"model.layers.0.self_attn.qkv_proj": 6})
    assert fused == [FusedGroup("model.layers.0.self_attn.qkv_proj", (0, 1, 2), 6)]
    # a rank map recorded without the task model's prefix
    assert plan_groups("model.layers.0.self_attn.o_proj", 1, mapping, {"layers.0.self_attn.o_proj": 3})[0].rank == 3
    with pytest.raises(ValueError, match="not supported"):
        plan_groups("model.layers.0.self_attn.qkv_proj", 2, mapping, ranks)


def test_version_range():
    assert is_supported_version("0.32.0") and is_supported_version("0.32.1.dev3+gabc")
    assert not is_supported_version("0.31.9") and not is_supported_version("0.33.0")
    assert not is_supported_version("garbage")


def test_register_never_raises_without_or_with_old_vllm(monkeypatch, caplog):
    """register() runs in every vLLM process: an old vLLM, or none importable, is logged and skipped."""
    import hf_lowrank.integrations.vllm as plugin

    monkeypatch.setattr(plugin, "vllm_version", lambda: "0.6.3")
    assert register() is False
    assert "outside the supported range" in caplog.text

    def broken():
        raise ImportError("no vllm here")

    monkeypatch.setattr(plugin, "vllm_version", broken)
    assert register() is False
