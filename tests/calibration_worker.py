"""Worker for ``tests/test_distributed.py``: calibration-only compression of a tiny Llama, in 1 or N processes.

Over the same 5 calibration batches (different lengths, some padding):

- ``torchrun --nproc_per_node 2 tests/calibration_worker.py --out D2`` (gloo on the CPU): each process takes its shard
  ``batches[rank::2]`` (3 and 2 batches) and passes a DDP-wrapped model, as a training script would;
- :func:`run` ``(0, 1)`` (the test calls it in its own process, saving a third interpreter start), or
  ``python tests/calibration_worker.py --out D1``: one process over all the batches.

Cases (each on a fresh copy of the seed-0 model): ``calibration_grams(..., outputs=True)`` over all the batches
(``grams``) and over the first batch only (``grams_one``: the second process has none); ``compress_model(model, 0.5,
calibration=...)`` with the defaults (Kronecker Grams, global allocation; ``kronecker``), over the first batch only
(``kronecker_one``), sequential whitening (``sequential``) and whitening with the randomized SVD after seeding the
global RNG differently in each process (``randomized``). Each process writes ``rank<i>.pt`` with its Grams, token
counts and factor pairs (the record of :func:`run`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from testing_common import make_tiny_llama  # next to this file: on sys.path as a script and under pytest

N_BATCHES = 5


def calibration_batches() -> list[dict]:
    """Batches of 2 sequences of 6 to 14 tokens; the second sequence of every batch but the first is right-padded."""
    g = torch.Generator().manual_seed(7)
    batches = []
    for i in range(N_BATCHES):
        seq = 6 + 2 * i
        ids = torch.randint(0, 128, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, seq - i:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _groups(grams: dict) -> list[list[str]]:
    """The names that share one tensor, in order."""
    groups: dict[int, list[str]] = {}
    for name, t in grams.items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def run(rank: int, world: int) -> dict:
    """The record of one process (``world`` > 1: under an initialised process group)."""
    from hf_lowrank import LowRankLinear, compress_model
    from hf_lowrank.calibration.grams import calibration_grams
    from hf_lowrank.targets import find_target_linears

    def model():
        m = make_tiny_llama(seed=0)
        return torch.nn.parallel.DistributedDataParallel(m) if world > 1 else m

    data = calibration_batches()
    shards = {"all": data[rank::world], "one": data[:1][rank::world]}
    record: dict = {"world_size": world, "local_batches": {k: len(v) for k, v in shards.items()}}
    for case, shard in (("grams", shards["all"]), ("grams_one", shards["one"])):
        wrapped = model()
        inner = getattr(wrapped, "module", wrapped)
        g_in, g_out, tokens = calibration_grams(wrapped, find_target_linears(inner), shard, outputs=True,
                                                progress=False)
        record[case] = {"in": g_in, "out": g_out, "tokens": tokens, "shared_in": _groups(g_in)}
    cases = {
        "kronecker": dict(calibration=shards["all"]),
        "kronecker_one": dict(calibration=shards["one"]),
        "sequential": dict(calibration=shards["all"], sequential=True),
        "randomized": dict(calibration=shards["all"], calibration_weighting="whitened", method="randomized"),
    }
    with torch.random.fork_rng(devices=[]):
        for case, kwargs in cases.items():
            wrapped = model()
            torch.manual_seed(1000 + rank)  # a rank-dependent global RNG must not change the factors
            report = compress_model(wrapped, 0.5, progress=False, **kwargs)
            inner = getattr(wrapped, "module", wrapped)
            factors = {n: (m.down.weight.detach().clone(), m.up.weight.detach().clone())
                       for n, m in inner.named_modules() if isinstance(m, LowRankLinear)}
            record[case] = {"factors": factors, "ranks": report.ranks, "tokens": report.info["calibration_tokens"],
                            "weighting": report.info["weighting"]}
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    ns = parser.parse_args(argv)
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    record = run(rank, world)
    ns.out.mkdir(parents=True, exist_ok=True)
    torch.save(record, ns.out / f"rank{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
