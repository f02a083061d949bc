"""transformers tensor parallelism of factorized checkpoints: ``from_pretrained(folder, tp_plan="auto")``.

The multi-process test compresses a tiny Llama, Qwen2 (q/k/v biases) and Phi3 (fused ``qkv_proj`` /
``gate_up_proj``, styles ``colwise_gather_output`` / ``rowwise_split_input``) with a different rank per module, odd
ranks (never divisible by the 2 processes) and some modules left dense in the same wildcard position as factorized
ones, saves them, and loads each under ``torchrun --nproc_per_node 2`` (gloo, CPU) with ``tp_plan="auto"``: the
logits must equal the single-process logits within 1e-5, the greedy tokens (KV cache on) must be the same, and the
factors must be split as :mod:`hf_lowrank.compression.parallel` says; the checkpoint the sharded model saves must load
in one process to the same logits. The unit tests check the plan rewriting alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import _env
from tiny_models import make_tiny_model

import hf_lowrank
from hf_lowrank.compression.checkpoint_checks import CompressedCheckpointError
from hf_lowrank.compression.parallel import FACTOR_STYLES, factor_parallel_plan
from hf_lowrank.modules import LowRankLinear

WORKER = Path(__file__).with_name("tp_worker.py")
KINDS = ("llama", "qwen2", "phi3")


def _ranks(model) -> dict[str, int]:
    """Per-module ranks: odd, different from module to module, every fourth Linear (and so, in each position,
    dense in one layer and factorized in the other) left dense; the Llama's ``lm_head`` factorized too."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    ranks = {name: 3 + 2 * ((3 * i) % 9) for i, name in enumerate(names) if i % 4 != 3}
    if type(model).__name__ == "LlamaForCausalLM":
        ranks["lm_head"] = 13
    return ranks


def _save(kind: str, root: Path) -> tuple[Path, dict[str, int]]:
    model = make_tiny_model(kind, seed=1)
    ranks = _ranks(model)
    hf_lowrank.compress_model(model, ranks, progress=False)
    folder = root / kind
    hf_lowrank.save_compressed(model, folder)
    return folder, ranks


