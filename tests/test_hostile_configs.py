"""Hostile-input suite for the PEFT configs (FisherLoRA, WeLoreLRC, SPSFT) and ``compress_model``.

Property (hypothesis over the validated fields, a few at a time, valid and hostile values mixed): an invalid value
raises ``ValueError`` (or ``TypeError`` for a wrong type) whose message names the field; a valid one constructs, and
``get_peft_model`` on a tiny Llama either gives a model whose forward (and backward) is finite, or raises such an
error naming one of the fields set (e.g. a WeLore reduction that the targets cannot reach). ``compress_model`` over
random rank specs either raises a clear ``ValueError`` or leaves a finite model whose ranks are in bounds.

The validity of each value is decided here from the documented contract (the fields' help texts and docstrings),
not from the implementation. Bugs found by this suite are pinned by explicit regression cases at the end (they were
strict ``xfail`` cases until fixed); the property tests draw those inputs too.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from tiny_models import make_tiny_llama
from torch import nn

from hf_lowrank import FisherLoRAConfig, LowRankLinear, SPSFTConfig, WeLoreLRCConfig, compress_model

SETTINGS = settings.get_profile("hostile")  # registered in conftest.py

MORE = settings(SETTINGS, max_examples=max(40, SETTINGS.max_examples))

VALID, INVALID, EITHER, LATE = "valid", "invalid", "either", "late"
"""Verdicts: must construct / must be rejected by the config / anything clear / rejected by get_peft_model at the
latest (fields that peft or the tuner validate against the model)."""


# ---------------------------------------------------------------------------------------------------------------------
# tiny model (built once; every example works on a deep copy)
# ---------------------------------------------------------------------------------------------------------------------


@functools.cache
def _base_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    return make_tiny_llama(seed=0, dtype=dtype)


def fresh_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    return copy.deepcopy(_base_model(dtype))


IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def assert_finite_forward_backward(model: nn.Module) -> None:
    out = model(input_ids=IDS, labels=IDS)
    assert out.logits.shape == (2, 8, 128)
    assert bool(torch.isfinite(out.logits).all()), "non-finite logits"
    assert math.isfinite(out.loss.item())
    if not any(p.requires_grad for p in model.parameters()):
        return  # nothing to train (an edited WeLore rank_map without lrc_modules; fresh ones are refused)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert bool(torch.isfinite(p.grad).all()), f"non-finite gradient in {name}"


def _block_linears() -> dict[str, tuple[int, int]]:
    model = _base_model()
    return {
        n: (m.out_features, m.in_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and re.search(r"(^|\.)\d+\.", n)
    }


def _all_linears() -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in _base_model().named_modules() if isinstance(m, nn.Linear)}


# ---------------------------------------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------------------------------------


def names_field(msg: str, name: str) -> bool:
    """``name`` (or ``name`` with spaces for underscores, as peft writes "target modules") as a whole word."""
    low = msg.lower()
    name = name.lower()
    return any(
        re.search(rf"(?<![a-z0-9]){re.escape(form)}(?![a-z0-9])", low) for form in {name, name.replace("_", " ")}
    )


def assert_clear(exc: BaseException, names, types=(ValueError, TypeError)) -> None:
    assert isinstance(exc, types), f"expected {[t.__name__ for t in types]}, got {type(exc).__name__}: {exc}"
    msg = str(exc)
    assert msg.strip(), f"{type(exc).__name__} with an empty message"
    assert any(names_field(msg, n) for n in names), f"message names none of {list(names)}: {msg!r}"


# ---------------------------------------------------------------------------------------------------------------------
# hostile values and per-field contracts
# ---------------------------------------------------------------------------------------------------------------------

HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "auto", "row", "keep", "l2", "float16", "lora", "nope", "0.5", "NONE"]),
    st.just([]),
    st.just({}),
    st.lists(st.integers(0, 3), max_size=2),
)


def mostly(valid, invalid=HOSTILE):
    """About three valid draws for two hostile ones."""
    return st.sampled_from([True, True, True, False, False]).flatmap(lambda ok: valid if ok else invalid)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _choice(options) -> Callable:
    def oracle(v):
        try:
            return VALID if v in options and isinstance(v, (str, type(None))) else INVALID
        except TypeError:  # unhashable: not a member
            return INVALID

    return oracle


def _none_or(check: Callable[[object], str]) -> Callable:
    return lambda v: VALID if v is None else check(v)


def _int_at_least_1(v) -> str:
    return VALID if _is_int(v) and v >= 1 else INVALID


def _fraction(lo_open: bool, hi_closed: bool) -> Callable:
    def oracle(v):
        if not _is_number(v) or not math.isfinite(v):
            return INVALID
        ok_lo = v > 0 if lo_open else v >= 0
        ok_hi = v <= 1 if hi_closed else v < 1
        return VALID if ok_lo and ok_hi else INVALID

    return oracle


def _finite_number(minimum: float, strict: bool) -> Callable:
    def oracle(v):
        if isinstance(v, bool):
            return EITHER  # bool is an int to Python; accepting True as 1 is tolerable
        if not _is_number(v) or not math.isfinite(v):
            return INVALID
        return VALID if (v > minimum if strict else v >= minimum) else INVALID

    return oracle


@dataclass(frozen=True)
class Field:
    strategy: st.SearchStrategy
    oracle: Callable[[object], str]


def _rank_pattern_fisher(v) -> str:
    if not isinstance(v, dict):
        return INVALID
    ok = all(_is_int(x) and x >= 1 or isinstance(x, float) and 0 < x <= 1 for x in v.values())
    return VALID if ok else INVALID


FISHER_FIELDS = {
    "r": Field(mostly(st.integers(1, 64)), _int_at_least_1),
    "lora_alpha": Field(
        mostly(st.one_of(st.integers(1, 64), st.floats(0.5, 64.0))),
        lambda v: VALID if _is_number(v) and math.isfinite(v) else INVALID,  # the scale is lora_alpha / r
    ),
    "compress_rank": Field(mostly(st.integers(1, 64)), _none_or(_int_at_least_1)),
    "compress_keep": Field(mostly(st.floats(1e-6, 1.0)), _none_or(_fraction(lo_open=True, hi_closed=True))),
    "compress_rank_pattern": Field(
        mostly(
            st.dictionaries(
                st.sampled_from(["q_proj", "layers.0.self_attn.v_proj", ".*mlp.*"]),
                mostly(st.one_of(st.integers(1, 64), st.floats(1e-3, 1.0))),
                max_size=3,
            )
        ),
        _rank_pattern_fisher,
    ),
    "fisher_source": Field(mostly(st.sampled_from(["lora", "full", "none"])), _choice(("lora", "full", "none"))),
    "fisher_weighting": Field(mostly(st.sampled_from(["row", "two_sided"])), _choice(("row", "two_sided"))),
    "fisher_exponent": Field(mostly(st.floats(0.0, 10.0)), _finite_number(0.0, strict=False)),
    "fisher_eps": Field(mostly(st.floats(1e-12, 10.0)), _finite_number(0.0, strict=True)),
    "compress_dtype": Field(
        mostly(st.sampled_from([None, "float32", "float16", "bfloat16"])),
        _none_or(_choice(("float32", "float16", "bfloat16"))),
    ),
    "compress_svd_method": Field(
        mostly(st.sampled_from(["auto", "exact", "randomized"])), _choice(("auto", "exact", "randomized"))
    ),
}


def _compiles(key) -> bool:
    try:
        re.compile(key)
    except (re.error, TypeError):
        return False
    return True


def _rank_pattern_welore(v) -> str:
    if v is None:
        return VALID
    if not isinstance(v, dict):
        return INVALID
    ok = all(isinstance(k, str) and k and _compiles(k) for k in v) and all(_is_int(x) and x >= 1 for x in v.values())
    return VALID if ok else INVALID


WELORE_TARGETS_OK = [None, "all-linear", ["q_proj"], ["k_proj", "up_proj"], ".*mlp.*", "model.layers.0.*"]
WELORE_TARGETS_BAD = [["nope"], "", "zzz", ["q_proj", "nope"]]

WELORE_FIELDS = {
    "reduction": Field(mostly(st.floats(0.05, 0.95)), _fraction(lo_open=True, hi_closed=False)),
    "lrc_ratio": Field(mostly(st.floats(0.05, 1.0)), _fraction(lo_open=True, hi_closed=True)),
    "nlrc": Field(mostly(st.sampled_from(["keep", "truncate"])), _choice(("keep", "truncate"))),
    "svd_method": Field(
        mostly(st.sampled_from(["auto", "exact", "randomized"])), _choice(("auto", "exact", "randomized"))
    ),
    "rank_pattern": Field(
        mostly(
            st.dictionaries(
                # regex keys, one that does not compile (a former bug, see test_welore_rank_pattern_bad_regex)
                st.sampled_from(["q_proj", "k_proj", "layers.0.mlp.up_proj", "nope", "up_proj|down_proj", "("]),
                mostly(st.integers(1, 70), st.sampled_from([0, -1, 2.5, "4", None, True])),
                max_size=2,
            )
        ),
        _rank_pattern_welore,
    ),
    "target_modules": Field(
        st.sampled_from(WELORE_TARGETS_OK + WELORE_TARGETS_BAD),
        lambda v: VALID if v in WELORE_TARGETS_OK else LATE,
    ),
    "keep_dense": Field(st.booleans(), lambda v: VALID),
}

SPSFT_TARGETS_OK = [None, "all-linear", ["q_proj"], ["q_proj", "v_proj"], ["down_proj"]]
SPSFT_TARGETS_BAD = [["nope"], [], "", ["q_proj", "nope"], ".*mlp", "(", 5, ["q_proj", 5]]
SPSFT_LAYERS = [None, 0, 1, [0], [0, 1], [99], -1, [5, 7], "a", [0, "1"], [-1]]


def _spsft_layers(v) -> str:
    if v is None:
        return VALID
    idx = [v] if _is_int(v) else v
    if not isinstance(idx, list) or not all(_is_int(i) and i >= 0 for i in idx):
        return INVALID  # documented: a layer index or a list of them (ints >= 0)
    return VALID if all(i < 2 for i in idx) else LATE  # indices the model lacks: refused by get_peft_model


def _spsft_targets(v) -> str:
    if v in SPSFT_TARGETS_OK:
        return VALID
    if isinstance(v, str):
        return LATE if _compiles(v) else INVALID  # a regex string must compile
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return LATE  # names the model may lack
    return INVALID


SPSFT_FIELDS = {
    "r": Field(mostly(st.integers(1, 64)), _none_or(_int_at_least_1)),
    "ratio": Field(mostly(st.floats(1e-4, 1.0)), _none_or(_fraction(lo_open=True, hi_closed=True))),
    "importance": Field(
        mostly(st.sampled_from(["l2", "taylor", "qm_taylor"])), _choice(("l2", "taylor", "qm_taylor"))
    ),
    "target_modules": Field(st.sampled_from(SPSFT_TARGETS_OK + SPSFT_TARGETS_BAD), _spsft_targets),
    "exclude_modules": Field(
        st.sampled_from([None, ["q_proj"], ["nope"], ".*", ".*mlp.*"]),
        lambda v: LATE if v == ".*" else VALID,
    ),
    "layers_to_transform": Field(st.sampled_from(SPSFT_LAYERS), _spsft_layers),
    "layers_pattern": Field(st.sampled_from([None, "", "layers"]), lambda v: VALID),  # rule: see interactions
    "init_weights": Field(st.booleans(), lambda v: VALID),
}


def _interactions(cls, values: dict) -> list[tuple[str, tuple[str, ...]]]:
    """Rules between fields, from the docs: (verdict, fields to name)."""
    rules = []
    if cls is FisherLoRAConfig and values.get("compress_rank") is not None and values.get("compress_keep") is not None:
        rules.append((INVALID, ("compress_rank", "compress_keep")))
    if cls is FisherLoRAConfig:  # documented: the scale lora_alpha / r must stay finite in float16
        alpha, r = values.get("lora_alpha", 8), values.get("r", 4)
        if _is_number(alpha) and math.isfinite(alpha) and _is_int(r) and r >= 1 and abs(alpha) / r > 65504:
            rules.append((INVALID, ("lora_alpha",)))
    if cls is SPSFTConfig:
        if values.get("r") is not None and values.get("ratio") is not None:
            rules.append((INVALID, ("r", "ratio")))
        if values.get("layers_pattern") and values.get("layers_to_transform") is None:
            rules.append((INVALID, ("layers_pattern", "layers_to_transform")))
        tm = values.get("target_modules")
        if isinstance(tm, str) and tm.lower() != "all-linear" and values.get("layers_to_transform") is not None:
            rules.append((INVALID, ("layers_to_transform", "target_modules")))
    return rules


BASE_KWARGS = {
    FisherLoRAConfig: {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    WeLoreLRCConfig: {"progress": False},
    SPSFTConfig: {},
}
# fields whose value may legitimately make get_peft_model refuse a config that constructs (unreachable WeLore
# reductions, SPSFT rows beyond a module's outputs, targets not in the model, ...)
LATE_NAMES = {
    FisherLoRAConfig: ("target_modules",),
    WeLoreLRCConfig: ("reduction", "lrc_ratio", "rank_pattern", "target_modules"),
    SPSFTConfig: ("r", "target_modules"),
}


def check_config(cls, fields: dict[str, Field], values: dict) -> None:
    verdicts = [(fields[k].oracle(v), (k,)) for k, v in values.items()] + _interactions(cls, values)
    invalid = [n for v, names in verdicts if v == INVALID for n in names]
    late = [n for v, names in verdicts if v == LATE for n in names]
    either_names = [n for v, names in verdicts if v == EITHER for n in names]
    either = bool(either_names)
    kwargs = {**BASE_KWARGS[cls], **values}
    # a message may name the offending value instead of the field ("Unknown target module 'nope'")
    quoted = [x for v in values.values() for x in (v if isinstance(v, list) else [v]) if isinstance(x, str) and x]
    try:
        config = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        assert invalid or late or either, f"valid {values!r} rejected: {exc}"
        # the config may stop at any field it may refuse (an 'either' one too, e.g. fisher_eps=False)
        assert_clear(exc, [*invalid, *late, *either_names] or list(values))
        event(f"{cls.__name__}: rejected by the config")
        return
    assert not invalid, f"invalid {invalid} accepted: {values!r}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = get_peft_model(fresh_model(), config)
        except (ValueError, TypeError) as exc:
            assert_clear(exc, [*late, *values, *LATE_NAMES[cls], *quoted])
            event(f"{cls.__name__}: refused by get_peft_model")
            return
    assert not late, f"{late} should be refused by get_peft_model: {values!r}"
    assert_finite_forward_backward(model)
    event(f"{cls.__name__}: valid, finite")


def field_values(fields: dict[str, Field]):
    @st.composite
    def strategy(draw):
        chosen = draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True))
        return {k: draw(fields[k].strategy, label=k) for k in chosen}

    return strategy()


@MORE
@given(values=field_values(FISHER_FIELDS))
def test_fisher_lora_config_fields(values):
    check_config(FisherLoRAConfig, FISHER_FIELDS, values)


@MORE
@given(values=field_values(WELORE_FIELDS))
def test_welore_config_fields(values):
    check_config(WeLoreLRCConfig, WELORE_FIELDS, values)


@MORE
@given(values=field_values(SPSFT_FIELDS))
def test_spsft_config_fields(values):
    check_config(SPSFTConfig, SPSFT_FIELDS, values)


@SETTINGS
@given(
    rank_map=mostly(
        st.dictionaries(
            st.sampled_from(["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "nope"]),
            mostly(st.integers(1, 80), st.sampled_from([0, -1, 2.5, True, "3"])),
            min_size=1,
            max_size=2,
        ),
        HOSTILE,  # includes {} (a former bug, see test_welore_empty_rank_map)
    ),
    lrc=st.sampled_from([None, None, [], ["model.layers.0.self_attn.q_proj"], ["model.layers.0.self_attn.q_proj"]]),
)
def test_welore_resolved_fields_from_an_edited_adapter_config(rank_map, lrc):
    """rank_map / lrc_modules come from adapter_config.json: an edited or corrupted file must fail clearly."""
    kwargs = {"progress": False, "rank_map": rank_map, "lrc_modules": lrc}
    try:
        config = WeLoreLRCConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        assert_clear(exc, ["rank_map", "lrc_modules"])
        event("rejected by the config")
        return
    ok_map = rank_map is None or (isinstance(rank_map, dict) and all(_is_int(v) and v >= 1 for v in rank_map.values()))
    assert ok_map, f"rank_map {rank_map!r} accepted"
    assert rank_map is not None or lrc is None, "lrc_modules without rank_map accepted"
    assert rank_map is None or all(n in rank_map for n in lrc or []), "lrc_modules outside rank_map accepted"
    shapes = _all_linears()
    fits = rank_map is None or all(n in shapes and r <= min(shapes[n]) for n, r in rank_map.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = get_peft_model(fresh_model(), config)
        except (ValueError, TypeError) as exc:
            assert (
                not fits or rank_map is not None and not lrc and all(r == min(shapes[n]) for n, r in rank_map.items())
            ), f"fitting rank_map refused: {exc}"
            assert_clear(exc, ["rank_map", "lrc_modules", "adapter", "reduction", "low-rank component"])
            event("refused by get_peft_model")
            return
    assert fits, f"rank_map {rank_map!r} does not fit the model but was accepted"
    assert_finite_forward_backward(model)
    event("valid, finite")


# ---------------------------------------------------------------------------------------------------------------------
# compress_model over random rank specs
# ---------------------------------------------------------------------------------------------------------------------

DICT_KEYS = [*list(_block_linears())[:4], "lm_head", "q_proj", "nope", "model.embed_tokens", "model.layers.1.mlp"]

RANK_SPECS = st.one_of(
    st.integers(-3, 80),
    st.integers(1, 32),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(1e-6, 1.0),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(1, 8), max_size=2),
    st.dictionaries(
        st.sampled_from(DICT_KEYS),
        mostly(
            st.integers(1, 32), st.one_of(st.integers(-2, 80), st.floats(-1, 2), st.booleans(), st.text(max_size=2))
        ),
        max_size=3,
    ),
)


def _expected_ranks(spec) -> dict[str, int] | None:
    """The documented meaning of a rank spec on the tiny Llama; None when it must be refused."""
    targets = _block_linears()
    linears = _all_linears()
    if isinstance(spec, dict):
        if not spec or any(k not in linears for k in spec):
            return None
        out = {}
        for k, r in spec.items():
            if not (_is_int(r) and 1 <= r <= min(linears[k])):
                return None
            out[k] = r
        return out
    if _is_int(spec):
        return dict.fromkeys(targets, spec) if all(1 <= spec <= min(s) for s in targets.values()) else None
    if isinstance(spec, float) and 0 < spec <= 1:
        floor = {n: max(1, min(min(s), math.floor(spec * s[0] * s[1] / (s[0] + s[1])))) for n, s in targets.items()}
        # rounded down to RANK_MULTIPLE; the fill may then raise a rank by one step (checked in the test)
        return {n: r // 8 * 8 if r >= 8 else r for n, r in floor.items()}
    return None


@MORE
@given(spec=RANK_SPECS, dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
def test_compress_model_rank_specs(spec, dtype):
    expected = _expected_ranks(spec)
    model = fresh_model(dtype)
    shapes = _all_linears()
    try:
        report = compress_model(model, spec, progress=False)
    except ValueError as exc:
        assert expected is None, f"valid spec {spec!r} refused: {exc}"
        assert_clear(exc, ["rank", "ranks", *(spec if isinstance(spec, dict) else [])], types=(ValueError,))
        event("refused")
        return
    assert expected is not None, f"invalid spec {spec!r} accepted"
    event("compressed")
    by_name = {m.name: m for m in report.modules}
    assert set(by_name) == set(expected)
    for name, rank in expected.items():
        out_f, in_f = shapes[name]
        module = model.get_submodule(name)
        m = by_name[name]
        assert m.params_after <= m.params_before
        if isinstance(spec, float) and m.rank is not None and m.rank == rank + 8:
            rank = m.rank  # filled: one step above the rounded-down rank, within the budget (checked below)
        if rank * (out_f + in_f) < out_f * in_f:  # saves parameters: factorized at exactly that rank
            assert m.skipped is None and m.rank == rank
            assert isinstance(module, LowRankLinear) and module.rank == rank
            assert module.down.weight.dtype == dtype
            assert m.rel_error is not None and math.isfinite(m.rel_error) and 0 <= m.rel_error <= 1.05
        else:  # documented: left dense and reported as skipped
            assert m.skipped is not None and isinstance(module, nn.Linear)
    if isinstance(spec, float):  # the fill spends only what the budget leaves after the modules it does not round
        fixed = [m for m in report.modules if m.rank is None or m.rank < 8]
        over = sum(m.params_after - spec * m.params_before for m in fixed)
        assert sum(m.params_after for m in report.modules) <= spec * sum(m.params_before for m in report.modules) \
            + max(over, 0) + sum(m.shape[0] for m in report.modules) + 1e-6  # biases are not in the rank budget
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert bool(torch.isfinite(logits).all())


# ---------------------------------------------------------------------------------------------------------------------
# regressions: explicit cases for bugs this suite found (strict xfails until they were fixed)
# ---------------------------------------------------------------------------------------------------------------------


def _expect_clear(call, names, types=(ValueError, TypeError)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001
            assert_clear(exc, names, types=types)
            return
    raise AssertionError(f"expected an error naming {names}, got {result!r:.200}")


@pytest.mark.parametrize("r", [2.5, "4", None])
def test_fisher_lora_rejects_non_integer_r(r):
    _expect_clear(lambda: get_peft_model(fresh_model(), FisherLoRAConfig(r=r, target_modules=["q_proj"])), ["r"])


@pytest.mark.parametrize("alpha", [math.nan, math.inf, 1.3611294271189346e39], ids=["nan", "inf", "scale-overflow"])
def test_fisher_lora_rejects_non_finite_alpha(alpha):  # the last one was found by a 1000-example randomized run
    def call():
        model = get_peft_model(fresh_model(), FisherLoRAConfig(r=4, lora_alpha=alpha, target_modules=["q_proj"]))
        assert_finite_forward_backward(model)
        return model

    _expect_clear(call, ["lora_alpha"])


@pytest.mark.parametrize(
    "call",
    [
        lambda: get_peft_model(fresh_model(), WeLoreLRCConfig(target_modules="(", progress=False)),
        lambda: get_peft_model(fresh_model(), WeLoreLRCConfig(target_modules=5, progress=False)),
        lambda: get_peft_model(fresh_model(), WeLoreLRCConfig(target_modules=[], progress=False)),
        lambda: compress_model(fresh_model(), 4, target_modules="(", progress=False),
        lambda: compress_model(fresh_model(), 4, target_modules=[], progress=False),
    ],
    ids=["welore-bad-regex", "welore-int", "welore-empty-list", "compress-bad-regex", "compress-empty-list"],
)
def test_target_modules_validated(call):
    _expect_clear(call, ["target_modules"])


def test_welore_rank_pattern_bad_regex():
    _expect_clear(
        lambda: get_peft_model(fresh_model(), WeLoreLRCConfig(rank_pattern={"(": 2}, progress=False)),
        ["rank_pattern"],
    )


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"reduction": 0.01}, "Raise reduction to at least"),  # below the smallest step WeLore reaches here (4.30%)
        ({"reduction": 0.3, "rank_pattern": {"up_proj|down_proj": 10}}, "Set reduction to at most"),  # in a gap
    ],
    ids=["1%", "gap"],
)
def test_welore_unreachable_reduction_message_gives_the_right_fix(kwargs, fix):
    """An unreachable reduction is refused (welore_allocation), and the message points the right way."""
    with pytest.raises(ValueError, match="cannot be reached") as info:
        get_peft_model(fresh_model(), WeLoreLRCConfig(progress=False, **kwargs))
    msg = str(info.value)
    assert fix in msg, msg
    assert "Lower reduction" not in msg, msg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"target_modules": "("}, "target_modules"),
        ({"layers_to_transform": "a"}, "layers_to_transform"),
        ({"target_modules": ["q_proj", "nope"]}, "target_modules"),  # found by a 300-example randomized run
    ],
    ids=["bad-regex", "layers-str", "one-unknown-name"],
)
def test_spsft_validates_targets(kwargs, field):
    _expect_clear(lambda: get_peft_model(fresh_model(), SPSFTConfig(**kwargs)), [field])


@pytest.mark.parametrize("key", [0, None, ("a", "b")], ids=["int", "None", "tuple"])
def test_compress_model_rank_dict_with_non_string_key(key):
    _expect_clear(lambda: compress_model(fresh_model(), {key: 4}, progress=False), ["rank", "ranks"], (ValueError,))


def test_compress_model_dtype_option_gives_a_usable_model():
    """compress_model's docstring: the factor dtype may differ from the model's (forward casts in and out)."""
    model = fresh_model()
    compress_model(model, 4, dtype=torch.float16, progress=False)
    factors = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert factors and all(p.dtype == torch.float16 for m in factors for p in m.parameters())
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())


def test_welore_empty_rank_map():
    _expect_clear(lambda: get_peft_model(fresh_model(), WeLoreLRCConfig(rank_map={}, progress=False)), ["rank_map"])


def test_welore_empty_cache_dir_writes_nothing_to_cwd(tmp_path, monkeypatch):
    """``spectra_cache_dir=""`` is documented valid: memory only, never the current directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_LOWRANK_SPECTRA_CACHE", str(tmp_path / "env-cache"))  # '' wins over the environment
    model = get_peft_model(fresh_model(), WeLoreLRCConfig(spectra_cache_dir="", progress=False))
    assert_finite_forward_backward(model)
    assert not list(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("reduction", [0.1, 0.3])
def test_welore_truncate_without_lrc_has_something_to_train(reduction):
    """nlrc='truncate' reaching the target by truncating N-LRCs alone (as it does on this model at both reductions)
    would leave nothing to train: get_peft_model refuses, naming the fixes, instead of returning a frozen model."""
    config = WeLoreLRCConfig(nlrc="truncate", reduction=reduction, progress=False)
    with pytest.raises(ValueError, match="leaves no low-rank component") as info:
        get_peft_model(fresh_model(), config)
    assert_clear(info.value, ["reduction", "lrc_ratio", "low-rank component"], types=(ValueError,))
    assert "raise lrc_ratio" in str(info.value) and "nlrc='keep'" in str(info.value)
