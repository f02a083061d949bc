"""Small real-text data sets bundled with the package, derived from WordNet 3.0 (see ``hf_lowrank/data/README.md``).

Every function here is deterministic and needs no network:

- :func:`load_synsets`: the raw synset records of a split.
- :func:`definition_texts`: one English sentence or two per synset ("A dog ... is a member of the genus Canis ...").
- :func:`prose_texts`: paragraphs of several related definitions (~100-200 tokens), for perplexity.
- :func:`sft_examples`: ``{"prompt", "completion"}`` pairs for trl's ``SFTTrainer``.
- :func:`category_task`: gloss -> WordNet lexicographer category, balanced classes, for sequence classification.
- :func:`word_choice_task`: gloss -> which of four words it defines, a multiple-choice task for language models.

Splits are ``"train"`` (~32k synsets) and ``"test"`` (~3.5k synsets); a synset's split is a hash of its id, so the
two are disjoint. Where ``n`` is given, the first ``n`` items of a fixed pseudo-random order are returned, so
``f(split, n=10)`` is a prefix of ``f(split, n=20)`` and mixes parts of speech and topics.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from functools import cache
from importlib import resources

__all__ = [
    "DEFAULT_CATEGORIES",
    "SPLITS",
    "category_task",
    "definition_text",
    "definition_texts",
    "load_synsets",
    "prose_texts",
    "sft_examples",
    "word_choice_task",
]

SPLITS: tuple[str, ...] = ("train", "test")
DEFAULT_CATEGORIES: tuple[str, ...] = (
    "noun.animal",
    "noun.plant",
    "noun.food",
    "noun.artifact",
    "noun.person",
    "noun.location",
)
_ORDER_SALT = "hf-lowrank/bundled/order"
_PARAGRAPH_WORDS = 95  # ~125-170 SmolLM2 tokens per paragraph
_MAX_ALIASES = 2
_COUNTABLE_STARTS = ("a ", "an ", "any ", "one ", "someone ", "something ", "a person ", "either ", "each ")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(repr(s) for s in SPLITS)}")
    return split


def _check_n(n: int | None, available: int, what: str) -> int:
    if n is None:
        return available
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int or None (all {what}), got {n!r}")
    if n > available:
        raise ValueError(f"n={n} but only {available} {what} are available; pass n <= {available} or n=None")
    return n


@cache
def _records(split: str) -> tuple[dict, ...]:
    """Parsed records of a split, cached. Shared objects: callers must not mutate them."""
    ref = resources.files("hf_lowrank") / "data" / f"wordnet_{_check_split(split)}.jsonl.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _order_key(synset_id: str) -> bytes:
    return hashlib.sha256(f"{_ORDER_SALT}:{synset_id}".encode()).digest()


@cache
def _mixed(split: str) -> tuple[dict, ...]:
    """The records of a split in a fixed pseudo-random order (a hash of the synset id)."""
    return tuple(sorted(_records(split), key=lambda r: _order_key(r["id"])))


def load_synsets(split: str = "train") -> list[dict]:
    """The WordNet synsets of a split, sorted by synset id.

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        A new list of new dicts (safe to modify) with keys ``id`` (e.g. ``"n02084071"``), ``pos`` (``"noun"``,
        ``"verb"``, ``"adjective"``, ``"adverb"``), ``category`` (lexicographer file, e.g. ``"noun.animal"``),
        ``words`` (synonyms, head word first), ``definition``, ``examples`` (usage sentences), ``hypernyms`` (head
        words of the parent synsets) and ``instance`` (True when the synset is an instance, e.g. a city).
    """
    return [{k: (list(v) if isinstance(v, list) else v) for k, v in r.items()} for r in _records(split)]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _sentence(text: str) -> str:
    """Strip, capitalize the first letter and end with a period."""
    text = text.strip().rstrip(";:,").strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def _aliases(words: Sequence[str]) -> str:
    others = [w for w in words[1 : 1 + _MAX_ALIASES]]
    if not others:
        return ""
    return f" (also {' or '.join(others)})"


def _examples(examples: Sequence[str]) -> str:
    if not examples:
        return ""
    quoted = [f'"{e.strip().rstrip(".")}"' for e in examples[:2]]
    return " For example: " + " and ".join(quoted) + "."


def definition_text(record: dict) -> str:
    """One synset record as English prose: what the word means, what it is a kind of, and a usage example.

    ``{"words": ["dog", "domestic dog", ...], "pos": "noun", "definition": "a member of the genus Canis ...", ...}``
    gives ``'A dog (also domestic dog or Canis familiaris) is a member of the genus Canis ...; occurs in many
    breeds. It is a kind of canine. For example: "the dog barked all night".'``
    """
    word, pos, definition = record["words"][0], record["pos"], record["definition"].strip().rstrip(";:,. ")
    aliases = _aliases(record["words"])
    if pos == "noun":
        countable = definition.lower().startswith(_COUNTABLE_STARTS)
        if word[:1].isupper() or not countable:
            subject = word
        else:
            subject = f"{_article(word)} {word}"
        text = _sentence(f"{subject}{aliases} is {definition}")
        hypernyms = record.get("hypernyms") or []
        if hypernyms:
            parent = hypernyms[0]
            if record.get("instance"):
                text += f" It is {_article(parent)} {parent}."
            elif parent.lower() != word.lower():
                text += f" It is a kind of {parent}."
    elif pos == "verb":
        text = _sentence(f"to {word}{aliases} is to {definition}")
    else:  # adjective, adverb
        text = _sentence(f'the {pos} "{word}"{aliases} means {definition}')
    return text + _examples(record.get("examples") or [])


def definition_texts(split: str = "train", n: int | None = None) -> list[str]:
    """One prose line per synset (see :func:`definition_text`), in a fixed mixed order.

    Args:
        split: ``"train"`` or ``"test"``.
        n: how many (the first ``n`` of the fixed order); None for all.
    """
    records = _mixed(_check_split(split))
    return [definition_text(r) for r in records[: _check_n(n, len(records), "definitions")]]


@cache
def _paragraphs(split: str) -> tuple[str, ...]:
    """Definitions joined in synset-id order (neighbouring ids share a topic) into ~95-word paragraphs."""
    out: list[str] = []
    buf: list[str] = []
    words = 0
    for r in _records(split):
        line = definition_text(r)
        buf.append(line)
        words += len(line.split())
        if words >= _PARAGRAPH_WORDS:
            out.append(" ".join(buf))
            buf, words = [], 0
    if buf and words >= _PARAGRAPH_WORDS // 2:
        out.append(" ".join(buf))
    return tuple(sorted(out, key=lambda p: hashlib.sha256(f"{_ORDER_SALT}:{p}".encode()).digest()))


def prose_texts(split: str = "train", n: int | None = None) -> list[str]:
    """Paragraphs of several consecutive definitions (about 100-200 tokens each), in a fixed mixed order.

    Meant for perplexity at ``max_length=256``: a paragraph seldom needs truncating there.

    Args:
        split: ``"train"`` or ``"test"``.
        n: how many paragraphs; None for all (about 6,500 for train, 700 for test).
    """
    paragraphs = _paragraphs(_check_split(split))
    return list(paragraphs[: _check_n(n, len(paragraphs), "paragraphs")])


def sft_examples(split: str = "train", n: int | None = None) -> list[dict[str, str]]:
    """Prompt-completion pairs (trl ``SFTTrainer`` format): ``{"prompt": "Define the noun 'dog'.", "completion":
    " A dog (also ...) is ..."}``. The completion starts with a space so that prompt + completion reads as text.

    Args:
        split: ``"train"`` or ``"test"``.
        n: how many (the first ``n`` of the fixed order); None for all.
    """
    records = _mixed(_check_split(split))
    return [
        {"prompt": f"Define the {r['pos']} '{r['words'][0]}'.", "completion": " " + definition_text(r)}
        for r in records[: _check_n(n, len(records), "examples")]
    ]


def category_task(
    split: str = "train", n: int | None = None, categories: Sequence[str] | None = None
) -> tuple[list[str], list[int], list[str]]:
    """Text classification: which WordNet lexicographer category a definition belongs to.

    The text is the synset's definition followed by its usage examples (the word itself is left out, so the
    model has to read the gloss). Classes are balanced: with ``n=None`` every class gets as many examples as the
    smallest one has; with ``n`` given, class sizes differ by at most one. Items are interleaved class by class.

    Args:
        split: ``"train"`` or ``"test"``.
        n: total number of examples; None for the largest balanced set.
        categories: lexicographer categories to use as classes (default :data:`DEFAULT_CATEGORIES`: animal,
            plant, food, artifact, person, location nouns). At least two, no repeats.

    Returns:
        ``(texts, labels, label_names)``: ``labels[i]`` indexes ``label_names``, which equals ``categories``.
    """
    records = _mixed(_check_split(split))
    names = list(DEFAULT_CATEGORIES if categories is None else categories)
    if isinstance(categories, str):
        raise ValueError(f"categories must be a sequence of category names, not the string {categories!r}")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"categories must name at least two distinct categories, got {names}")
    known = sorted({r["category"] for r in records})
    unknown = [c for c in names if c not in known]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; valid ones are: {', '.join(known)}")
    per_class: dict[str, list[str]] = {c: [] for c in names}
    for r in records:
        if r["category"] in per_class:
            text = _sentence(r["definition"])
            if r["examples"]:
                text += _examples(r["examples"])
            per_class[r["category"]].append(text)
    smallest = min(len(v) for v in per_class.values())
    total = _check_n(n, smallest * len(names), "balanced examples")
    rounds = -(-total // len(names))  # ceil
    texts: list[str] = []
    labels: list[int] = []
    for i in range(rounds):
        for label, c in enumerate(names):
            if len(texts) < total:
                texts.append(per_class[c][i])
                labels.append(label)
    return texts, labels, names


def _plain_word(word: str) -> bool:
    return word.isascii() and word.isalpha() and word.islower() and len(word) >= 3


def word_choice_task(
    split: str = "test", n: int | None = None, choices: int = 4
) -> tuple[list[str], list[list[str]], list[int]]:
    """Multiple choice: which of ``choices`` words a WordNet noun gloss defines (chance ``1 / choices``).

    The text is the definition alone (no usage example: those often contain the word). The candidates are the
    synset's head word and the head words of the next ``choices - 1`` noun synsets of the split in the fixed
    pseudo-random order (a cyclic shift, so every word is a distractor as often as it is an answer), in an order
    given by a hash of the synset id; only single lower-case ASCII words of three letters or more take part, and
    a synset whose head word is a substring of its definition is left out.

    Args:
        split: ``"train"`` or ``"test"``.
        n: number of items (the first ``n`` of the fixed order); None for all.
        choices: candidates per item, at least 2.

    Returns:
        ``(definitions, candidates, labels)``: ``candidates[i][labels[i]]`` is the word ``definitions[i]`` defines.
    """
    if isinstance(choices, bool) or not isinstance(choices, int) or choices < 2:
        raise ValueError(f"choices must be an int >= 2, got {choices!r}")
    pool = [
        (r["id"], r["words"][0], _sentence(r["definition"]))
        for r in _mixed(_check_split(split))
        if r["pos"] == "noun" and not r["instance"] and _plain_word(r["words"][0])
        and r["words"][0] not in r["definition"].lower()
    ]
    heads = [w for _, w, _ in pool]
    total = _check_n(n, len(pool), "word-choice items")
    texts, candidates, labels = [], [], []
    for i, (synset, word, definition) in enumerate(pool[:total]):
        others: list[str] = []
        j = i
        while len(others) < choices - 1:
            j = (j + 1) % len(heads)
            if heads[j] != word and heads[j] not in others:
                others.append(heads[j])
        label = _order_key(f"choice:{synset}")[0] % choices
        texts.append(definition)
        candidates.append(others[:label] + [word] + others[label:])
        labels.append(label)
    return texts, candidates, labels
