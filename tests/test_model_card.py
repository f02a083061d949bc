"""Model cards: valid Hub metadata that agrees with config.json and names the saved folder.

The cards are parsed with ``huggingface_hub.ModelCard`` (what the Hub and ``push_to_hub`` read). ``base_model`` is
written only for a Hub id: the Hub refuses a path there, and a relative folder named like ``org/name`` would link
the card to a stranger's repo.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import make_tiny_llama, make_tiny_roberta_classifier

import hf_lowrank
from hf_lowrank.compression.compress import compress_model


def _card(folder) -> tuple[ModelCard, str]:
    text = (folder / "README.md").read_text()
    return ModelCard(text), text


def _batches():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 120, (2, 16), generator=g)} for _ in range(2)]


def test_save_compressed_card_names_the_final_folder_and_agrees_with_config(tmp_path):
    model = make_tiny_llama()
    report = compress_model(model, 0.5, calibration=_batches(), progress=False)
    folder = hf_lowrank.save_compressed(model, tmp_path / "tiny-llama-k50", report=report)
    card, text = _card(folder)
    assert ".tmp-" not in text  # the atomic save's temporary folder is not the checkpoint's name
    assert text.split("---\n", 2)[2].lstrip().startswith("# tiny-llama-k50:")
    assert 'from_pretrained("tiny-llama-k50")' in text
    method = json.loads((folder / "config.json").read_text())["quantization_config"]["method"]
    assert method == report.method == "kronecker"
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"hf-lowrank", "low-rank", method} <= set(data.tags)
    assert f"- Method: `{method}`" in text
    # built from a config, not downloaded: no base model is claimed, and no relation without one
    assert data.base_model is None and data.to_dict().get("base_model_relation") is None
    assert "hf-lowrank" in model.model_tags  # the tag transformers' own push_to_hub card gets


def test_base_model_only_for_a_hub_id(tmp_path):
    model = make_tiny_roberta_classifier()
    compress_model(model, 0.5, progress=False)
    folder = hf_lowrank.save_compressed(model, tmp_path / "cls", base_model="FacebookAI/roberta-base",
                                        license="mit")
    card, text = _card(folder)
    assert card.data.base_model == "FacebookAI/roberta-base"
    assert card.data.to_dict()["base_model_relation"] == "quantized"
    assert card.data.pipeline_tag == "text-classification" and card.data.license == "mit"
    assert "RobertaForSequenceClassification.from_pretrained(\"cls\")" in text

    local = tmp_path / "my-base"
    local.mkdir()
    hf_lowrank.save_compressed(model, tmp_path / "cls2", base_model=str(local))
    card, text = _card(tmp_path / "cls2")
    assert card.data.base_model is None and str(tmp_path) not in text and "`my-base`" in text


def test_hub_model_id_rules(tmp_path, monkeypatch):
    from hf_lowrank.cards import final_name, hub_model_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert hub_model_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_model_id("gpt2") == "gpt2"
    for not_hub in (str(tmp_path), "./model", "../model", "~/model", "a/b/c", "org/local", "bad name", "", None):
        assert hub_model_id(not_hub) is None, not_hub
    assert final_name(tmp_path / ".my-model.tmp-ab12cd") == "my-model"
    assert final_name(tmp_path / "my-model") == "my-model"


def test_trainer_save_path_card_names_the_output_folder(tmp_path):
    """``LowRankTrainer.save_model`` writes through ``save_compressed`` (an atomic folder too)."""
    from hf_lowrank import save_compressed

    model = make_tiny_llama()
    compress_model(model, 0.5, progress=False)
    save_compressed(model, tmp_path / "sft-out")
    card, text = _card(tmp_path / "sft-out")
    assert ".tmp-" not in text and 'from_pretrained("sft-out")' in text
    assert card.data.library_name == "transformers"


def test_cli_card_method_is_the_checkpoint_method(tmp_path):
    from test_cli import _char_tokenizer

    from hf_lowrank.cli import main

    make_tiny_llama().save_pretrained(tmp_path / "dense")
    _char_tokenizer().save_pretrained(tmp_path / "dense")
    texts = tmp_path / "calib.txt"
    texts.write_text("a cat is an animal.\nred is a colour.\nan oak is a tree.\n")
    out = tmp_path / "c"
    assert main(["compress", str(tmp_path / "dense"), "--keep", "0.5", "--calibration", str(texts),
                 "--out", str(out)]) == 0
    method = json.loads((out / "config.json").read_text())["quantization_config"]["method"]
    card, text = _card(out)
    assert method == "kronecker" and method in card.data.tags and f"- Method: `{method}`" in text
    assert "`svd`" not in text.split("## Settings")[0]


@pytest.mark.skipif(os.name != "posix", reason="absolute POSIX path in the test")
def test_write_model_card_refuses_a_path_as_base_model(tmp_path):
    model = make_tiny_llama()
    compress_model(model, 8, progress=False)
    model.save_pretrained(tmp_path / "m")
    hf_lowrank.cards.write_model_card(tmp_path / "m", base_model="/abs/local/base", method="svd", settings={},
                                ranks=model.config.quantization_config.ranks, params_before=10, params_after=5)
    card, _ = _card(tmp_path / "m")
    assert card.data.base_model is None
