"""A save killed mid-write (SIGKILL in a real subprocess) leaves the previous checkpoint loadable and identical."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_llama

import hf_lowrank

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import hf_lowrank
    import transformers.modeling_utils as mu
    from tiny_models import make_tiny_llama  # tests/ is on PYTHONPATH (see _run)

    mode, path, seed, what = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if what == "compressed":
        model = make_tiny_llama(seed=seed)
        hf_lowrank.compress_model(model, 0.4, progress=False)
        save = lambda: hf_lowrank.save_compressed(model, path)
    else:  # a PEFT adapter saved by LowRankTrainer.save_model (peft writes it with its own safe_save_file)
        import peft.peft_model as mu
        from peft import get_peft_model
        from transformers import TrainingArguments

        torch.manual_seed(seed)
        model = get_peft_model(make_tiny_llama(seed=0), hf_lowrank.SPSFTConfig(r=4, init_weights=False))
        args = TrainingArguments(output_dir=path + "-run", report_to=[], use_cpu=True)
        save = lambda: hf_lowrank.LowRankTrainer(model=model, args=args).save_model(path)
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
    save()
    """
)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _save_in_process(path, seed):
    model = make_tiny_llama(seed=seed)
    hf_lowrank.compress_model(model, 0.4, progress=False)
    hf_lowrank.save_compressed(model, path)


def _save_adapter_in_process(path, seed):
    from peft import get_peft_model
    from transformers import TrainingArguments

    torch.manual_seed(seed)
    model = get_peft_model(make_tiny_llama(seed=0), hf_lowrank.SPSFTConfig(r=4, init_weights=False))
    args = TrainingArguments(output_dir=str(path) + "-run", report_to=[], use_cpu=True)
    hf_lowrank.LowRankTrainer(model=model, args=args).save_model(str(path))
    return model


def _run(mode, path, seed, what="compressed"):
    """Run SCRIPT in a fresh interpreter; ``python -c`` puts only the working directory on ``sys.path``, so the
    folder of ``tiny_models.py`` goes on ``PYTHONPATH``."""
    here = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-c", SCRIPT, mode, str(path), str(seed), what]
    return subprocess.run(cmd, capture_output=True, timeout=300, env=env)


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


@pytest.mark.parametrize("mode", ["mid-write", "before-rename"])
def test_killed_trainer_save_leaves_previous_adapter(tmp_path, mode):
    """LowRankTrainer's saves (here an SPSFT adapter through save_model) are atomic too."""
    from peft import PeftModel

    target = tmp_path / "adapter"
    saved = _save_adapter_in_process(target, 1)
    before = _digest(target)
    assert "adapter_model.safetensors" in before

    killed = _run(mode, target, 2, what="adapter")
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert _digest(target) == before
    assert all(p.name.startswith(".adapter.") or p.name == "adapter-run" for p in tmp_path.iterdir()
               if p.name != "adapter")
    loaded = PeftModel.from_pretrained(make_tiny_llama(seed=0), target)
    want = {k: v for k, v in saved.state_dict().items() if "spsft_" in k}
    got = loaded.state_dict()
    assert want and all(torch.equal(got[k], v) for k, v in want.items())


def test_atomic_directory_carries_other_files_over_as_links(tmp_path):
    """Saving into a folder that holds other things (a Trainer output_dir with checkpoint-* folders) keeps them, as
    hard links: nothing is copied, and the old folder is whole until the swap."""
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
