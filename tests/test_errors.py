"""One root for every error the package defines: ``hf_lowrank.errors.HfLowRankError``.

Every exception class defined anywhere in ``hf_lowrank`` (found by importing each module, and by reading the source
for the modules whose optional dependency is not installed) derives from it and keeps its builtin base, and the old
import locations still export the same class objects.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import hf_lowrank
from hf_lowrank import errors

ROOT = Path(hf_lowrank.__file__).parent


def _exception_classes():
    found = {}
    for info in pkgutil.walk_packages(hf_lowrank.__path__, "hf_lowrank."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as exc:  # an optional extra (vllm) that is not installed
            assert not (exc.name or "").startswith("hf_lowrank"), exc
            continue
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_public_exception_class_of_the_package_derives_from_the_root():
    classes = _exception_classes()
    public = {k: v for k, v in classes.items() if not k.rsplit(".", 1)[1].startswith("_")}
    assert len(public) >= 14, sorted(public)  # the root and the 13 errors
    outside = sorted(k for k, v in public.items() if not issubclass(v, errors.HfLowRankError))
    assert not outside, f"{outside} do not derive from hf_lowrank.errors.HfLowRankError"


def test_errors_are_defined_in_errors_py_only():
    # read from the source, so modules whose optional dependency is missing are covered too; a private control-flow
    # exception that never leaves its module (sequential._StopForward) is allowed
    defined_elsewhere = []
    for path in ROOT.rglob("*.py"):
        if path.name == "errors.py" and path.parent == ROOT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if node.name.endswith(("Error", "Exception")) or bases & {"Exception", "ValueError", "RuntimeError"}:
                    defined_elsewhere.append(f"{path.relative_to(ROOT)}::{node.name}")
    assert not defined_elsewhere, f"define {defined_elsewhere} in hf_lowrank/errors.py"


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("UpstreamChangedError", RuntimeError), ("SVDError", RuntimeError), ("SaveConflictError", RuntimeError),
        ("OfflineModelError", RuntimeError), ("CompressedCheckpointError", ValueError),
        ("FisherStateError", ValueError), ("ResidualError", ValueError), ("ResidualFormatError", ValueError),
        ("BaseMismatchError", ValueError), ("DenseWeightDroppedError", ValueError),
        ("WhitenedFactorsNeedCalibrationError", ValueError), ("QuantizedMergeError", ValueError),
        ("CliError", Exception),
    ],
)
def test_each_error_keeps_its_builtin_base_and_is_caught_by_the_root(name, builtin):
    cls = getattr(errors, name)
    assert issubclass(cls, builtin) and issubclass(cls, errors.HfLowRankError)
    for catch in (builtin, errors.HfLowRankError):
        with pytest.raises(catch):
            raise cls("x")


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("hf_lowrank._compat", ["UpstreamChangedError"]),
        ("hf_lowrank.ops.svd", ["SVDError"]),
        ("hf_lowrank.io", ["SaveConflictError"]),
        ("hf_lowrank.demo.models", ["OfflineModelError"]),
        ("hf_lowrank.compression.checkpoint_checks", ["CompressedCheckpointError"]),
        ("hf_lowrank.fisher.state", ["FisherStateError"]),
        ("hf_lowrank.compression.ere.format", ["ResidualError", "ResidualFormatError", "BaseMismatchError"]),
        ("hf_lowrank.tuners.welore.layer", ["DenseWeightDroppedError", "WhitenedFactorsNeedCalibrationError"]),
        ("hf_lowrank.tuners.spsft.layer", ["QuantizedMergeError"]),
        ("hf_lowrank.cli", ["CliError"]),
    ],
)
def test_old_import_locations_export_the_same_classes(module, names):
    mod = importlib.import_module(module)
    for name in names:
        assert getattr(mod, name) is getattr(errors, name)
