"""The hf-lowrank command line: compress -> inspect on a saved tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard

from hf_lowrank import load_compressed
from hf_lowrank.cli import main


def test_compress_and_inspect(tiny_llama, tmp_path, capsys):
    tiny_llama.save_pretrained(tmp_path / "dense")
    assert main(["compress", str(tmp_path / "dense"), "--keep", "0.5", "--out", str(tmp_path / "c")]) == 0
    model = load_compressed(tmp_path / "c").eval()
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["factorized_modules"] == 14 and 0.4 < info["kept_fraction"] <= 0.5
    assert all(m["rel_error"] is not None for m in info["modules"])
    assert main(["inspect", str(tmp_path / "dense")]) == 1  # a dense folder is named as such, not misread


def test_compress_keeps_a_sequence_classifier_and_its_head(tmp_path, capsys):
    """The class comes from config.json's architectures: a RoBERTa classifier stays one, its head weights intact."""
    from tiny_models import make_tiny_roberta_classifier
    from transformers import AutoModelForSequenceClassification

    clf = make_tiny_roberta_classifier()
    clf.save_pretrained(tmp_path / "dense")
    out = tmp_path / "c"
    assert (
        main(["compress", str(tmp_path / "dense"), "--method", "welore", "--reduction", "0.3", "--out", str(out)]) == 0
    )
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RobertaForSequenceClassification"]
    # the dense folder has no tokenizer files: none is written (transformers would build an empty-vocabulary one)
    assert not any((out / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    model = load_compressed(out, AutoModelForSequenceClassification).eval()
    assert type(model).__name__ == "RobertaForSequenceClassification"
    assert torch.equal(model.classifier.out_proj.weight, clf.classifier.out_proj.weight)
    ids = torch.arange(2, 14).reshape(1, 12)
    with torch.no_grad():
        want, got = clf(ids).logits, model(ids).logits
    assert float((got - want).norm() / want.norm()) < 0.5  # compressed, but the trained head, not a random one


def test_compress_builds_t5_from_its_config_and_accepts_an_explicit_class(tmp_path):
    from tiny_models import make_tiny_model
    from transformers import AutoModelForSeq2SeqLM

    make_tiny_model("t5").save_pretrained(tmp_path / "t5")
    assert main(["compress", str(tmp_path / "t5"), "--keep", "0.5", "--out", str(tmp_path / "c")]) == 0
    model = load_compressed(tmp_path / "c", AutoModelForSeq2SeqLM)
    assert type(model).__name__ == "T5ForConditionalGeneration"
    args = ["compress", str(tmp_path / "t5"), "--keep", "0.5", "--model-class", "T5EncoderModel", "--out"]
    assert main([*args, str(tmp_path / "enc")]) == 0
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["architectures"] == ["T5EncoderModel"]


def test_compress_refuses_in_one_line_when_the_class_is_unknown(tmp_path, capsys):
    from tiny_models import make_tiny_model

    model = make_tiny_model("bert_cls")
    model.config.architectures = None
    model.save_pretrained(tmp_path / "noarch")
    cfg = json.loads((tmp_path / "noarch" / "config.json").read_text())
    cfg.pop("architectures", None)
    (tmp_path / "noarch" / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "noarch"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model-class" in err and "architectures" in err
    assert (
        main(["compress", str(tmp_path / "noarch"), "--model-class", "NoSuchModel", "--out", str(tmp_path / "c")]) == 2
    )
    assert "unknown --model-class 'NoSuchModel'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_compress_writes_a_model_card(tiny_llama, tmp_path):
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    tiny_llama.save_pretrained(tmp_path / "dense")
    assert main(["compress", str(tmp_path / "dense"), "--rank", "8", "--out", str(tmp_path / "c")]) == 0
    card = (tmp_path / "c" / "README.md").read_text()
    data = ModelCard(card).data  # valid Hub metadata
    assert data.library_name == "transformers" and {"hf-lowrank", "svd"} <= set(data.tags)
    assert data.license == "apache-2.0" and data.pipeline_tag == "text-generation"
    # a local base folder is named in the text, never as base_model (the Hub refuses a path there)
    assert data.base_model is None and "a local checkpoint (`dense`)" in card and str(tmp_path) not in card
    assert "import hf_lowrank" in card and 'AutoModelForCausalLM.from_pretrained("c")' in card
    assert "14 factorized Linear layers; rank min 8, median 8, max 8" in card
    after = sum(p.numel() for p in load_compressed(tmp_path / "c").parameters())
    assert f"{after:,} after" in card and f"{sum(p.numel() for p in tiny_llama.parameters()):,} before" in card


def _char_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *"abcdefghijklmnopqrstuvwxyz .,:"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def test_compress_with_calibration_file_and_sequential(tiny_llama, tmp_path):
    import json as _json

    import hf_lowrank

    tiny_llama.save_pretrained(tmp_path / "dense")
    _char_tokenizer().save_pretrained(tmp_path / "dense")
    texts = tmp_path / "calib.jsonl"
    texts.write_text("\n".join(_json.dumps({"text": t}) for t in ["a cat is an animal.", "red is a colour.",
                                                                   "an oak is a tree.", "rain is water."]))
    cases = [([], "kronecker", "global"), (["--sequential"], "whitened", "uniform"),
             (["--calibration-weighting", "whitened", "--allocation", "global"], "whitened", "global"),
             (["--calibration-weighting", "kronecker", "--allocation", "uniform"], "kronecker", "uniform")]
    for i, (extra, weighting, allocation) in enumerate(cases):
        out = tmp_path / f"c{i}"
        assert main(["compress", str(tmp_path / "dense"), "--keep", "0.5", "--calibration", str(texts), *extra,
                     "--out", str(out)]) == 0
        report = _json.loads((out / "compression_report.json").read_text())
        assert report["method"] == weighting and report["info"]["calibration_tokens"] > 0
        assert report["info"]["allocation"] == allocation
        hf_lowrank.load_compressed(out)
    assert main(["compress", str(tmp_path / "dense"), "--sequential", "--out", str(tmp_path / "x")]) == 2


def test_cli_errors_are_one_line_unless_debug(tiny_llama, tmp_path, capsys):
    import json as _json

    tiny_llama.save_pretrained(tmp_path / "dense")
    assert main(["compress", str(tmp_path / "dense"), "--keep", "0.5", "--out", str(tmp_path / "c")]) == 0
    config = _json.loads((tmp_path / "c" / "config.json").read_text())
    config["quantization_config"]["ranks"] = {}
    (tmp_path / "c" / "config.json").write_text(_json.dumps(config))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-lowrank: error:") and "\n" not in err and "Traceback" not in err
    with pytest.raises(ValueError):
        main(["inspect", str(tmp_path / "c"), "--debug"])


def test_compress_fwsvd_with_a_kronecker_fisher_file(tiny_llama, tmp_path):
    """``--method fwsvd --fisher FILE``: one compress_model(fisher=...) call; a state with Grams is used as Kronecker
    Fisher by default, and the saved model equals the library call on the same merged model."""
    import copy

    from tiny_models import make_tiny_fisher_lora

    from hf_lowrank import compress_model
    from hf_lowrank.tuners.fisher_lora import FisherCollector

    pm = make_tiny_fisher_lora(tiny_llama, fisher_weighting="kronecker")
    collector = FisherCollector().attach(pm)
    pm.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        pm(input_ids=ids, labels=ids).loss.backward()
    collector.detach()
    collector.state.save(tmp_path / "fisher_state.safetensors")
    merged = pm.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    expect = copy.deepcopy(merged)
    report = compress_model(expect, 8, fisher=tmp_path / "fisher_state.safetensors", progress=False)
    out = tmp_path / "c"
    args = ["compress", str(tmp_path / "merged"), "--method", "fwsvd", "--fisher", str(tmp_path), "--rank", "8"]
    assert main([*args, "--out", str(out)]) == 0
    saved = json.loads((out / "compression_report.json").read_text())
    assert saved["method"] == "fisher_lora" and saved["info"]["fisher_weighting"] == "kronecker"
    model = load_compressed(out).eval()
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expect.eval()(ids).logits, rtol=1e-4, atol=1e-5)
    assert report.ranks == {m["name"]: m["rank"] for m in saved["modules"] if m["rank"] is not None}


def test_load_tokenizer_only_when_the_folder_has_one(tmp_path):
    """transformers 5 builds an empty-vocabulary GPT-2 tokenizer for a folder without tokenizer files; the CLIs
    (compress, residual) must see no tokenizer there, and the real one where it was saved."""
    from tiny_models import make_tiny_model

    from hf_lowrank.cli import load_tokenizer

    make_tiny_model("gpt2_cls").save_pretrained(tmp_path / "m")
    assert load_tokenizer(str(tmp_path / "m")) is None
    _char_tokenizer().save_pretrained(tmp_path / "m")
    tok = load_tokenizer(str(tmp_path / "m"))
    assert tok is not None and len(tok("hello world").input_ids) > 0
