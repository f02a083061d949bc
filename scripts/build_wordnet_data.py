#!/usr/bin/env python3
"""Build the bundled WordNet 3.0 data set shipped in ``hf_lowrank/data/``.

Reads the Princeton WordNet 3.0 database files ``data.{noun,verb,adj,adv}`` (Debian package ``wordnet-base``,
installed under ``/usr/share/wordnet``) and writes two gzipped JSON-lines files, one synset per line::

    {"id": "n02084071", "pos": "noun", "category": "noun.animal", "words": ["dog", "domestic dog", ...],
     "definition": "a member of the genus Canis ...; occurs in many breeds",
     "examples": ["the dog barked all night"], "hypernyms": ["canine", "domestic animal"], "instance": false}

The train/test split is a pure function of the synset id (a SHA-256 hash), so it never changes when the subsample
size changes, and a second hash of the same id picks the subsample. Output is byte-for-byte reproducible (records
sorted by id, gzip mtime 0).

Usage::

    apt-get install -y wordnet-base
    python scripts/build_wordnet_data.py                      # defaults: ~30k train / ~3k test synsets
    python scripts/build_wordnet_data.py --wordnet-dir DIR --out hf_lowrank/data --keep 0.3 --test-percent 10
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

# Lexicographer file numbers -> names, as listed in WordNet's lexnames(5WN) manual page.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip

POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
SS_TYPE_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
SS_TYPE_LETTER = {"n": "n", "v": "v", "a": "a", "s": "a", "r": "r"}
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")

SPLIT_SALT = "hf-lowrank/wordnet-3.0/split"
KEEP_SALT = "hf-lowrank/wordnet-3.0/keep"
LICENSE_HEADER = (
    "The files wordnet_train.jsonl.gz and wordnet_test.jsonl.gz in this folder are derived from\n"
    "WordNet 3.0 (Princeton University), as distributed in the Debian package wordnet-base.\n"
    "The WordNet licence follows, verbatim from that package's copyright file.\n\n"
)


def _unit_hash(salt: str, key: str) -> float:
    """A deterministic number in [0, 1) from ``salt`` and ``key`` (first 8 bytes of SHA-256)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(synset_id: str, test_percent: float) -> str:
    """Return ``"test"`` for about ``test_percent`` % of synset ids, ``"train"`` for the rest."""
    return "test" if _unit_hash(SPLIT_SALT, synset_id) < test_percent / 100.0 else "train"


def split_segments(gloss: str) -> list[str]:
    """Split a gloss on ``;`` that lie outside double quotes."""
    parts, buf, inside = [], [], False
    for ch in gloss:
        if ch == '"':
            inside = not inside
        if ch == ";" and not inside:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


def parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a WordNet gloss into its definition and its quoted usage examples.

    ``'a member of the genus Canis; occurs in many breeds; "the dog barked all night"'`` gives
    ``('a member of the genus Canis; occurs in many breeds', ['the dog barked all night'])``. An attribution after an
    example (``"..." - Shakespeare``) is dropped.
    """
    definition, examples = [], []
    for seg in split_segments(gloss.strip()):
        if seg.startswith('"') and seg.count('"') >= 2:
            # One segment may hold several examples: "a", "b"
            examples.extend(q.strip() for q in re.findall(r'"([^"]+)"', seg) if q.strip())
        elif seg.startswith('"'):  # a few glosses have an unbalanced quote: '...; "an assimilative substance'
            examples.append(seg.strip('" '))
        else:
            definition.append(seg)
    return "; ".join(definition).strip(), examples


def clean_word(word: str) -> str:
    """``'Canis_familiaris'`` -> ``'Canis familiaris'``; strips adjective position markers like ``(a)``."""
    return _ADJ_MARKER.sub("", word).replace("_", " ")


def parse_data_file(path: Path) -> list[dict]:
    """Parse one ``data.<pos>`` file into raw synset dicts (hypernyms still as (offset, pos) pointers)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, sep, gloss = line.rstrip("\n").partition(" | ")
            if not sep:
                head, gloss = head.rstrip(" |"), ""
            tok = head.split()
            offset, lex_filenum, ss_type = tok[0], int(tok[1]), tok[2]
            w_cnt = int(tok[3], 16)
            words = [clean_word(tok[4 + 2 * i]) for i in range(w_cnt)]
            i = 4 + 2 * w_cnt
            p_cnt = int(tok[i])
            hyper, instance = [], False
            for j in range(p_cnt):
                sym, tgt_off, tgt_pos = tok[i + 1 + 4 * j : i + 4 + 4 * j]
                if sym in ("@", "@i"):
                    hyper.append(SS_TYPE_LETTER[tgt_pos] + tgt_off)
                    instance = instance or sym == "@i"
            definition, examples = parse_gloss(gloss)
            out.append(
                {
                    "id": SS_TYPE_LETTER[ss_type] + offset,
                    "pos": SS_TYPE_NAME[ss_type],
                    "category": LEXNAMES[lex_filenum],
                    "words": list(dict.fromkeys(words)),
                    "definition": definition,
                    "examples": examples,
                    "_hyper": hyper,
                    "instance": instance,
                }
            )
    return out


