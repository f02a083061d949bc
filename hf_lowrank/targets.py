"""THE one rule for "which modules", used by every method, the compression entry points and the CLI.

Each concept has one meaning, and where peft defines it, it is peft's (its own functions are called, not copied):

- **A target spec** (``target_modules``, ``exclude_modules``, ERE's ``store_exact``): peft's
  ``check_target_module_exists``. A string is a regular expression that must match the *full* module name; a list
  matches a module whose name equals an entry or ends with ``"." + entry``. See :func:`module_matches`.
- **A pattern key** (``rank_pattern`` / ``alpha_pattern`` of every config, FisherLoRA's ``compress_rank_pattern``
  included): peft's ``get_pattern_key``. A key is a regular expression matched against the *end* of the name on a
  dot boundary (``"up_proj|down_proj"`` matches ``model.layers.0.mlp.up_proj``); the first matching key wins. See
  :func:`pattern_key`.
- **"all-linear"** (any case): peft's expansion, every ``nn.Linear`` / ``Conv1D`` except, on a ``PreTrainedModel``,
  its output embeddings (the LM head), and with ``task_type="SEQ_CLS"`` its classification head. It is the same for
  SPSFT, WeLoreLRC, ``compress_model`` and ERE. See :func:`all_linear_names`.
- **The default** (``target_modules=None``) of ``compress_model``, WeLoreLRC and FisherLoRA's full-gradient Fisher
  is *not* "all-linear" but **the Linear layers inside the repeated blocks**: a module whose path has a numeric
  component that is not its last one (``model.layers.3.mlp.up_proj``, ``h.0.attn.c_attn``); embeddings, heads and
  poolers are left alone. The block index is the first (outermost) such component. See :func:`block_index`. SPSFT's
  default is peft's "all-linear", like LoRA's.
- **Prefix resolution**: a recorded name maps onto a model directly, with a head / backbone prefix
  (``base_model_prefix``, e.g. ``bert``) stripped, or with it added, tried in the order given. A PeftModel's names
  carry :data:`PEFT_PREFIX` (``base_model.model.``) before the base model's. See :func:`resolve_name`.
- **The CLI's ``--target-modules``**: ``all-linear``, a regex when the value holds a regex metacharacter other than
  ``.`` (``.*mlp.*``), else comma-separated names (``q_proj,v_proj``). See :func:`parse_targets`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from types import SimpleNamespace

from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.other import get_pattern_key
from torch import nn

from .modules import LowRankLinear, is_conv1d
from .tuners._registry import peft_all_linear_names

__all__ = [
    "ALL_LINEAR",
    "PEFT_PREFIX",
    "TARGETS_HELP",
    "all_linear_names",
    "block_index",
    "check_pattern_key",
    "find_linears",
    "find_target_linears",
    "in_block",
    "is_all_linear",
    "is_linear",
    "module_matches",
    "parse_targets",
    "pattern_key",
    "resolve_name",
    "strip_peft_prefix",
]

ALL_LINEAR = INCLUDE_LINEAR_LAYERS_SHORTHAND
PEFT_PREFIX = "base_model.model."
_BLOCK = re.compile(r"^(?:(?P<prefix>.*?)\.)?(?P<index>\d+)\.(?P<kind>.+)$")
_REGEX_CHARS = set("\\*[]()^$|+?{}")
TARGETS_HELP = "'all-linear' (peft's), a regex (any of \\*[]()^$|+?{}), or comma-separated module names/suffixes"


# ------------------------------------------------------------------------------------------------ name rules
def is_all_linear(spec: object) -> bool:
    """Whether ``spec`` is peft's ``"all-linear"`` shorthand (compared case-insensitively, as peft does)."""
    return isinstance(spec, str) and spec.lower() == ALL_LINEAR


def module_matches(name: str, spec: str | Iterable[str] | None) -> bool:
    """peft's target rule: a regex string fully matching ``name``, or a list entry equal to it or a dotted suffix.

    ``None`` (no spec) matches nothing. A regex that does not compile raises ``re.error``.
    """
    if spec is None:
        return False
    if not isinstance(spec, str):
        spec = set(spec)
    config = SimpleNamespace(target_modules=spec, target_parameters=None, layers_to_transform=None)
    return bool(check_target_module_exists(config, name))


