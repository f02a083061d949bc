"""Old module paths, kept importable for one release: each resolves to the module object at its new path.

A ``sys.meta_path`` finder placed first maps an old dotted prefix (``hf_lowrank.peft_configs`` ->
``hf_lowrank.tuners``) to the new module and emits a ``DeprecationWarning`` naming the new path, so
``from hf_lowrank.peft_configs.fisher_lora.config import FisherLoRAConfig`` gives the very class of
``hf_lowrank.tuners.fisher_lora.config`` (no second copy of any module is created). The package itself imports only
the new paths (``tests/test_import_graph.py`` checks it).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

#: old module (or package prefix) -> new module; the longest matching prefix wins
MOVED = {
    "hf_lowrank.statistics": "hf_lowrank.calibration.grams",
    "hf_lowrank.calibration_inputs": "hf_lowrank.calibration.inputs",
    "hf_lowrank.fisher_state": "hf_lowrank.fisher.state",
    "hf_lowrank.compression.fisher_sides": "hf_lowrank.fisher.sides",
    "hf_lowrank.peft_configs": "hf_lowrank.tuners",
    "hf_lowrank.peft_configs.fisher_lora.fisher": "hf_lowrank.fisher.collector",
    "hf_lowrank.peft_configs.fisher_lora.sides": "hf_lowrank.fisher.sides",
    "hf_lowrank.peft_configs.fisher_lora.walk": "hf_lowrank.fisher.walk",
    "hf_lowrank.trainer_mixins": "hf_lowrank.trainer",
    "hf_lowrank.model_card": "hf_lowrank.cards",
    "hf_lowrank.compression.ere.card": "hf_lowrank.cards",
    "hf_lowrank.bundled": "hf_lowrank.demo.wordnet",
    "hf_lowrank.offline": "hf_lowrank.demo.models",
    "hf_lowrank.evaluation": "hf_lowrank.demo.evaluation",
    "hf_lowrank.plotting": "hf_lowrank.demo.plotting",
    "hf_lowrank.lm_eval_cli": "hf_lowrank.cli.commands.lm_eval",
    "hf_lowrank.cli.plot": "hf_lowrank.cli.commands.plot",
    "hf_lowrank.cli.residual": "hf_lowrank.cli.commands.residual",
}
_BY_LENGTH = sorted(MOVED, key=len, reverse=True)
_SKIP = (os.path.dirname(importlib.__file__), "<frozen importlib", os.path.abspath(__file__))


def new_name(fullname: str) -> str | None:
    """The new dotted path of an old one, or None when ``fullname`` did not move."""
    for old in _BY_LENGTH:
        if fullname == old or fullname.startswith(old + "."):
            return MOVED[old] + fullname[len(old):]
    return None


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = new_name(spec.name)
        # point the warning at the importing line: count the frames of this file and of importlib's Python part
        # (``warnings`` itself steps over the frozen ``importlib._bootstrap`` frames once stacklevel > 1)
        frame, level = sys._getframe(0), 1
        while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
            if not frame.f_code.co_filename.startswith("<frozen importlib"):
                level += 1
            frame = frame.f_back
        warnings.warn(
            f"{spec.name} moved to {new}: import it from there ({spec.name} goes in the next release)",
            DeprecationWarning,
            stacklevel=level,
        )
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        """The new module is already executed: nothing to run."""


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), ahead of the path finder that would load a second copy."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
