"""Compress, then heal: a short LoRA fine-tune of the factors, merged back into the compressed checkpoint.

After a deep data-aware compression (keep 0.6 of the block Linears' parameters) most of the lost quality comes back
with a few dozen optimizer steps on text of the calibration kind. SVD-LLM (Wang et al., 2024, arXiv:2403.07378) and
WeLore (Jaiswal et al., 2024, arXiv:2407.11239) heal the same way; here the heal is plain peft:

1. ``compress_model(model, keep, calibration=batches)``: the calibrated default (Kronecker-factored Fisher weighting,
   global rank allocation) replaces every block Linear by a ``LowRankLinear`` whose factors are the ordinary
   ``nn.Linear`` children ``down`` (``in -> r``) and ``up`` (``r -> out``);
2. ``get_peft_model(model, LoraConfig(target_modules=["up", "down"]))``: LoRA (Hu et al., 2021, arXiv:2106.09685) on
   those factor Linears (the names match the children, not ``up_proj`` / ``down_proj``), trained with a plain torch
   loop on fixed-length chunks of the calibration text;
3. ``merge_and_unload()``: each LoRA update ``B A`` is added to the factor it wraps (``up: (out, r)``,
   ``down: (r, in)``), so the ranks and the parameter count do not change, and ``save_pretrained`` writes the same
   factorized checkpoint as before the heal, which ``from_pretrained`` (after ``import hf_lowrank``) reloads exactly.

``--targets up`` puts LoRA on ``up`` only, ``--targets full`` trains the factors themselves (no adapter: the
low-rank components fine-tuned directly, WeLore's LRC training); ``docs/healing.md`` compares them per step.

Run: ``python examples/heal.py --keep 0.6 --steps 50 --out heal_out`` (SmolLM2-135M, offline; about five minutes on a
laptop CPU), or ``python examples/heal.py --smoke`` (a tiny random Llama with the same tokenizer, seconds).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

TARGETS = ("factors", "up", "full")


def token_chunks(tokenizer, texts: Sequence[str], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """The texts joined by blank lines, tokenized once and cut into ``(n, seq_len)`` rows (the tail dropped)."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n < 1:
        raise ValueError(f"The healing text has {len(ids)} tokens, fewer than one chunk of {seq_len}: pass more text.")
    return ids[: n * seq_len].view(n, seq_len)


def _factor_params(model: nn.Module) -> list[nn.Parameter]:
    from hf_lowrank import LowRankLinear

    return [p for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.down.weight, m.up.weight)]


def heal(
    model: nn.Module,
    chunks: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 4,
    lr: float = 1e-3,
    lora_r: int = 16,
    lora_alpha: int = 32,
    targets: str = "factors",
    warmup: int | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    eval_at: Sequence[int] = (),
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> tuple[nn.Module, list[dict]]:
    """Heal a compressed causal LM on ``chunks`` and return it with the heal merged in (factorized format kept).

    Args:
        model: a model whose Linears ``compress_model`` replaced by ``LowRankLinear`` (modified in place).
        chunks: ``(n, seq_len)`` token ids (:func:`token_chunks`), taken in order, cycling.
        steps: optimizer steps (AdamW, linear warmup then constant learning rate).
        batch_size: chunks per step.
        lr: peak learning rate (LoRA wants a larger one than full fine-tuning; ``"full"`` uses ``lr / 10``).
        lora_r, lora_alpha: LoRA rank and scaling numerator (peft's ``r`` / ``lora_alpha``).
        targets: ``"factors"`` (LoRA on every ``up`` and ``down``), ``"up"`` (LoRA on ``up`` only) or ``"full"``
            (the factor weights themselves train; biases, norms and embeddings stay frozen).
        warmup: warmup steps (default a tenth of ``steps``).
        evaluate: optional ``model -> {metric: value}`` run at each step in ``eval_at`` (0 = before training).
        eval_at: the steps at which ``evaluate`` runs.
        seed: seeds the LoRA initialisation.
        log: where progress lines go (``None``: silent).

    Returns:
        ``(model, history)``: the healed model with ``LowRankLinear`` layers of unchanged ranks (LoRA merged and
        unwrapped), and ``[{"step", "loss", "seconds", **evaluate(...)}]`` for each evaluated step (``loss``: the
        mean training loss since the previous entry; ``seconds``: training time so far, evaluations excluded).
    """
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}.")
    if chunks.ndim != 2 or chunks.shape[1] < 2:
        raise ValueError(f"chunks must be (n, seq_len >= 2) token ids, got shape {tuple(chunks.shape)}.")
    factors = _factor_params(model)
    if not factors:
        raise ValueError("The model has no LowRankLinear layer: run hf_lowrank.compress_model(model, ...) first.")
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    if targets == "full":
        trained = model
        for p in factors:
            p.requires_grad_(True)
        lr = lr / 10
    else:
        from peft import LoraConfig, get_peft_model

        names = ["up", "down"] if targets == "factors" else ["up"]
        trained = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                   target_modules=names, bias="none"))
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10) if warmup is None else warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    history: list[dict] = []
    start, loss_sum, loss_n, eval_seconds = time.perf_counter(), 0.0, 0, 0.0

    def record(step: int) -> None:
        nonlocal eval_seconds
        entry = {"step": step, "loss": round(loss_sum / loss_n, 4) if loss_n else None,
                 "seconds": round(time.perf_counter() - start - eval_seconds, 1)}
        if evaluate is not None:
            began = time.perf_counter()
            entry.update(evaluate(trained))
            eval_seconds += time.perf_counter() - began
        history.append(entry)
        if log:
            log(f"heal step {step}: {entry}")

    if 0 in eval_at:
        record(0)
    n = chunks.shape[0]
    for step in range(1, steps + 1):
        trained.train()
        rows = torch.arange((step - 1) * batch_size, step * batch_size) % n
        batch = chunks[rows]
        loss = trained(input_ids=batch, labels=batch).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"Healing loss is {loss.item()} at step {step}: lower the learning rate ({lr}).")
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if step in eval_at:
            record(step)
            loss_sum, loss_n = 0.0, 0
    trained.eval()
    healed = trained if targets == "full" else trained.merge_and_unload()
    for p in healed.parameters():
        p.requires_grad_(False)
    from hf_lowrank import LowRankLinear

    for m in healed.modules():
        if isinstance(m, LowRankLinear):
            m.lay_out_for_speed_()
    return healed, history