def pattern_key(pattern: Mapping[str, object] | Sequence[str] | None, name: str) -> str | None:
    """The first key of ``pattern`` that peft's ``get_pattern_key`` matches ``name`` with (a regex on the end of the
    name, on a dot boundary), or ``None``. A key that does not compile raises ``ValueError`` naming it."""
    keys = list(pattern or ())
    if not keys:
        return None
    for key in keys:
        check_pattern_key(key)
    key = get_pattern_key(keys, name)
    return key if key in keys else None


def check_regex(pattern: str, label: str, fix: str) -> None:
    """``ValueError`` "<label> is not a valid regular expression (<why>). <fix>" when ``pattern`` does not compile."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{label} is not a valid regular expression ({exc}). {fix}") from None


def check_pattern_key(key: object, what: str = "rank_pattern") -> str:
    """``key`` if it is a non-empty string peft can use as a pattern key; else ``ValueError`` naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} keys must be non-empty regex strings, got the key {key!r}.")
    try:
        get_pattern_key([key], "")
    except re.error as exc:
        raise ValueError(
            f"{what} key {key!r} is not a valid regular expression ({exc}); escape special characters "
            "(re.escape) or fix the pattern."
        ) from None
    return key


def block_index(name: str) -> tuple[str, int, str] | None:
    """``(prefix, index, rest)`` of the first numeric path component that is not the last one, else ``None``.

    ``model.layers.3.self_attn.q_proj`` -> ``("model.layers", 3, "self_attn.q_proj")``; ``0.fc`` -> ``("", 0, "fc")``.
    """
    m = _BLOCK.match(name)
    if m is None:
        return None
    return m.group("prefix") or "", int(m.group("index")), m.group("kind")


def in_block(name: str) -> bool:
    """Whether module ``name`` lives inside a repeated block (see :func:`block_index`)."""
    return _BLOCK.match(name) is not None


def strip_peft_prefix(name: str) -> str:
    """A PeftModel's name (or state-dict key) as the base model's: without a leading :data:`PEFT_PREFIX`."""
    return name.removeprefix(PEFT_PREFIX)


def resolve_name(name: str, names: Mapping[str, object] | Iterable[str], prefixes: Iterable[str]) -> str | None:
    """``name`` as found in ``names``: itself, else with a prefix stripped or added (prefixes tried in order)."""
    if not isinstance(names, (Mapping, set, frozenset)):
        names = set(names)
    if name in names:
        return name
    for prefix in dict.fromkeys(p for p in prefixes if p):
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in names:
            return name[len(prefix) + 1 :]
        if f"{prefix}.{name}" in names:
            return f"{prefix}.{name}"
    return None


def parse_targets(value: str | None) -> str | list[str] | None:
    """The CLI's ``--target-modules``: ``None`` when empty, ``"all-linear"``, a regex when the value holds a regex
    metacharacter other than ``.``, else the comma-separated names (blanks dropped)."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if is_all_linear(value) or _REGEX_CHARS & set(value):
        return value
    return [v.strip() for v in value.split(",") if v.strip()] or None


# ------------------------------------------------------------------------------------------------ module rules
def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (bitsandbytes ones included) or a GPT-2-style ``Conv1D`` (a Linear of weight ``W.T``)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def find_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear / ``Conv1D`` of ``model`` in model order, except the two halves of a ``LowRankLinear``.

    A ``Conv1D`` gets plain ``in_features`` / ``out_features`` attributes (``nx`` / ``nf``) so that it reads like a
    Linear wherever a shape is needed (no parameter, state dict or forward changes).
    """
    linears: dict[str, nn.Module] = {}
    owned = set()
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            owned.update({f"{name}.down", f"{name}.up"})
        elif is_linear(module) and name not in owned:
            if is_conv1d(module):
                module.out_features, module.in_features = module.nf, module.nx
            linears[name] = module
    return linears


def all_linear_names(model: nn.Module, task_type=None) -> set[str]:
    """peft's ``"all-linear"`` on ``model``: every Linear / ``Conv1D`` but the output head (see the module doc)."""
    return peft_all_linear_names(model, task_type)


