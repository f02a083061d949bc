"""Old module paths still import for one release: the same module objects as the new paths, with a
``DeprecationWarning`` that names the new path."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

import hf_lowrank


def _import_fresh(name: str):
    """Import ``name`` with the old alias (and its old parents) dropped from ``sys.modules``, recording warnings."""
    old_parts = name.split(".")
    for i in range(2, len(old_parts) + 1):
        sys.modules.pop(".".join(old_parts[:i]), None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    return module, [w for w in caught if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize(
    "old, new",
    [
        ("hf_lowrank.peft_configs.fisher_lora.config", "hf_lowrank.tuners.fisher_lora.config"),
        ("hf_lowrank.peft_configs.fisher_lora.fisher", "hf_lowrank.fisher.collector"),
        ("hf_lowrank.statistics", "hf_lowrank.calibration.grams"),
        ("hf_lowrank.offline", "hf_lowrank.demo.models"),
        ("hf_lowrank.trainer_mixins.callbacks", "hf_lowrank.trainer.callbacks"),
        ("hf_lowrank.compression.ere.card", "hf_lowrank.cards"),
    ],
)
def test_an_old_deep_path_is_the_new_module_with_a_warning_naming_it(old, new):
    module, caught = _import_fresh(old)
    assert module is importlib.import_module(new)
    assert any(new in str(w.message) and old in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in caught), [w.filename for w in caught]  # points at the importer


def test_a_class_imported_from_an_old_path_is_the_new_class():
    sys.modules.pop("hf_lowrank.peft_configs.fisher_lora.config", None)
    with pytest.warns(DeprecationWarning, match=r"hf_lowrank\.tuners\.fisher_lora\.config"):
        from hf_lowrank.peft_configs.fisher_lora.config import FisherLoRAConfig
    from hf_lowrank.tuners.fisher_lora.config import FisherLoRAConfig as New

    assert FisherLoRAConfig is New is hf_lowrank.FisherLoRAConfig


def test_an_old_submodule_name_on_the_package_resolves_too():
    sys.modules.pop("hf_lowrank.bundled", None)
    with pytest.warns(DeprecationWarning, match=r"hf_lowrank\.demo\.wordnet"):
        from hf_lowrank import bundled
    from hf_lowrank.demo import wordnet

    assert bundled is wordnet


def test_a_path_that_never_existed_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("hf_lowrank.peft_configs.no_such_module")
