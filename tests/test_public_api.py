"""The public API: about 20 top-level names for the jobs users call, deprecated names that still resolve for one
release (with a ``DeprecationWarning`` naming the new name or path), and examples that use none of them.
"""

from __future__ import annotations

import ast
import importlib
import re
import warnings
from pathlib import Path

import pytest

import hf_lowrank
import hf_lowrank.cards  # noqa: F401  (registers write_model_card's renamed keyword)
from hf_lowrank._deprecation import RENAMED_KEYWORDS
from hf_lowrank.compression.compress import DEPRECATED_NAMES
from hf_lowrank.tuners.fisher_lora.config import _LEGACY_FIELDS

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))

#: the top level before the API was cut to the jobs users call: every name that left must still resolve
FORMER_TOP_LEVEL = [
    "BaseMismatchError", "CompressOnSaveCallback", "CompressedCheckpointError", "CompressionConfig",
    "CompressionReport", "CorrectionReport", "EREResidual", "FisherCollectorCallback", "FisherLoRAConfig",
    "FisherLoraModel", "FisherState", "LowRankConfig", "LowRankLinear", "QuantizedLowRankLinear", "LowRankSFTTrainer",
    "LowRankTrainer", "LowRankTrainerMixin", "ResidualError", "SPSFTConfig", "SPSFTModel", "WeLoreLRCConfig",
    "WeLoreModel", "compress_model", "compress_peft_model", "decode_residual", "decompress_model", "encode_residual",
    "export_residual_as_lora", "export_spsft_as_lora", "dequantize_factors", "fake_quantize", "find_target_linears",
    "gather_full_model", "is_fsdp_model", "load_compressed", "load_residual", "quantization_correction",
    "save_compressed", "save_residual_on_save", "spsft_importance", "welore_ranks_for_model", "write_model_card",
]
#: functions kept one release as deprecated wrappers: examples must not call them
DEPRECATED_FUNCTIONS = {"export_lora_adapter", "export_spsft_as_lora", "export_residual_as_lora",
                        "save_compressed_model"}


def test_the_top_level_is_about_twenty_names_that_resolve_without_warning():
    assert 15 <= len(hf_lowrank.__all__) <= 24, hf_lowrank.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in hf_lowrank.__all__:
            assert getattr(hf_lowrank, name) is not None
    for job in ("compress_model", "CompressionConfig", "save_compressed", "save_as_lora", "HfLowRankError"):
        assert job in hf_lowrank.__all__


@pytest.mark.parametrize("name", [n for n in FORMER_TOP_LEVEL if n not in hf_lowrank.__all__])
def test_a_former_top_level_name_resolves_with_a_warning_naming_its_submodule(name):
    with pytest.warns(DeprecationWarning, match=rf"from hf_lowrank\.[a-z_.]+ import {name}") as caught:
        obj = getattr(hf_lowrank, name)
    module = re.search(r"from (hf_lowrank\.[\w.]+) import", str(caught[0].message)).group(1)
    assert getattr(importlib.import_module(module), name) is obj
    with pytest.warns(DeprecationWarning):
        exec(f"from hf_lowrank import {name}", {})


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'compress_everything'"):
        hf_lowrank.compress_everything  # noqa: B018


@pytest.mark.parametrize(
    ("qualname", "old", "new"),
    [
        ("decode_residual", "in_place", "inplace"),
        ("encode_residual", "out", "path"),
        ("save_residual_on_save", "output_dir", "path"),
        ("quantization_correction", "output_dir", "path"),
        ("write_adapter", "output_dir", "path"),
        ("compress_on_save", "output_dir", "path"),
        ("write_model_card", "folder", "path"),
        ("write_model_card_for", "folder", "path"),
        ("LowRankTrainerMixin.__init__", "compress_inplace", "inplace"),
    ],
)
def test_one_name_for_in_place_and_for_the_output_folder(qualname, old, new):
    assert RENAMED_KEYWORDS[qualname] == {old: new}


def test_a_renamed_keyword_warns_and_reaches_the_new_one(tiny_llama, tmp_path):
    from testing_common import make_finetuned_copy

    from hf_lowrank.compression.ere import decode_residual, encode_residual

    ft = make_finetuned_copy(tiny_llama)
    with pytest.warns(DeprecationWarning, match=r"encode_residual\(out=...\) is deprecated.*use path="):
        encode_residual(tiny_llama, ft, rank=4, out=tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "residual_manifest.json").is_file()
    with pytest.warns(DeprecationWarning, match=r"in_place=.*use inplace="):
        same = decode_residual(tiny_llama, tmp_path / "r", in_place=True, progress=False)
    assert same is tiny_llama
    with pytest.raises(TypeError, match="got both out= and path="):
        encode_residual(tiny_llama, ft, rank=4, out=tmp_path / "a", path=tmp_path / "b", progress=False)


def test_model_classes_are_named_like_their_configs():
    from hf_lowrank.tuners.fisher_lora import FisherLoRAModel, FisherLoraModel
    from hf_lowrank.tuners.welore import WeLoreLRCModel, WeLoreModel

    assert FisherLoraModel is FisherLoRAModel and WeLoreModel is WeLoreLRCModel


# ------------------------------------------------------------------------------------------------- the examples
def _hf_lowrank_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hf_lowrank":
            yield node
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "hf_lowrank" for a in node.names):
            yield node


def _called_name(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _deprecated_keywords() -> dict[str, set[str]]:
    """``{callee name: deprecated keyword names}`` as the package declares them."""
    out: dict[str, set[str]] = {"compress_model": set(DEPRECATED_NAMES)}
    out["FisherLoRAConfig"] = {old for old, (_, _, deprecated) in _LEGACY_FIELDS.items() if deprecated}
    out["CompressOnSaveCallback"] = {"keep", "rank_pattern", "weighting"}
    for qualname, renames in RENAMED_KEYWORDS.items():
        owner, _, fn = qualname.rpartition(".")
        for callee in ((owner, "LowRankTrainer", "LowRankSFTTrainer") if fn == "__init__" else (fn,)):
            out.setdefault(callee, set()).update(renames)
    return out


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_use_no_deprecated_name(example):
    tree = ast.parse(example.read_text())
    # every hf_lowrank import the example makes, run for real with deprecation warnings as errors
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for node in _hf_lowrank_imports(tree):
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(example), "exec"), {})
    deprecated = _deprecated_keywords()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _called_name(node)
            if name in DEPRECATED_FUNCTIONS:
                found.append(f"line {node.lineno}: {name}()")
            found += [f"line {node.lineno}: {name}({k.arg}=)" for k in node.keywords if k.arg in deprecated.get(name, ())]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hf_lowrank":
            if node.attr in hf_lowrank._MOVED:
                found.append(f"line {node.lineno}: hf_lowrank.{node.attr}")
    assert not found, f"{example.name} uses deprecated names: {found}"


def test_the_example_check_finds_a_deprecated_keyword(tmp_path):
    # the check above is not vacuous: a FisherLoRAConfig(compress_keep=) call and an old exporter are caught
    deprecated = _deprecated_keywords()
    assert "compress_keep" in deprecated["FisherLoRAConfig"] and "out" in deprecated["encode_residual"]
    assert "compress_inplace" in deprecated["LowRankTrainer"] and "calibration_weighting" in deprecated["compress_model"]
