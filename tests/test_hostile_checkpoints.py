"""Hostile-input suite for saved files: random tamperings of compressed checkpoints and ERE residuals.

Property: a tampered folder (rank map entries removed or changed, malformed quantization_config fields, file names
in the weights index, dtypes and shapes in a safetensors header, ERE manifest fields) is either refused with a clear
error (a ``ValueError`` subclass whose message is not a bare Python error) or loads exactly the model that was saved,
never a different or partly random one. Settings: the "hostile" profile of conftest.py (25 derandomized examples;
``HF_LOWRANK_HOSTILE_EXAMPLES=500`` for a deeper randomized search).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from tiny_models import make_finetuned_copy, make_tiny_llama, write_safetensors_header

import hf_lowrank
from hf_lowrank.compression.ere import EREResidual

SETTINGS = settings.get_profile("hostile")  # registered in conftest.py

IDS = torch.arange(20).reshape(2, 10)
BARE = ("has no attribute", "unsupported operand", "invalid literal", "dictionary update sequence",
        "object is not subscriptable", "not iterable", "list index out of range", "object is not callable")


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model = make_tiny_llama(seed=1)
    hf_lowrank.compress_model(model, 0.4, progress=False)
    hf_lowrank.save_compressed(model.eval(), root / "single")
    hf_lowrank.save_compressed(model, root / "sharded", max_shard_size="40KB")
    with torch.no_grad():
        logits = model(IDS).logits
    base = make_tiny_llama(seed=0)
    ft = make_finetuned_copy(base, seed=1)
    hf_lowrank.encode_residual(base, ft, rank=4, path=root / "residual", progress=False)
    decoded = hf_lowrank.decode_residual(base, root / "residual", progress=False).state_dict()
    return {"root": root, "logits": logits, "base": base, "decoded": decoded}


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=False, width=32), st.text(max_size=6),
    st.just([]), st.just({}), st.just(["a", 1]), st.sampled_from(["../outside.safetensors", "/etc/passwd", "..", ""]),
)


def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def _tamper_checkpoint(folder: Path, data) -> None:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    quant = config["quantization_config"]
    kind = data.draw(st.sampled_from(["drop_rank", "set_rank", "field", "header", "index", "add_rank"]), "kind")
    event(kind)
    names = sorted(quant["ranks"]) if isinstance(quant.get("ranks"), dict) else []
    if kind in ("drop_rank", "set_rank") and not names:
        return
    if kind == "add_rank" and not isinstance(quant.get("ranks"), dict):
        return
    if kind == "drop_rank":
        for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True), "dropped"):
            del quant["ranks"][name]
    elif kind == "set_rank":
        quant["ranks"][data.draw(st.sampled_from(names), "module")] = data.draw(JUNK, "rank")
    elif kind == "add_rank":
        module = data.draw(st.sampled_from(["lm_head", "model.norm", "nothing.here", "model.layers.0"]), "module")
        quant["ranks"][module] = data.draw(st.integers(1, 8), "rank")
    elif kind == "field":
        field = data.draw(st.sampled_from(["ranks", "extra", "format_version", "method", "quant_method"]), "field")
        quant[field] = data.draw(JUNK, "value")
    elif kind == "header":
        shards = sorted(p for p in folder.glob("*.safetensors"))
        shard = data.draw(st.sampled_from(shards), "shard")
        _, header = _header(shard)
        key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), "tensor")
        if data.draw(st.booleans(), "dtype"):
            header[key]["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I32", "I8", "BOOL", "X"]))
        else:
            shape = header[key]["shape"]
            header[key]["shape"] = data.draw(st.sampled_from([shape[::-1], [*shape, 1], shape[:1], [0], [2, 3]]))
        write_safetensors_header(shard, header)
    else:
        index_path = folder / "model.safetensors.index.json"
        if not index_path.is_file():
            return
        index = json.loads(index_path.read_text())
        key = data.draw(st.sampled_from(sorted(index["weight_map"])), "key")
        files = sorted({v for v in index["weight_map"].values() if isinstance(v, str)})
        index["weight_map"][key] = data.draw(st.one_of(st.sampled_from(files), JUNK), "file")
        index_path.write_text(json.dumps(index))
    config_path.write_text(json.dumps(config))


def _assert_clear(exc: BaseException) -> None:
    assert isinstance(exc, ValueError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert len(message) > 40 and not any(b in message for b in BARE), message


@SETTINGS
@given(data=st.data(), variant=st.sampled_from(["single", "sharded"]))
def test_tampered_checkpoint_is_refused_or_loads_the_saved_model(originals, data, variant):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        shutil.copytree(originals["root"] / variant, folder)
        shutil.copy(folder / sorted(p.name for p in folder.glob("*.safetensors"))[0], Path(tmp) / "outside.safetensors")
        for _ in range(data.draw(st.integers(1, 2), "tamperings")):
            _tamper_checkpoint(folder, data)
        try:
            model = hf_lowrank.load_compressed(folder).eval()
        except Exception as exc:  # noqa: BLE001 - the property is about which exceptions come out
            _assert_clear(exc)
            event("refused")
            return
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, originals["logits"]), "loaded a different model"
        event("loaded the saved model")


MANIFEST_FIELDS = ["weights.file", "weights.bytes", "weights.sha256", "architecture", "bits", "group_size",
                   "format_version", "dtype", "tensor.rank", "tensor.kind", "tensor.shape", "tensor.dtype",
                   "base_model_prefix", "drop_tensor"]


@SETTINGS
@given(data=st.data(), field=st.sampled_from(MANIFEST_FIELDS))
def test_tampered_residual_is_refused_or_decodes_the_saved_model(originals, data, field):
    event(field)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "res"
        shutil.copytree(originals["root"] / "residual", folder)
        shutil.copy(folder / "residual.safetensors", Path(tmp) / "outside.safetensors")
        path = folder / "residual_manifest.json"
        manifest = json.loads(path.read_text())
        value = data.draw(JUNK, "value")
        if field.startswith("weights."):
            manifest["weights"][field.split(".")[1]] = value
        elif field.startswith("tensor."):
            name = data.draw(st.sampled_from(sorted(manifest["tensors"])), "tensor")
            manifest["tensors"][name][field.split(".")[1]] = value
        elif field == "drop_tensor":
            del manifest["tensors"][data.draw(st.sampled_from(sorted(manifest["tensors"])), "tensor")]
        else:
            manifest[field] = data.draw(st.one_of(JUNK, st.sampled_from(["AutoModel", "LlamaModel", "float16"])))
        path.write_text(json.dumps(manifest))
        try:
            decoded = hf_lowrank.decode_residual(originals["base"], EREResidual.load(folder), progress=False)
        except Exception as exc:  # noqa: BLE001
            _assert_clear(exc)
            event("refused")
            return
        got = decoded.state_dict()
        want = originals["decoded"]
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], v) for k, v in want.items()), "decoded another"
        event("decoded the saved model")
