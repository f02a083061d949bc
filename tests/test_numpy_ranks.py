"""Ranks given as numpy integers (as a rank plan computed with numpy gives them) are ranks: resolved, applied and
serialised as plain ints by compress_model, LowRankConfig and WeLoreLRCConfig."""

from __future__ import annotations

import json

import numpy as np
from peft import get_peft_model
from testing_common import make_tiny_llama

import hf_lowrank
from hf_lowrank.compression.checkpoint import LowRankConfig
from hf_lowrank.compression.compress import resolve_ranks
from hf_lowrank.tuners.welore import WeLoreLRCConfig


def _planted():
    from test_welore import _plant_spectra

    model = make_tiny_llama(seed=0)
    _plant_spectra(model)
    return model


def test_numpy_integer_ranks_are_ranks():
    model = make_tiny_llama(seed=0)
    targets = hf_lowrank.targets.find_target_linears(model)
    assert set(resolve_ranks(targets, np.int64(4)).values()) == {4}
    name = next(iter(targets))
    assert resolve_ranks(targets, {name: np.int32(4)}) == {name: 4}
    report = hf_lowrank.compress_model(model, np.int64(4), progress=False)
    assert set(report.ranks.values()) == {4}
    assert all(type(r) is int for r in model.config.quantization_config.ranks.values())
    assert LowRankConfig(ranks={name: np.int64(4)}).ranks == {name: 4}
    json.dumps(LowRankConfig(ranks={name: np.int64(4)}).to_dict())


def test_numpy_integer_welore_ranks(tmp_path):
    cfg = WeLoreLRCConfig(rank_pattern={"q_proj": np.int64(4)}, progress=False)
    assert cfg.rank_pattern == {"q_proj": 4} and type(cfg.rank_pattern["q_proj"]) is int
    pm = get_peft_model(_planted(), cfg)
    rank_map = {k: np.int64(v) for k, v in pm.peft_config["default"].rank_map.items()}
    lrc = list(pm.peft_config["default"].lrc_modules)
    reused = WeLoreLRCConfig(rank_map=rank_map, lrc_modules=lrc, progress=False)
    assert all(type(v) is int for v in reused.rank_map.values())
    again = get_peft_model(_planted(), reused)
    again.save_pretrained(tmp_path)  # adapter_config.json serialises
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_map"]
