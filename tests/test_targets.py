"""The one rule for "which modules" (hf_lowrank.targets), and the behaviour each former twin now shares."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn

from hf_lowrank import FisherLoRAConfig, SPSFTConfig
from hf_lowrank.demo.plotting import _block_and_kind
from hf_lowrank.targets import (
    PEFT_PREFIX,
    all_linear_names,
    block_index,
    check_pattern_key,
    find_target_linears,
    in_block,
    is_all_linear,
    module_matches,
    parse_targets,
    pattern_key,
    resolve_name,
    strip_peft_prefix,
)
from hf_lowrank.tuners.fisher_lora import plan_ranks
from hf_lowrank.tuners.spsft.model import _block_linear_leaf_names
from hf_lowrank.tuners.welore import welore_ranks_for_model
from hf_lowrank.tuners.welore.allocation import match_rank_pattern

NAMES = [
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.1.mlp.gate_proj",
    "lm_head",
]


def _peft_targets(model, target_modules, **kw) -> set[str]:
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=target_modules, **kw))
    return {strip_peft_prefix(n) for n in pm.base_model.targeted_module_names}


# ---------------------------------------------------------------------------------------------- target specs
@pytest.mark.parametrize(
    "spec",
    [["q_proj"], ["mlp.up_proj", "down_proj"], ["lm_head"], ["proj"], [".*proj"], r".*\.mlp\..*", "q_proj", "lm_head"],
)
def test_module_matches_is_peft_check_target_module_exists(spec):
    config = LoraConfig(target_modules=spec)
    for name in NAMES:
        assert module_matches(name, spec) == bool(check_target_module_exists(config, name)), (spec, name)


def test_module_matches_rule():
    assert module_matches("model.layers.0.mlp.up_proj", ["up_proj"])  # dotted suffix
    assert module_matches("model.layers.0.mlp.up_proj", ["mlp.up_proj"])
    assert not module_matches("model.layers.0.mlp.up_proj", ["proj"])  # not a partial leaf
    assert module_matches("model.layers.0.mlp.up_proj", ".*up_proj")  # a string is a full-match regex
    assert not module_matches("model.layers.0.mlp.up_proj", "up_proj")
    assert not module_matches("model.layers.0.mlp.up_proj", None)


# ---------------------------------------------------------------------------------------------- pattern keys
@pytest.mark.parametrize("key", ["up_proj", "up_proj|down_proj", r"layers\.1\..*", "model.layers.0.mlp.up_proj", "proj"])
def test_pattern_key_is_peft_get_pattern_key(key):
    for name in NAMES:
        expected = key if get_pattern_key([key], name) == key else None  # peft returns name when nothing matched
        assert pattern_key({key: 1}, name) == expected, (key, name)


def test_pattern_key_rule_first_key_wins_and_bad_keys():
    pattern = {"up_proj|down_proj": 1, r"layers\.1\..*": 2}
    assert pattern_key(pattern, "model.layers.1.mlp.down_proj") == "up_proj|down_proj"  # first matching key
    assert pattern_key(pattern, "model.layers.1.mlp.gate_proj") == r"layers\.1\..*"
    assert pattern_key(pattern, "model.layers.0.self_attn.q_proj") is None
    assert pattern_key({"proj": 1}, "model.layers.0.mlp.up_proj") is None  # on a dot boundary only
    assert pattern_key(None, "x") is None
    with pytest.raises(ValueError, match=r"rank_pattern key '\(' is not a valid regular expression"):
        pattern_key({"(": 1}, "x")
    with pytest.raises(ValueError, match="non-empty"):
        check_pattern_key("")


def test_fisher_lora_rank_pattern_and_compress_rank_pattern_match_keys_alike(tiny_llama):
    """They disagreed: compress_rank_pattern matched equal / '.'-suffix / full regex, so 'up_proj|down_proj' (a
    valid peft rank_pattern key) matched nothing there and plan_ranks raised. Both now use peft's rule."""
    key = "up_proj|down_proj"
    pm = get_peft_model(tiny_llama, FisherLoRAConfig(r=8, target_modules="all-linear", rank_pattern={key: 4}))
    lora_r4 = {strip_peft_prefix(n).removesuffix(".lora_A.default") for n, m in pm.named_modules()
               if n.endswith("lora_A.default") and m.out_features == 4}
    shapes = {n: (64, 64) for n in NAMES[1:5]}
    plan = plan_ranks(shapes, rank=32, rank_pattern={key: 8})
    compressed_r8 = {n for n, r in plan.items() if r == 8}
    assert compressed_r8 == {n for n in lora_r4 if n in shapes} == {"model.layers.0.mlp.up_proj",
                                                                    "model.layers.1.mlp.down_proj"}
    # the kept behaviour: the first matching key wins, a key matching nothing is still refused
    assert plan_ranks(shapes, rank=32, rank_pattern={"down_proj": 8, r"layers\.1\..*": 16})[NAMES[3]] == 8
    with pytest.raises(ValueError, match="matches no target module"):
        plan_ranks(shapes, rank=4, rank_pattern={"q_prj": 2})
    with pytest.raises(ValueError, match="compress_rank_pattern key"):
        FisherLoRAConfig(r=8, compress_rank=4, compress_rank_pattern={"(": 2})


def test_welore_rank_pattern_uses_the_same_rule():
    assert match_rank_pattern({"up_proj|down_proj": 5}, "model.layers.1.mlp.down_proj") == 5
    assert match_rank_pattern({"proj": 5}, "model.layers.1.mlp.down_proj") is None


