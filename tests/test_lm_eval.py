"""lm-evaluation-harness as a real client: dense and compressed tiny Llama folders through ``python -m
hf_lowrank.cli.commands.lm_eval`` on the bundled offline tasks, and the compressed folder gives exactly what lm-eval computes
on the same compressed model object (``HFLM(pretrained=model)``)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_tiny_llama

import hf_lowrank
from hf_lowrank.cli.commands.lm_eval import (
    BUNDLED_TASKS,
    CATEGORY_CHOICES,
    _requested_tasks,
    _with_include_path,
    bundled_task_dir,
    main,
)
from hf_lowrank.demo import wordnet

pytest.importorskip("lm_eval")

LIMIT = 4
BATCH = 4


def _tiny_tokenizer():
    """A 128-token BPE tokenizer (the tiny Llama's vocabulary size) trained on bundled prose, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=70, show_progress=False
    )
    tok.train_from_iterator(wordnet.prose_texts("train", n=100), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tok = _tiny_tokenizer()
    model = make_tiny_llama(seed=0, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    report = hf_lowrank.compress_model(model, 0.5, progress=False)
    assert report.ranks, "the tiny model should have factorized layers"
    hf_lowrank.save_compressed(model, root / "compressed", tokenizer=tok, report=report)
    return root, model, tok


def _cli_results(folder, out) -> dict:
    main(
        [
            "--model", "hf",
            "--model_args", f"pretrained={folder}",
            "--tasks", "hf_lowrank_wordnet",
            "--limit", str(LIMIT),
            "--batch_size", str(BATCH),
            "--output_path", str(out),
        ]
    )  # fmt: skip
    (found,) = out.rglob("results_*.json")
    return json.loads(found.read_text())["results"]


def _metrics(results: dict) -> dict:
    return {task: {k: v for k, v in r.items() if k != "alias"} for task, r in results.items()}


def test_task_dir_is_rendered_and_reused(tmp_path):
    first = bundled_task_dir(tmp_path)
    assert bundled_task_dir(tmp_path) == first
    for task in BUNDLED_TASKS:
        text = (first / f"{task}.yaml").read_text()
        assert "@DATA_DIR@" not in text and str(first) in text
    rows = [json.loads(line) for line in (first / "category_test.jsonl").read_text().splitlines()]
    assert len(CATEGORY_CHOICES) == len(wordnet.DEFAULT_CATEGORIES)
    assert {r["label"] for r in rows} == set(range(len(CATEGORY_CHOICES)))
    words = [json.loads(line) for line in (first / "word_test.jsonl").read_text().splitlines()]
    texts, candidates, labels = wordnet.word_choice_task("test")
    assert [(r["text"], r["choices"], r["label"]) for r in words] == list(zip(texts, candidates, labels))
    prose = (first / "prose_test.jsonl").read_text().splitlines()
    assert json.loads(prose[0])["text"] == wordnet.prose_texts("test", n=1)[0]


def test_word_choice_task_is_a_fair_multiple_choice():
    texts, candidates, labels = wordnet.word_choice_task("test")
    assert len(texts) > 1000 and len(texts) == len(candidates) == len(labels)
    words: dict[str, set[str]] = {}  # gloss -> the words of the noun synsets it defines
    for r in wordnet.load_synsets("test"):
        if r["pos"] == "noun":
            words.setdefault(wordnet._sentence(r["definition"]), set()).update(r["words"])
    counts = [0] * 4
    for text, options, label in zip(texts, candidates, labels):
        assert len(options) == len(set(options)) == 4
        assert options[label] in words[text]  # the right answer is a word of the defined synset
        assert options[label] not in text.lower()  # and the gloss does not give it away
        counts[label] += 1
    assert min(counts) > 0.2 * len(texts)  # the answer position is balanced (chance 1/4 whatever the position)
    assert wordnet.word_choice_task("test", n=10) == tuple(x[:10] for x in (texts, candidates, labels))
    with pytest.raises(ValueError, match="choices"):
        wordnet.word_choice_task("test", choices=1)


def test_include_path_added_only_where_missing():
    assert _with_include_path([]) == []
    assert _with_include_path(["--help"]) == ["--help"]
    legacy = _with_include_path(["--model", "hf"])
    assert legacy[-2] == "--include_path" and legacy[-1] == str(bundled_task_dir())
    assert _with_include_path(["run", "--include_path", "x"]) == ["run", "--include_path", "x"]
    assert _requested_tasks(["--model", "hf", "--tasks", "a,b", "--tasks=c"]) == ["a", "b", "c"]


def test_dense_and_compressed_folders_evaluate_and_match_the_model_object(folders, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, model, tok = folders

    dense = _metrics(_cli_results(root / "dense", tmp_path / "dense"))
    compressed = _metrics(_cli_results(root / "compressed", tmp_path / "compressed"))
    assert set(dense) == set(compressed) == set(BUNDLED_TASKS)
    for metrics in (dense, compressed):
        ppl = metrics["hf_lowrank_wordnet_ppl"]["byte_perplexity,none"]
        assert torch.isfinite(torch.tensor(ppl)) and ppl > 1
        assert 0 <= metrics["hf_lowrank_wordnet_category"]["acc,none"] <= 1
        assert 0 <= metrics["hf_lowrank_wordnet_word"]["acc,none"] <= 1
    assert dense != compressed  # the factorization (rank ratio 0.5) is not lossless

    # Loading through the stock transformers path (quantizer plugin) is exact: same numbers as the object itself.
    direct = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH),
        tasks=["hf_lowrank_wordnet"],
        limit=LIMIT,
        task_manager=TaskManager(include_path=str(bundled_task_dir()), include_defaults=False),
    )
    assert _metrics(direct["results"]) == compressed