@pytest.mark.multiprocess
def test_tp_plan_auto_matches_single_process(tmp_path):
    """2 gloo processes with ``tp_plan="auto"`` give the single-process logits (1e-5) and greedy tokens."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    sys.path.insert(0, str(WORKER.parent))
    import tp_worker

    saved = {kind: _save(kind, tmp_path) for kind in KINDS}
    out = tmp_path / "tp2"
    with open(tmp_path / "tp2.log", "w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
             "--out", str(out), *(str(folder) for folder, _ in saved.values())],
            stdout=log, stderr=subprocess.STDOUT, env=_env(), timeout=600,
        )
    if code != 0:
        pytest.fail(f"the 2-process run exited with {code}:\n{(tmp_path / 'tp2.log').read_text()[-4000:]}")
    for kind, (folder, ranks) in saved.items():
        single, layout1, _ = tp_worker.run(folder)
        tp2 = torch.load(out / f"{kind}.pt")
        assert set(layout1) == set(ranks), kind  # every recorded module was factorized (and reloaded)
        err = (tp2["logits"] - single["logits"]).abs().max().item()
        assert err <= 1e-5, f"{kind}: tensor-parallel logits differ from single-process ones by {err}"
        assert torch.equal(tp2["tokens"], single["tokens"]), kind
        resaved = hf_lowrank.load_compressed(out / f"{kind}.resaved", dtype=torch.float32).eval()
        with torch.no_grad():
            err = (resaved(tp_worker.INPUT_IDS, use_cache=False).logits - single["logits"]).abs().max().item()
        assert err <= 1e-6, f"{kind}: the checkpoint saved from the sharded model gives logits {err} away"
        for rank_id in (0, 1):
            layout = json.loads((out / f"{kind}.rank{rank_id}.json").read_text())
            assert set(layout) == set(layout1)
            for name, entry in layout.items():
                assert not entry["hooked"], f"{kind} {name}: the LowRankLinear kept its dense tensor-parallel hook"
                full = layout1[name]
                r = ranks[name]
                split_up, split_down = entry["up.weight"]["sharded"], entry["down.weight"]["sharded"]
                assert split_up != split_down, f"{kind} {name}: exactly one factor is split ({entry})"
                if split_up:  # output-split layer: rows of up (and its bias) split, down whole
                    local_out = full["up.weight"]["local_shape"][0] // 2  # every width here is even
                    assert entry["up.weight"]["local_shape"] == [local_out, r]
                    assert entry["down.weight"]["local_shape"] == full["down.weight"]["local_shape"]
                    if "up.bias" in entry:
                        assert entry["up.bias"]["local_shape"] == [local_out]
                else:  # input-split layer: columns of down split, up (and its bias) whole
                    in_features = full["down.weight"]["local_shape"][1]
                    assert entry["down.weight"]["local_shape"] == [r, in_features // 2]
                    assert entry["up.weight"]["local_shape"] == full["up.weight"]["local_shape"]


def _compressed_meta(kind: str):
    """A tiny model compressed with :func:`_ranks` (only its structure matters to the plan)."""
    model = make_tiny_model(kind, seed=0)
    ranks = _ranks(model)
    hf_lowrank.compress_model(model, ranks, progress=False)
    return model, ranks


def test_factor_plan_moves_each_style_onto_one_factor():
    """Output-split styles go to ``up``, input-split ones to ``down``; the dense entries stay (dense siblings and
    the static cache's head count read them), and names the plan does not shard get nothing."""
    model, ranks = _compressed_meta("llama")
    plan = dict(model.tp_plan)
    before = dict(plan)
    moved = factor_parallel_plan(model, plan)
    assert moved == set(ranks)  # every factorized module here has a dense entry (lm_head: colwise_gather_output)
    assert {k: plan[k] for k in before} == before
    added = {k: v for k, v in plan.items() if k not in before}
    assert added == {
        "lm_head.up": "colwise_gather_output",
        **{f"model.layers.*.self_attn.{p}.up": "colwise" for p in ("q_proj", "k_proj", "v_proj")},
        "model.layers.*.self_attn.o_proj.down": "rowwise",
        **{f"model.layers.*.mlp.{p}.up": "colwise" for p in ("gate_proj", "up_proj")},
        "model.layers.*.mlp.down_proj.down": "rowwise",
    }
    assert factor_parallel_plan(model, plan) == moved and len(plan) == len(before) + len(added)  # idempotent
    assert all(style in FACTOR_STYLES for style in added.values())


def test_factor_plan_leaves_io_only_styles_and_unnamed_modules():
    model, _ = _compressed_meta("llama")
    plan = {"model.layers.*.self_attn.q_proj": "all_reduce", "model.embed_tokens": "embedding_rowwise"}
    assert factor_parallel_plan(model, plan) == set()
    assert plan == {"model.layers.*.self_attn.q_proj": "all_reduce", "model.embed_tokens": "embedding_rowwise"}


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ({"model.layers.*.self_attn.q_proj": "moe_tp_experts"}, "cannot yet split over its factors"),
        ({"model.layers.*.self_attn.q_proj.weight": "colwise"}, "does not have"),
        (
            {"model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.q_proj.up": "rowwise"},
            "already gives",
        ),
    ],
)
def test_factor_plan_refuses_what_it_cannot_split(plan, match):
    model, _ = _compressed_meta("llama")
    with pytest.raises(CompressedCheckpointError, match=match):
        factor_parallel_plan(model, plan)


def test_quantizer_rewrites_the_plan_on_load(tmp_path):
    """``from_pretrained`` (one process, no tensor parallelism) leaves the model with the factor-level plan: the
    quantizer's hook ran, and without tensor parallelism nothing is hooked."""
    folder, ranks = _save("qwen2", tmp_path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert model.tp_plan["model.layers.*.self_attn.q_proj.up"] == "colwise"
    assert model.tp_plan["model.layers.*.mlp.down_proj.down"] == "rowwise"
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, LowRankLinear))