# ---------------------------------------------------------------------------------------------- blocks
def test_block_index_first_numeric_component():
    assert block_index("model.layers.3.self_attn.q_proj") == ("model.layers", 3, "self_attn.q_proj")
    assert block_index("model.layers.1.experts.0.up") == ("model.layers", 1, "experts.0.up")  # outermost index
    assert block_index("0.fc") == ("", 0, "fc")
    assert block_index("lm_head") is None and block_index("model.layers.3") is None  # last component: a block
    assert in_block("h.0.attn.c_attn") and not in_block("bert.pooler.dense")


def test_plotting_groups_by_the_block_rule():
    """plotting's _BLOCK needed a prefix before the index ('0.fc' was outside any block); now one rule."""
    assert _block_and_kind("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert _block_and_kind("0.fc") == (0, "fc")
    assert _block_and_kind("lm_head") == (-1, "lm_head")


def test_default_targets_stay_the_block_linears(tiny_llama, tiny_bert_classifier):
    names = find_target_linears(tiny_llama)
    assert len(names) == 14 and all(in_block(n) for n in names)
    bert = find_target_linears(tiny_bert_classifier)
    assert len(bert) == 12 and not any("pooler" in n or "classifier" in n for n in bert)


def test_block_twin_in_spsft_uses_the_block_rule(tiny_llama):
    """SPSFT's 'all-linear' + layers_to_transform took the Linears after a 'layers'/'h'/'blocks' component."""
    assert _block_linear_leaf_names(tiny_llama) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }
    seq = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 4))  # '0.0' is inside block 0
    assert _block_linear_leaf_names(seq) == {"0"}


# ---------------------------------------------------------------------------------------------- all-linear
def test_all_linear_is_peft_everywhere(tiny_llama, tiny_bert_classifier):
    """They disagreed: 'all-linear' meant the block Linears for compress_model and WeLore (like None), peft's
    'every Linear but the output head' for SPSFT. It is peft's for all of them now; the default stays the blocks."""
    import copy

    llama = set(find_target_linears(tiny_llama, "all-linear"))
    assert llama == _peft_targets(copy.deepcopy(tiny_llama), "all-linear") == all_linear_names(tiny_llama)
    assert "lm_head" not in llama and len(llama) == 14
    bert = set(find_target_linears(tiny_bert_classifier, "ALL-linear"))  # case-insensitive, as in peft
    assert bert == _peft_targets(copy.deepcopy(tiny_bert_classifier), "all-linear")
    assert "bert.pooler.dense" in bert and "classifier" in bert and len(bert) == 14
    assert set(find_target_linears(tiny_bert_classifier, "all-linear", task_type="SEQ_CLS")) == bert - {"classifier"}
    # WeLore and SPSFT agree with compress_model
    _, alloc = welore_ranks_for_model(copy.deepcopy(tiny_bert_classifier), 0.3, target_modules="all-linear")
    assert set(alloc.shapes) == bert
    spsft = get_peft_model(copy.deepcopy(tiny_llama), SPSFTConfig(r=4, target_modules="all-linear"))
    assert {strip_peft_prefix(n) for n in spsft.base_model.targeted_module_names} == llama
    assert is_all_linear("All-Linear") and not is_all_linear(["all-linear"])


@pytest.mark.parametrize("target_modules", [None, "all-linear", ["q_proj", "down_proj"]])
def test_public_find_target_linears_is_the_rule_compress_model_applies(tiny_llama, target_modules):
    """The public name is the one rule (no copy), and it names exactly the modules compress_model reports on."""
    import hf_lowrank
    from hf_lowrank import targets

    assert hf_lowrank.targets.find_target_linears is targets.find_target_linears
    expected = set(hf_lowrank.targets.find_target_linears(tiny_llama, target_modules))
    with pytest.warns(UserWarning, match="absolute rank"):
        report = hf_lowrank.compress_model(tiny_llama, 4, target_modules=target_modules, progress=False)
    assert {m.name for m in report.modules} == expected
    assert set(report.ranks) == expected  # rank 4 saves parameters in every tiny Linear: none skipped


# ---------------------------------------------------------------------------------------------- prefixes
def test_resolve_name_prefixes():
    names = {"bert.encoder.layer.0.output.dense", "classifier"}
    assert resolve_name("classifier", names, ["bert"]) == "classifier"
    assert resolve_name("encoder.layer.0.output.dense", names, ["bert"]) == "bert.encoder.layer.0.output.dense"
    assert resolve_name("bert.classifier", names, ["", "bert"]) == "classifier"
    assert resolve_name("pooler.dense", names, ["bert"]) is None
    assert resolve_name("a.x", {"x", "b.a.x"}, ["b", "a"]) == "b.a.x"  # prefixes tried in the order given
    assert strip_peft_prefix(PEFT_PREFIX + "model.layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj"
    assert strip_peft_prefix("model.layers.0") == "model.layers.0"


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", None),
        ("q_proj,v_proj", ["q_proj", "v_proj"]),
        (" q_proj , mlp.up_proj ,", ["q_proj", "mlp.up_proj"]),
        ("down_proj", ["down_proj"]),
        (".*mlp.*", ".*mlp.*"),  # compress / residual split this into ['.*mlp.*'], which named no module
        (r"model\.layers\.[01]\..*", r"model\.layers\.[01]\..*"),
        ("all-linear", "all-linear"),
    ],
)
def test_parse_targets(value, expected):
    assert parse_targets(value) == expected
