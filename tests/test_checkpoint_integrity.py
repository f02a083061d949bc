"""Checkpoints and ERE residuals whose files disagree with the JSON that describes them are refused, naming the field
and the fix: rank maps that miss modules, file names that leave the folder, malformed fields, tensors whose header
dtype was changed; and a compressed checkpoint loads by Hub id from the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from testing_common import make_finetuned_copy, make_tiny_llama, read_safetensors_header, write_safetensors_header

import hf_lowrank
from hf_lowrank.compression.checkpoint import CompressedCheckpointError
from hf_lowrank.compression.ere import EREResidual, ResidualFormatError

IDS = torch.arange(20).reshape(2, 10)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A compressed tiny Llama saved once (single file), and its logits."""
    model = make_tiny_llama(seed=1)
    hf_lowrank.compress_model(model, 0.4, progress=False)
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    hf_lowrank.save_compressed(model.eval(), path)
    with torch.no_grad():
        return path, model(IDS).logits


@pytest.fixture
def ckpt(saved, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(saved[0], path)
    return path


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------- the rank map
def test_rank_map_missing_a_module_is_refused(ckpt):
    from hf_lowrank.compression.checkpoint import check_compressed_checkpoint

    ranks = json.loads((ckpt / "config.json").read_text())["quantization_config"]["ranks"]
    dropped = sorted(ranks)[3]
    _edit_config(ckpt, lambda q: q["ranks"].pop(dropped))
    for check in (hf_lowrank.load_compressed, check_compressed_checkpoint):
        with pytest.raises(CompressedCheckpointError, match=f"factors of '{dropped}'.*no entry for it"):
            check(ckpt)


def test_empty_rank_map_is_refused(ckpt):
    _edit_config(ckpt, lambda q: q.update(ranks={}))
    with pytest.raises(CompressedCheckpointError, match="no entry for it"):
        hf_lowrank.load_compressed(ckpt)


def test_rank_entry_without_factors_is_flagged_by_the_checker(ckpt):
    from hf_lowrank.compression.checkpoint import check_compressed_checkpoint

    _edit_config(ckpt, lambda q: q["ranks"].update({"model.layers.0.self_attn.rotary": 2}))
    with pytest.raises(CompressedCheckpointError, match="for 'model.layers.0.self_attn.rotary' but the weights"):
        check_compressed_checkpoint(ckpt)


def test_a_factor_deleted_from_the_file_is_refused_naming_it(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    victim = sorted(k for k in tensors if k.endswith(".up.weight"))[0]
    del tensors[victim]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    from hf_lowrank.compression.checkpoint import check_compressed_checkpoint

    with pytest.raises(CompressedCheckpointError, match=f"hold no {victim}"):
        check_compressed_checkpoint(ckpt)


# ------------------------------------------------------------------------------------ malformed config fields
@pytest.mark.parametrize(
    "field,value",
    [("ranks", ["model.layers.0.mlp.up_proj", 4]), ("extra", "x"), ("format_version", "abc"), ("method", 3),
     ("ranks", {"model.layers.0.mlp.up_proj": "four"}), ("format_version", 0)],
)
def test_malformed_quantization_config_fields_name_the_field(ckpt, field, value):
    from hf_lowrank.compression.checkpoint import check_compressed_checkpoint

    _edit_config(ckpt, lambda q: q.update({field: value}))
    for check in (hf_lowrank.load_compressed, check_compressed_checkpoint):
        with pytest.raises(CompressedCheckpointError, match="quantization_config|Rank '?four"):
            check(ckpt)
    with pytest.raises(CompressedCheckpointError) as info:
        hf_lowrank.load_compressed(ckpt)
    assert (field if field != "ranks" or isinstance(value, list) else "quantization_config.ranks") in str(info.value)


# ------------------------------------------------------------------------------ file names in the index
@pytest.mark.parametrize("name", ["../outside.safetensors", "/abs/model.safetensors", "sub/model.safetensors", 7])
def test_index_file_names_must_stay_in_the_folder(saved, tmp_path, name):
    model = hf_lowrank.load_compressed(saved[0])
    path = tmp_path / "sharded"
    hf_lowrank.save_compressed(model, path, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key, first = sorted(index["weight_map"].items())[0]
    shutil.copy(path / first, tmp_path / "outside.safetensors")
    index["weight_map"][key] = name
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CompressedCheckpointError, match=r"weight_map\[.*not the plain name of a file"):
        hf_lowrank.load_compressed(path)


def test_index_placing_a_tensor_in_the_wrong_shard_is_refused(saved, tmp_path):
    path = tmp_path / "sharded"
    hf_lowrank.save_compressed(hf_lowrank.load_compressed(saved[0]), path, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    key = next(k for k, v in sorted(index["weight_map"].items()) if v == files[0])
    index["weight_map"][key] = files[1]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CompressedCheckpointError, match="disagree about"):
        hf_lowrank.load_compressed(path)


# ------------------------------------------------------------------------------------------ ERE manifests
@pytest.fixture(scope="module")
def residual(tmp_path_factory):
    base = make_tiny_llama(seed=0)
    ft = make_finetuned_copy(base, seed=1)
    out = tmp_path_factory.mktemp("res") / "residual"
    hf_lowrank.encode_residual(base, ft, rank=4, path=out, progress=False)
    return base, out


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "residual_manifest.json").read_text())
    edit(manifest)
    (dst / "residual_manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("name", ["../outside.safetensors", "ABSOLUTE", "sub/residual.safetensors", "..", 5, None])
def test_manifest_weights_file_must_stay_in_the_folder(residual, tmp_path, name):
    base, src = residual
    shutil.copy(src / "residual.safetensors", tmp_path / "outside.safetensors")
    value = str(tmp_path / "outside.safetensors") if name == "ABSOLUTE" else name
    path = _edit_manifest(src, tmp_path / "res", lambda m: m["weights"].update(file=value))
    with pytest.raises(ResidualFormatError, match="'weights.file'.*not the plain name of a file"):
        EREResidual.load(path)
    with pytest.raises(ResidualFormatError, match="weights.file"):
        hf_lowrank.decode_residual(base, path, progress=False)


def test_manifest_weights_file_renamed_in_the_folder_breaks_the_hash(residual, tmp_path):
    _, src = residual
    path = _edit_manifest(src, tmp_path / "res", lambda m: m["weights"].update(file="other.safetensors"))
    shutil.copy(path / "residual.safetensors", path / "other.safetensors")
    with pytest.raises(ResidualFormatError, match="no longer matches the weights file"):
        EREResidual.load(path)


@pytest.mark.parametrize("arch", ["AutoModel", "logging", "NoSuchModel", 3, "__import__"])
def test_manifest_architecture_must_name_a_model_class(residual, tmp_path, arch):
    _, src = residual
    path = _edit_manifest(src, tmp_path / "res", lambda m: m.update(architecture=arch))
    with pytest.raises(ResidualFormatError, match="'architecture'.*not the name of a transformers model class"):
        EREResidual.load(path)


def test_manifest_weights_not_an_object(residual, tmp_path):
    _, src = residual
    path = _edit_manifest(src, tmp_path / "res", lambda m: m.update(weights="residual.safetensors"))
    with pytest.raises(ResidualFormatError, match="'weights'.*must be a JSON object"):
        EREResidual.load(path)


# --------------------------------------------------------------------------------------------- Hub ids
def test_load_compressed_resolves_a_hub_id_from_the_cache(saved, tmp_path):
    """``load_compressed("org/name")`` resolves the id as from_pretrained does (here offline, from a cache laid out as
    the Hub's), runs its checks on the cached files and loads the same model."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-compressed"
    shutil.copytree(saved[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "import sys, torch, hf_lowrank\n"
        "from safetensors.torch import save_file\n"
        "torch.set_num_threads(1)\n"
        "model = hf_lowrank.load_compressed('org/tiny-compressed').eval()\n"
        "with torch.no_grad():\n"
        "    save_file({'logits': model(torch.arange(20).reshape(2, 10)).logits}, sys.argv[1])\n"
        "try:\n"
        "    hf_lowrank.load_compressed('org/not-in-the-cache')\n"
        "except hf_lowrank.errors.CompressedCheckpointError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=root)
    env.pop("HF_HOME", None)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "logits.safetensors")], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = load_file(tmp_path / "logits.safetensors")["logits"]
    torch.testing.assert_close(got, saved[1])
    assert "REFUSED No checkpoint at 'org/not-in-the-cache'" in done.stdout


# ------------------------------------------------------------------------------------------- header dtypes
@pytest.mark.parametrize("dtype", ["I32", "U32"])
def test_dense_weight_relabelled_as_integer_is_refused(tmp_path, dtype):
    """An F32 dense weight whose header says I32 / U32 (same size) must not load cast to float (a different model,
    no error): a case the property test ``test_tampered_checkpoint_is_refused_or_loads_the_saved_model`` can draw."""
    model = make_tiny_llama(seed=0)
    hf_lowrank.compress_model(model, 0.5, progress=False)
    hf_lowrank.save_compressed(model, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model.safetensors"
    header = read_safetensors_header(shard)
    assert header["model.embed_tokens.weight"]["dtype"] == "F32"
    header["model.embed_tokens.weight"]["dtype"] = dtype
    write_safetensors_header(shard, header)
    with pytest.raises(CompressedCheckpointError, match="model.embed_tokens.weight.*not a float type"):
        hf_lowrank.load_compressed(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt")
