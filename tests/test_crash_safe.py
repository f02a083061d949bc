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
    if what == "residual":  # an ERE residual re-encoded into the folder of the previous one
        from tiny_models import make_finetuned_copy, make_tiny_llama
        import hf_lowrank.compression.ere.format as mu

        base = make_tiny_llama(seed=0)
        ft = make_finetuned_copy(base, seed=seed)
        save = lambda: hf_lowrank.encode_residual(base, ft, rank=4, path=path, progress=False)
    elif what == "compressed":
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
    real = getattr(mu, "safe_save_file", None)

    def die_mid_write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "rb+") as fh:  # half the bytes are on disk when the process dies
            fh.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    def die_before_rename(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    import hf_lowrank.io as hio
    real_replace = os.replace

    def die_between_renames(src, dst):  # the second of the two renames that swap a folder without renameat2
        if os.path.abspath(dst) == os.path.abspath(path):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    if mode == "mid-write":
        mu.safe_save_file = die_mid_write
    elif mode == "before-rename":
        os.replace = os.rename = hio._exchange = hio._rename_noreplace = die_before_rename
    elif mode == "between-renames":
        hio._exchange = lambda a, b: False  # as on a system without RENAME_EXCHANGE
        os.replace = die_between_renames
    elif mode == "after-exchange":  # the new folder is in place; the previous one still in the temporary folder
        real_exchange = hio._exchange

        def die_after_exchange(a, b):
            assert real_exchange(a, b), "renameat2(RENAME_EXCHANGE) is available on Linux"
            os.kill(os.getpid(), signal.SIGKILL)

        hio._exchange = die_after_exchange
    elif mode == "before-manifest":  # residual weights written, manifest not yet
        real_json = mu.atomic_write_json

        def die_at_manifest(target, obj):
            if str(target).endswith("residual_manifest.json"):
                os.kill(os.getpid(), signal.SIGKILL)
            real_json(target, obj)

        mu.atomic_write_json = die_at_manifest
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

    # The next save succeeds over the leftovers, replaces the checkpoint and removes the leftovers.
    _save_in_process(target, 3)
    assert _digest(target) != before
    hf_lowrank.load_compressed(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _logits_of_seed(seed):
    model = make_tiny_llama(seed=seed)
    hf_lowrank.compress_model(model, 0.4, progress=False)
    with torch.no_grad():
        return model.eval()(torch.arange(20).reshape(2, 10)).logits


def _logits(path):
    model = hf_lowrank.load_compressed(path).eval()
    with torch.no_grad():
        return model(torch.arange(20).reshape(2, 10)).logits


def test_kill_between_the_two_renames_is_recovered(tmp_path):
    """Without RENAME_EXCHANGE a folder is swapped by two renames; a kill between them leaves no folder at `path`
    (the previous one waits in a hidden `.ckpt.old-*`). Every load and save first moves it back."""
    from hf_lowrank.compression.ere import EREResidual

    target = tmp_path / "ckpt"
    _save_in_process(target, 1)
    before, ref = _digest(target), _logits(target)
    killed = _run("between-renames", target, 2)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not target.exists()  # the kill hit the window between the renames

    assert torch.equal(_logits(target), ref)  # the load restored the previous checkpoint
    assert _digest(target) == before
    with pytest.raises(hf_lowrank.errors.ResidualError, match="not an ERE residual"):
        EREResidual.load(target)  # (a residual load restores too; this folder is a model, so it is refused)

    killed = _run("between-renames", target, 2)  # again, and this time a save recovers
    assert killed.returncode == -9 and not target.exists()
    _save_in_process(target, 3)
    assert _digest(target) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_kill_right_after_the_exchange_leaves_the_new_checkpoint(tmp_path):
    """With renameat2(RENAME_EXCHANGE) there is no moment without a folder at `path`: killed right after the swap, the
    new checkpoint is in place and whole; the previous one is in a hidden temporary that the next save removes."""
    target = tmp_path / "ckpt"
    _save_in_process(target, 1)
    before = _digest(target)
    killed = _run("after-exchange", target, 2)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    reference = tmp_path / "reference"
    done = _run("none", reference, 2)  # the same save, not killed, in a fresh interpreter as well
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    # the same save in two interpreters need not agree bit for bit (thread scheduling of the SVD): compare what
    # matters, that the folder holds the NEW model whole (same files, same logits within float32 rounding)
    assert _digest(target) != before and set(_digest(target)) == set(_digest(reference))
    torch.testing.assert_close(_logits(target), _logits(reference), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(target), _logits_of_seed(1), atol=1e-3)
    _save_in_process(target, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "reference"]


def test_killed_residual_reencode_keeps_the_previous_residual(tmp_path):
    """An ERE residual re-encoded into the folder of an earlier one, killed after the weights file is written and
    before the manifest: the earlier residual is still there, whole and decodable."""
    from hf_lowrank.compression.ere import EREResidual

    target = tmp_path / "res"
    first = _run("none", target, 1, what="residual")
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    before = _digest(target)
    previous = EREResidual.load(target)
    killed = _run("before-manifest", target, 2, what="residual")
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert _digest(target) == before
    again = EREResidual.load(target)
    assert sorted(again.tensors) == sorted(previous.tensors)
    assert all(torch.equal(again.tensors[k], v) for k, v in previous.tensors.items())


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