def parse_wordnet(wordnet_dir: Path) -> list[dict]:
    """All synsets of the four data files, with hypernym pointers resolved to their head words."""
    synsets: list[dict] = []
    for pos, name in POS_FILES.items():
        path = wordnet_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: install WordNet 3.0 (`apt-get install -y wordnet-base`) "
                f"or pass --wordnet-dir pointing at the folder holding data.{pos}"
            )
        synsets.extend(parse_data_file(path))
    head_word = {s["id"]: s["words"][0] for s in synsets}
    for s in synsets:
        s["hypernyms"] = list(dict.fromkeys(head_word[h] for h in s.pop("_hyper") if h in head_word))
    return synsets


def _write_jsonl_gz(records: list[dict], path: Path) -> None:
    """Write records as gzipped JSON lines, reproducibly (mtime 0, no file name in the header), atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
        ):
            text = io.TextIOWrapper(gz, encoding="utf-8", newline="\n")
            for rec in records:
                text.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
            text.flush()
            text.detach()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


KEYS = ("id", "pos", "category", "words", "definition", "examples", "hypernyms", "instance")


def build(wordnet_dir: Path, out_dir: Path, keep: float, test_percent: float, copyright_file: Path | None) -> dict:
    """Parse, split, subsample and write; return a summary dict."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"--keep must be in (0, 1], got {keep}")
    if not 0.0 < test_percent < 100.0:
        raise ValueError(f"--test-percent must be in (0, 100), got {test_percent}")
    synsets = parse_wordnet(wordnet_dir)
    kept = [s for s in synsets if s["definition"] and _unit_hash(KEEP_SALT, s["id"]) < keep]
    kept.sort(key=lambda s: s["id"])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"synsets_total": len(synsets), "kept": len(kept)}
    for split in ("train", "test"):
        records = [{k: s[k] for k in KEYS} for s in kept if split_of(s["id"], test_percent) == split]
        path = out_dir / f"wordnet_{split}.jsonl.gz"
        _write_jsonl_gz(records, path)
        summary[split] = {
            "synsets": len(records),
            "bytes": path.stat().st_size,
            "top_categories": Counter(r["category"] for r in records).most_common(12),
        }
    if copyright_file is not None:
        lic = out_dir / "LICENSE-wordnet.txt"
        tmp = lic.with_name(f".{lic.name}.tmp")
        tmp.write_text(LICENSE_HEADER + extract_license(copyright_file.read_text(encoding="utf-8")), encoding="utf-8")
        os.replace(tmp, lic)
    return summary


def extract_license(copyright_text: str) -> str:
    """The WordNet licence paragraph of a Debian copyright file (DEP-5), as plain text."""
    lines = copyright_text.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("License: WordNet"))
    except StopIteration:
        raise ValueError(
            "no 'License: WordNet...' stanza in the copyright file; pass the wordnet-base "
            "copyright file (/usr/share/doc/wordnet-base/copyright)"
        ) from None
    body, copyright_line = [], ""
    for ln in lines[start - 1 :: -1]:
        if ln.startswith("Copyright:"):
            copyright_line = ln.split(":", 1)[1].strip()
            break
    for ln in lines[start + 1 :]:
        if not ln.startswith(" "):
            break
        body.append("" if ln.strip() == "." else ln[1:])
    head = (
        f"Copyright: {copyright_line}\nLicense: {lines[start].split(':', 1)[1].strip()}\n\n" if copyright_line else ""
    )
    return head + "\n".join(body).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    p.add_argument("--copyright", type=Path, default=Path("/usr/share/doc/wordnet-base/copyright"))
    p.add_argument("--out", type=Path, default=here / "hf_lowrank" / "data")
    p.add_argument("--keep", type=float, default=0.3, help="fraction of synsets kept (hash-based subsample)")
    p.add_argument("--test-percent", type=float, default=10.0, help="percent of synset ids in the test split")
    args = p.parse_args(argv)
    if shutil.which("wn") is None and not args.wordnet_dir.exists():
        print("WordNet not found: apt-get install -y wordnet-base", file=sys.stderr)
        return 1
    copyright_file = args.copyright if args.copyright.is_file() else None
    if copyright_file is None:
        print(f"warning: {args.copyright} not found; LICENSE-wordnet.txt left unchanged", file=sys.stderr)
    summary = build(args.wordnet_dir, args.out, args.keep, args.test_percent, copyright_file)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