def _smoke_model(tokenizer):
    """A tiny random Llama over the SmolLM2 tokenizer's vocabulary (2 blocks of width 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.6, help="fraction of the block Linears' parameters kept")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--targets", choices=TARGETS, default="factors")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--eval-texts", type=int, default=32)
    parser.add_argument("--out", default="heal_out", help="folder of the healed compressed checkpoint")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, 4 steps: checks the recipe runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.eval_texts, args.calibration_tokens = min(args.steps, 4), 4, 512
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_lowrank
    from hf_lowrank import calibration_batches
    from hf_lowrank.demo.evaluation import perplexity
    from hf_lowrank.demo.models import load_smollm2, smollm2_dir
    from hf_lowrank.demo.wordnet import prose_texts

    if args.smoke:
        tok = AutoTokenizer.from_pretrained(str(smollm2_dir()), local_files_only=True)
        tok.pad_token = tok.pad_token or tok.eos_token
        model = _smoke_model(tok)
    else:
        model, tok = load_smollm2()
    held_out = prose_texts("test", args.eval_texts)

    def ppl(m) -> float:
        return perplexity(m, tok, held_out, progress=False)

    dense = ppl(model)
    # Calibration and healing text: the bundled training prose (the evaluation prose above is disjoint from it).
    train = prose_texts("train")
    calibration_ids = token_chunks(tok, train, args.seq, args.calibration_tokens)
    batches = [{"input_ids": calibration_ids[i : i + 8]} for i in range(0, len(calibration_ids), 8)]
    if args.smoke:
        batches = calibration_batches(tok, train[:16], max_length=args.seq)
    report = hf_lowrank.compress_model(model, args.keep, calibration=batches, progress=False)
    compressed = ppl(model)
    print(f"dense {dense:.2f}; compressed (keep {report.kept_fraction:.2f}) {compressed:.2f}")
    chunks = token_chunks(tok, train, args.seq)[len(calibration_ids):]  # the calibration text's continuation
    healed, _ = heal(model, chunks, steps=args.steps, batch_size=args.batch, lr=args.lr, lora_r=args.lora_r,
                     targets=args.targets, eval_at=[args.steps] if args.steps else [])
    after = ppl(healed)
    out = Path(args.out)
    hf_lowrank.save_compressed(healed, out, tokenizer=tok)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    probe = torch.tensor([tok("The heal keeps the factorized format.").input_ids])
    with torch.no_grad():
        same = torch.equal(healed(probe).logits, reloaded(probe).logits)
    ranks_kept = all(isinstance(reloaded.get_submodule(n), hf_lowrank.LowRankLinear) for n in report.ranks)
    print(f"healed after {args.steps} steps ({args.targets}): {after:.2f} (x{after / dense:.3f} of dense)")
    print(f"saved to {out}; reloaded logits identical: {same}; every compressed module reloads factorized: "
          f"{ranks_kept}")
    if not (same and ranks_kept):
        raise SystemExit("the healed checkpoint did not reload exactly")


if __name__ == "__main__":
    main()
