"""The PEFT-type registration (the only place touching peft private API) must fail loudly if peft changes. The
config round trip of every registered type (PeftConfig.from_pretrained) is in test_peft_contract.py."""

from __future__ import annotations

import peft
import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import hf_lowrank
from hf_lowrank.peft_configs._registry import SUPPORTED_PEFT_VERSIONS, ensure_peft_type, register_method

CONFIGS = {
    "FISHER_LORA": (hf_lowrank.FisherLoRAConfig, hf_lowrank.FisherLoraModel),
    "WELORE_LRC": (hf_lowrank.WeLoreLRCConfig, hf_lowrank.WeLoreModel),
    "SPSFT": (hf_lowrank.SPSFTConfig, hf_lowrank.SPSFTModel),
}


def test_peft_version_is_supported():
    assert ".".join(peft.__version__.split(".")[:2]) in SUPPORTED_PEFT_VERSIONS


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_members_behave_like_builtin_ones(name):
    member = PeftType[name]
    assert member.value == name and PeftType(name) is member and member == name and hash(member) == hash(name)
    assert name in PeftType._member_names_ and getattr(PeftType, name) is member
    config_cls, model_cls = CONFIGS[name]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is config_cls
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is model_cls


def test_registration_is_idempotent():
    before = len(PeftType.__members__)
    assert ensure_peft_type("SPSFT") is PeftType.SPSFT
    register_method(name="spsft", config_cls=hf_lowrank.SPSFTConfig, model_cls=hf_lowrank.SPSFTModel, prefix="spsft_")
    assert len(PeftType.__members__) == before
