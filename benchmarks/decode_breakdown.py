"""Where a decode step's time goes: block Linears, the LM head, everything else; dense vs factorized, side by side.

SmolLM2-135M (fp32, CPU), a prompt of ``--tokens`` tokens per sequence, then ``--steps`` one-token decode steps per
repetition, the models stepping in turn (rotated order). Timed per step: the whole step (no hooks), and, in a second
pass with forward hooks, the time inside the transformer-block Linears (dense ``nn.Linear`` or ``LowRankLinear``)
and inside ``lm_head``; the rest is attention over the KV cache, norms, rotary embeddings, the cache update and the
Python of 30 layers. Factorized models: uniform plain SVD at each ``--keeps`` (speed does not depend on the values).

The point it measures: a factorization can only speed up the part of a step that runs in the block Linears, so the
whole-step ratio at keep ``k`` is bounded below by ``1 - share * (1 - linear_ratio)``.

Run: ``python benchmarks/decode_breakdown.py [--keeps 0.9 0.5] [--batches 1 8] [--threads 1] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from inference_speed import _decode
from results_io import command_line, write_summary


class _Clock:
    """Forward pre/post hooks summing the wall time spent inside a set of modules."""

    def __init__(self, modules) -> None:
        self.total = 0.0
        self._start = 0.0
        self._depth = 0
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, out):
        self.total += time.perf_counter() - self._start

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _block_linears(model):
    from torch import nn

    from hf_lowrank import LowRankLinear

    found = []
    for name, module in model.named_modules():
        in_block = any(part.isdigit() for part in name.split("."))
        if isinstance(module, LowRankLinear) or (in_block and isinstance(module, nn.Linear)
                                                 and not name.endswith((".down", ".up"))):
            found.append(module)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.5])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from hf_lowrank import compress_model
    from hf_lowrank.demo.models import load_smollm2

    dense, _ = load_smollm2()
    dense = dense.eval()
    models = {"dense": dense}
    for keep in args.keeps:
        m = copy.deepcopy(dense)
        compress_model(m, keep, progress=False)
        models[f"uniform keep {keep}"] = m.eval()
    rows = {}
    for batch in args.batches:
        ids = torch.randint(100, 40000, (batch, args.tokens), generator=torch.Generator().manual_seed(batch))
        plain = _decode(models, ids, args.steps, args.repeats)
        clocks = {n: {"linears": _Clock(_block_linears(m)), "lm_head": _Clock([m.lm_head])} for n, m in models.items()}
        parts = {n: {part: [] for part in per} for n, per in clocks.items()}

        def around(name, started, clocks=clocks, parts=parts):
            for part, clock in clocks[name].items():
                if started:
                    clock.total = 0.0
                else:
                    parts[name][part].append(clock.total)

        hooked_steps = _decode(models, ids, args.steps, args.repeats, around)
        for per in clocks.values():
            for c in per.values():
                c.remove()
        dense_step = statistics.median(plain["dense"])
        dense_lin = statistics.median(parts["dense"]["linears"])
        for n in models:
            step = statistics.median(plain[n])
            lin = statistics.median(parts[n]["linears"])
            head = statistics.median(parts[n]["lm_head"])
            hooked = statistics.median(hooked_steps[n])
            rows[f"{n}, batch {batch}"] = {
                "step_ms": round(step * 1e3, 2),
                "step_vs_dense": round(step / dense_step, 3),
                "block_linears_ms": round(lin * 1e3, 2),
                "block_linears_vs_dense": round(lin / dense_lin, 3),
                "block_linear_share_of_step": round(lin / hooked, 3),
                "lm_head_share_of_step": round(head / hooked, 3),
                "rest_share_of_step": round(1 - (lin + head) / hooked, 3),
                "hook_overhead": round(hooked / step, 3),
            }
    write_summary({"model": "SmolLM2-135M-Instruct (fp32, CPU)", "threads": args.threads, "prompt_tokens": args.tokens,
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows,
                   "command": command_line("decode_breakdown.py", args)}, args.out)


if __name__ == "__main__":
    main()
