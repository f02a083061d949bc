"""A save killed mid-write (SIGKILL in a real subprocess) leaves the previous checkpoint loadable and identical."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_lowrank

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import hf_lowrank
    import transformers.modeling_utils as mu
    from transformers import LlamaConfig, LlamaForCausalLM

    mode, path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    hf_lowrank.compress_model(model, 0.4, progress=False)
    real = mu.safe_save_file

    def die_mid_write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "rb+") as fh:  # half the bytes are on disk when the process dies
            fh.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    def die_before_rename(src, dst):
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "mid-write":
        mu.safe_save_file = die_mid_write
    elif mode == "before-rename":
        os.replace = die_before_rename
    hf_lowrank.save_compressed(model, path)
    """
)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _save_in_process(path, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    hf_lowrank.compress_model(model, 0.4, progress=False)
    hf_lowrank.save_compressed(model, path)


def _run(mode, path, seed):
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, str(path), str(seed)], capture_output=True, timeout=300)


@pytest.mark.parametrize("mode", ["mid-write", "before-rename"])
def test_killed_save_leaves_previous_checkpoint(tmp_path, mode):
    target = tmp_path / "ckpt"
    _save_in_process(target, 1)
    before = _digest(target)
    reference = hf_lowrank.load_compressed(target).eval()
    ids = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        ref_logits = reference(ids).logits

    killed = _run(mode, target, 2)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]  # really killed by SIGKILL

    assert _digest(target) == before  # byte-identical previous checkpoint
    again = hf_lowrank.load_compressed(target).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref_logits)
    # The interrupted attempt left at most a hidden temporary sibling, never a half-written `ckpt`.
    assert all(p.name.startswith(".ckpt.") for p in tmp_path.iterdir() if p.name != "ckpt")

    # The next save succeeds over the leftovers and replaces the checkpoint.
    _save_in_process(target, 3)
    assert _digest(target) != before
    hf_lowrank.load_compressed(target)


def test_atomic_directory_carries_other_files_over_as_links(tmp_path):
    """Saving into a folder that holds other things (a Trainer output_dir with checkpoint-* folders) keeps them, as
    hard links: nothing is copied, and the old folder is whole until the swap."""
    import os

    from hf_lowrank.io import atomic_directory

    folder = tmp_path / "run"
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoint-1" / "model.safetensors").write_bytes(b"x" * 4096)
    (folder / "config.json").write_text("{}")
    before = os.stat(folder / "checkpoint-1" / "model.safetensors").st_ino
    with atomic_directory(folder) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
        assert (folder / "config.json").read_text() == "{}"  # untouched until the body succeeds
    assert (folder / "config.json").read_text() == '{"new": 1}'
    moved = folder / "checkpoint-1" / "model.safetensors"
    assert moved.read_bytes() == b"x" * 4096 and os.stat(moved).st_ino == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary or trash folder left

    with pytest.raises(RuntimeError), atomic_directory(folder) as tmp:
        (tmp / "config.json").write_text("half")
        raise RuntimeError("crash in the middle of a save")
    assert (folder / "config.json").read_text() == '{"new": 1}' and moved.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