def find_target_linears(
    model: nn.Module, target_modules: str | Sequence[str] | None = None, *, task_type=None
) -> dict[str, nn.Module]:
    """Linear layers of ``model`` to compress.

    Args:
        model: any torch module (a transformers model, or a peft model's base model).
        target_modules: ``None`` for every Linear inside the repeated transformer blocks (a module path with a
            numeric index such as ``model.layers.3.mlp.up_proj``): embeddings, the LM head, poolers and
            classification heads are left alone. ``"all-linear"`` is peft's: every Linear except the output head
            (and the classification head with ``task_type="SEQ_CLS"``). Another string is a regular expression
            matched against the full module name; a list matches a module whose name equals an entry or ends with
            ``"." + entry`` (peft's rule, :func:`module_matches`). Every list entry must match at least one Linear.
        task_type: only for ``"all-linear"``, as peft's ``task_type``.

    Returns:
        ``{qualified_name: module}`` in model order (bitsandbytes 4/8-bit Linears and transformers ``Conv1D``
        included, see :func:`find_linears` and :func:`hf_lowrank.modules.linear_shape`).

    Raises:
        ValueError: when nothing matches, a list entry names no Linear of the model, ``target_modules`` is not a
            string, a list/tuple/set of strings or ``None``, is an empty list, or is a regex that does not compile.
    """
    _check_target_modules(target_modules)
    linears = find_linears(model)
    if target_modules is None or is_all_linear(target_modules):
        if target_modules is None:
            chosen = {n: m for n, m in linears.items() if in_block(n)}
        else:
            wanted = all_linear_names(model, task_type)
            chosen = {n: m for n, m in linears.items() if n in wanted}
        if not chosen:
            done = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
            if done:
                raise ValueError(
                    f"This model is already compressed ({len(done)} LowRankLinear layers, e.g. '{done[0]}'): no dense "
                    "Linear is left in its transformer blocks. Compress the original model, or decompress it first "
                    "(hf_lowrank.decompress_model(model)) to compress it again."
                )
            what = "inside repeated transformer blocks" if target_modules is None else "for 'all-linear'"
            raise ValueError(
                f"No Linear layer {what} was found; pass target_modules explicitly "
                f"(Linear layers of this model: {_preview(linears)})."
            )
        return chosen
    if isinstance(target_modules, str):
        check_regex(target_modules, f"target_modules {target_modules!r}",
                    "Pass a valid regex matched against full module names, or a list of module names.")
        chosen = {n: m for n, m in linears.items() if module_matches(n, target_modules)}
        if not chosen:
            raise ValueError(
                f"target_modules regex {target_modules!r} matches no Linear layer. Linear layers of this model: "
                f"{_preview(linears)}."
            )
        return chosen
    chosen = {}
    for entry in target_modules:
        hits = {n: m for n, m in linears.items() if module_matches(n, [entry])}
        if not hits:
            raise ValueError(
                f"Unknown target module {entry!r}: no Linear layer is named so or ends with '.{entry}'. "
                f"Linear layers of this model: {_preview(linears)}."
            )
        chosen.update(hits)
    return {n: m for n, m in linears.items() if n in chosen}


def _check_target_modules(target_modules: object) -> None:
    if target_modules is None or isinstance(target_modules, str):
        return
    if not isinstance(target_modules, (list, tuple, set, frozenset)):
        raise ValueError(
            f"target_modules must be None, a regex string or a list of module names, got "
            f"{type(target_modules).__name__} {target_modules!r}."
        )
    if not target_modules:
        raise ValueError(
            "target_modules is an empty list, which selects nothing to compress; name at least one module (e.g. "
            "['q_proj', 'v_proj']) or pass None for every Linear in the transformer blocks."
        )
    bad = [e for e in target_modules if not isinstance(e, str) or not e]
    if bad:
        raise ValueError(
            f"target_modules entries must be non-empty module names (str), got {bad[:5]!r}. Pass e.g. ['q_proj']."
        )


def _preview(names: Mapping[str, object], limit: int = 8) -> str:
    keys = list(names)
    suffixes = sorted({k.rsplit(".", 1)[-1] for k in keys})
    text = ", ".join(suffixes[:limit]) + (", ..." if len(suffixes) > limit else "")
    return f"{len(keys)} in all, short names: {text}" if keys else "none"
