"""What a saved folder can be trusted with: re-saves never reload the previous model, failed or concurrent saves
leave nothing behind, and checkpoints whose files disagree with their config are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_common import make_tiny_llama

import hf_lowrank
from hf_lowrank.io import SaveConflictError, atomic_directory

IDS = torch.arange(20).reshape(2, 10)


def _compressed(seed: int):
    model = make_tiny_llama(seed=seed)
    hf_lowrank.compress_model(model, 0.4, progress=False)
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


# ------------------------------------------------------------------------------------ what a re-save carries over
def test_sharded_resave_does_not_reload_the_previous_model(tmp_path):
    """A sharded save over a single-file one: the old model.safetensors (which transformers prefers) is not kept."""
    path = tmp_path / "ckpt"
    first, second = _compressed(1), _compressed(2)
    hf_lowrank.save_compressed(first, path)
    (path / "notes.txt").write_text("kept")
    (path / "checkpoint-1").mkdir()
    (path / "checkpoint-1" / "model.safetensors").write_bytes(b"old run")
    hf_lowrank.save_compressed(second, path, max_shard_size="40KB")
    names = sorted(p.name for p in path.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert "notes.txt" in names and (path / "checkpoint-1" / "model.safetensors").read_bytes() == b"old run"
    loaded = hf_lowrank.load_compressed(path).eval()
    assert torch.equal(_logits(loaded), _logits(second))
    assert not torch.equal(_logits(loaded), _logits(first))


def test_trainer_save_of_an_adapter_drops_the_previous_model(tmp_path):
    """LowRankTrainer._save: an adapter saved where a full model was leaves no model weights or config behind (with
    them, from_pretrained would load the old model, or the old model with the new adapter)."""
    from peft import get_peft_model
    from transformers import TrainingArguments

    path = tmp_path / "out"
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    hf_lowrank.LowRankTrainer(model=make_tiny_llama(seed=1), args=args).save_model(str(path))
    assert {"model.safetensors", "config.json"} <= {p.name for p in path.iterdir()}
    (path / "checkpoint-3").mkdir()
    (path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    model = get_peft_model(make_tiny_llama(seed=0), hf_lowrank.SPSFTConfig(r=4, init_weights=False))
    hf_lowrank.LowRankTrainer(model=model, args=args).save_model(str(path))
    names = {p.name for p in path.iterdir()}
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    assert not names & {"model.safetensors", "config.json", "model.safetensors.index.json"}
    assert (path / "checkpoint-3" / "trainer_state.json").is_file()


def test_carried_over_rule():
    from hf_lowrank.io import carried_over

    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "config.json", "adapter_config.json", "adapter_model.safetensors",
                 "residual_manifest.json", "fisher_state.safetensors", "generation_config.json"):
        assert not carried_over(Path("/nonexistent") / name), name
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md", "special_tokens_map.json"):
        assert carried_over(Path("/nonexistent") / name), name


# --------------------------------------------------------------------------- failed and concurrent saves
def test_save_to_a_file_is_refused_before_writing(tmp_path):
    target = tmp_path / "taken"
    target.write_text("a file")
    with pytest.raises(SaveConflictError, match="is a file, not a folder"):
        hf_lowrank.save_compressed(_compressed(1), target)
    assert target.read_text() == "a file"
    assert _siblings(target) == []  # no temporary folder with a copy of the weights


def test_concurrent_writers_one_wins_the_other_gets_a_clear_error(tmp_path):
    path = tmp_path / "ckpt"
    with atomic_directory(path) as tmp:
        (tmp / "config.json").write_text('{"writer": 1}')
        with pytest.raises(SaveConflictError, match="Another process .* is saving to"):
            hf_lowrank.save_compressed(_compressed(2), path)
        (tmp / "model.safetensors").write_bytes(b"1")
    assert json.loads((path / "config.json").read_text()) == {"writer": 1}
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert _siblings(path) == []


def test_concurrent_writers_in_two_processes(tmp_path):
    """A second process saving while the first holds the folder: refused at once, and nothing of it is left."""
    path = tmp_path / "ckpt"
    code = (
        "import sys, hf_lowrank.io as io\n"
        "try:\n"
        "    with io.atomic_directory(sys.argv[1]) as tmp:\n"
        "        (tmp / 'config.json').write_text('2')\n"
        "except io.SaveConflictError as exc:\n"
        "    print(exc); sys.exit(3)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    with atomic_directory(path) as tmp:
        (tmp / "config.json").write_text("1")
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=root,
                              timeout=120, env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 3, done.stderr[-2000:]
    assert "is saving to" in done.stdout
    assert (path / "config.json").read_text() == "1"
    assert _siblings(path) == []


def test_lost_race_on_a_new_folder_discards_cleanly(tmp_path):
    """Another tool creates the folder while this save runs: this save is discarded with a clear error, the other's
    folder stays as it made it, and no temporary copy is left."""
    path = tmp_path / "ckpt"
    with pytest.raises(SaveConflictError, match="created by another writer"), atomic_directory(path) as tmp:
        (tmp / "model.safetensors").write_bytes(b"mine")
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"theirs")
    assert (path / "model.safetensors").read_bytes() == b"theirs"
    assert _siblings(path) == []


def test_failed_body_leaves_nothing(tmp_path):
    path = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(path) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not path.exists() and _siblings(path) == []
