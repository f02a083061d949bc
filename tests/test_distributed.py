"""Multi-process training on the CPU: 2 processes (torchrun, gloo) against 1 process over the same global batches.

``tests/distributed_worker.py`` trains FisherLoRA (LowRankTrainer; and plain Trainer + callbacks), WeLore, SPSFT and
a full fine-tuning saved as an ERE residual, once under DDP with 2 processes of 2 sequences each and once in one
process with 2 accumulation steps of 2 sequences; and a full fine-tuning sharded with FSDP2 ``fully_shard`` (gloo
runs it on the CPU), compressed on save from the gathered weights. DDP averages the two processes' gradients where one process sums
its two accumulated micro-batches, so the optimizer sees the same gradient, and the Fisher, which squares each
micro-batch's contribution, must be the same too: the acceptance is 1e-5 relative, and the same compressed model.

``tests/calibration_worker.py`` compresses with calibration only, 2 processes each over its shard of the batches
(a DDP-wrapped model) against 1 process over all of them: the all-reduced Grams, the token counts and the factors
must agree to 1e-5, also where one process has no batch at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).with_name("distributed_worker.py")
CALIBRATION_WORKER = Path(__file__).with_name("calibration_worker.py")
TIMEOUT = 600


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    # The workers import hf_lowrank from this checkout, not from wherever the package is installed (a script's
    # sys.path starts with its own folder, tests/, so the repository root must be named).
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return env


def _launch(root: Path, worker: Path, single_args: tuple[str, ...] | None = (), timeout: int = TIMEOUT,
            while_waiting=None) -> tuple[Path, Path]:
    """Launch ``worker`` in 2 processes (torchrun, gloo) and (unless ``single_args`` is None) in 1 process side by
    side, calling ``while_waiting()`` meanwhile; return their output folders."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    d2, d1 = root / "ddp2", root / "single"
    names = ("ddp2",) if single_args is None else ("ddp2", "single")
    logs = {name: open(root / f"{name}.log", "w") for name in names}  # noqa: SIM115
    procs = {"ddp2": subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         "--out", str(d2)],
        stdout=logs["ddp2"], stderr=subprocess.STDOUT, env=_env(),
    )}
    if single_args is not None:
        procs["single"] = subprocess.Popen(
            [sys.executable, str(worker), "--out", str(d1), *single_args],
            stdout=logs["single"], stderr=subprocess.STDOUT, env=_env(),
        )
    try:
        if while_waiting is not None:
            while_waiting()
        codes = {name: proc.wait(timeout) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for f in logs.values():
            f.close()
    for name, code in codes.items():
        if code != 0:
            tail = (root / f"{name}.log").read_text()[-4000:]
            pytest.fail(f"the {name} run exited with {code}:\n{tail}")
    return d1, d2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The training runs of ``distributed_worker.py``: 2 processes, and 1 process with 2 accumulation steps."""
    return _launch(tmp_path_factory.mktemp("ddp"), WORKER, ("--grad-accum", "2"))


@pytest.fixture(scope="module")
def calibration_runs(tmp_path_factory):
    """``calibration_worker.py``'s records: ``(single, [rank 0, rank 1])``, the single-process one computed here while
    the 2 processes run. A process that waits for a collective the other never joins hangs: the timeout makes that a
    failure."""
    from tests.calibration_worker import run

    single = {}
    _, d2 = _launch(tmp_path_factory.mktemp("calibration"), CALIBRATION_WORKER, None, timeout=300,
                    while_waiting=lambda: single.update(run(0, 1)))
    return single, [torch.load(d2 / f"rank{r}.pt") for r in (0, 1)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


@pytest.mark.parametrize("method", ["fisher_lora", "fisher_callbacks"])
def test_ddp_fisher_equals_single_process(runs, method):
    from hf_lowrank.tuners.fisher_lora import FisherState

    d1, d2 = runs
    single = FisherState.load(d1 / method / "compressed" / "fisher_state.safetensors")
    ddp = FisherState.load(d2 / method / "compressed" / "fisher_state.safetensors")
    # 6 Linears x (A, B) for both methods, plus the Kronecker Grams (G_in, G_out) of FisherLoRA's default weighting
    assert sorted(single.tensors) == sorted(ddp.tensors) and len(single.tensors) == (24 if method == "fisher_lora" else 12)
    assert (method == "fisher_lora") == any(k.endswith(".gram_out") for k in single.tensors)
    for key, ref in single.tensors.items():
        assert float(ref.abs().max()) > 0, key
        assert _rel(ref, ddp.tensors[key]) < 1e-5, key
    # Both saw 8 micro-batches of 2 sequences (4 steps x 2), counted over the processes.
    assert (ddp.micro_batches, ddp.samples) == (single.micro_batches, single.samples) == (8, 16)
    assert ddp.global_step == single.global_step == 4


@pytest.mark.parametrize("method", ["fisher_lora", "fisher_callbacks", "fsdp"])
def test_compressed_model_equals_single_process(runs, method):
    """DDP: FWSVD with the reduced Fisher on the main process. FSDP: plain SVD of the weights gathered from 2 shards."""
    from transformers import AutoModelForCausalLM

    from hf_lowrank import LowRankLinear  # importing hf_lowrank registers the loader of factorized checkpoints

    d1, d2 = runs
    models = [AutoModelForCausalLM.from_pretrained(d / method / "compressed").eval() for d in (d1, d2)]
    factorized = [{n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)} for model in models]
    assert factorized[0] == factorized[1] and set(factorized[0].values()) == {8}
    assert len(factorized[0]) == (14 if method == "fsdp" else 6)  # all block Linears / the LoRA targets
    modules = [dict(model.named_modules()) for model in models]
    for name in factorized[0]:
        # The rank-8 product (basis-free). The Fisher agrees to ~1e-7 (summation order); a truncated SVD amplifies
        # that by 1 / (gap between the 8th and 9th singular values), which is small for random tiny weights.
        w1, w2 = (m[name].up.weight @ m[name].down.weight for m in modules)
        assert _rel(w1.detach(), w2.detach()) < 1e-4, name
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        l1, l2 = (model(input_ids=ids).logits for model in models)
    assert _rel(l1, l2) < 1e-5


@pytest.mark.parametrize("method", ["welore", "spsft"])
def test_ddp_adapter_training_equals_single_process(runs, method):
    d1, d2 = runs
    a1, a2 = (load_file(d / method / "adapter" / "adapter_model.safetensors") for d in (d1, d2))
    assert sorted(a1) == sorted(a2) and a1
    for key in a1:
        if a1[key].is_floating_point():
            assert _rel(a1[key], a2[key]) < 1e-6, key
        else:  # SPSFT's row indices
            assert torch.equal(a1[key], a2[key]), key


def test_ddp_full_finetune_ere_residual(runs):
    from hf_lowrank import decode_residual
    from tests.distributed_worker import base_model

    d1, d2 = runs
    f1, f2 = (load_file(d / "ere" / "full" / "model.safetensors") for d in (d1, d2))
    for key in f1:
        assert _rel(f1[key], f2[key]) < 1e-6, key
    r1, r2 = (load_file(d / "ere" / "residual" / "residual.safetensors") for d in (d1, d2))
    assert sorted(r1) == sorted(r2)
    # The residual written by the main process rebuilds the DDP-trained model: closer to it than the base is.
    base = base_model()
    decoded = decode_residual(base, d2 / "ere" / "residual", progress=False).state_dict()
    base_sd = base.state_dict()
    for key, tuned in f2.items():
        if key.endswith("proj.weight"):
            delta = (tuned - base_sd[key]).norm()
            assert delta > 0, key
            assert (decoded[key] - tuned).norm() < 0.9 * delta, key


def _fsdp_finetuned():
    """The fine-tuned weights of the ``fsdp`` method, recomputed in this process as the 1-process run trains them
    (plain SGD, 3 steps of 4 sequences). The 2-process run agrees to ~1e-7 (its float sums run in another order)."""
    from tests.distributed_worker import Tokens, base_model

    model = base_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = Tokens().data
    for step in range(3):
        ids = data[4 * step: 4 * step + 4]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_fsdp_residual_and_fisher_refusal(runs):
    """FSDP2 on the CPU: the ERE residual of the gathered weights decodes to the fine-tuned model as faithfully as the
    1-process one; Fisher collection on a sharded model is refused with a message that gives the way out (DDP).

    The two residuals are not compared bit for bit: a 4-bit round-to-nearest code sitting at a rounding boundary flips
    for a 1e-7 change of its input (2 processes sum in another order, and the order depends on the BLAS and the CPU),
    which moves one decoded entry by a whole quantization step (measured: 4e-5 of lm_head's weight). Such flips cost
    about 1e-4 of the fine-tuning delta; a residual of wrongly gathered weights misses it by order 1."""
    from hf_lowrank import decode_residual
    from tests.distributed_worker import base_model

    d1, d2 = runs
    tuned, base = _fsdp_finetuned(), base_model().state_dict()
    decoded = [decode_residual(base_model(), d / "fsdp" / "residual", progress=False).state_dict() for d in (d1, d2)]
    assert sorted(decoded[0]) == sorted(decoded[1]) == sorted(tuned)
    trained = 0
    for key, target in tuned.items():
        delta = float((target - base[key]).double().norm())
        errors = [float((dec[key] - target).double().norm()) for dec in decoded]
        apart = float((decoded[0][key] - decoded[1][key]).double().norm())
        assert apart <= 1e-3 * delta + 1e-6, (key, apart, delta)  # a few flipped codes at most
        assert abs(errors[0] - errors[1]) <= 1e-3 * delta + 1e-6, (key, errors, delta)
        if key.endswith("proj.weight") or key == "lm_head.weight":
            assert delta > 0 and errors[1] < 0.95 * delta, (key, errors[1], delta)  # closer to it than the base is
            trained += 1
    assert trained == 15  # 7 Linears x 2 blocks and the head
    records = [json.loads((d2 / "fsdp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rec["sharded"] for rec in records)
    assert all("FSDP" in rec["fisher_error"] and "DDP" in rec["fisher_error"] for rec in records)
    assert json.loads((d1 / "fsdp" / "rank0.json").read_text())["fisher_error"] is None


@pytest.mark.parametrize("method", ["fisher_lora", "fisher_callbacks", "welore", "spsft", "ere", "fsdp"])
def test_only_the_main_process_writes_and_losses_match(runs, method):
    d1, d2 = runs
    records = {r: json.loads((d2 / method / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert all(rec["world_size"] == 2 for rec in records.values())
    assert records[0]["wrote"] is True and records[1]["wrote"] is False
    single = json.loads((d1 / method / "rank0.json").read_text())
    assert single["world_size"] == 1 and single["wrote"] is True
    assert len(single["loss"]) == (3 if method == "fsdp" else 4)
    assert records[0]["loss"] == pytest.approx(single["loss"], rel=1e-5)


@pytest.mark.parametrize("case", ["grams", "grams_one"])
def test_calibration_grams_all_reduced(calibration_runs, case):
    """Each process over its shard (3 + 2 batches; 1 + 0 for ``grams_one``) ends with the input and output-gradient
    Grams and the token count of one process over all the batches, the shared input Grams shared alike."""
    single, ranks = calibration_runs
    assert [r["local_batches"]["all" if case == "grams" else "one"] for r in ranks] == ([3, 2] if case == "grams"
                                                                                        else [1, 0])
    ref = single[case]
    assert ref["tokens"] == (90 if case == "grams" else 12)  # 2 x (6 + 8 + 10 + 12 + 14) - (1 + 2 + 3 + 4) padded
    assert len(ref["in"]) == len(ref["out"]) == 14  # 7 Linears x 2 blocks
    assert [len(g) for g in ref["shared_in"]] == [3, 1, 2, 1] * 2  # q/k/v, o, gate/up, down
    for rec in (r[case] for r in ranks):
        assert rec["tokens"] == ref["tokens"]
        assert rec["shared_in"] == ref["shared_in"]
        for side in ("in", "out"):
            assert sorted(rec[side]) == sorted(ref[side])
            for name, G in ref[side].items():
                assert float(G.abs().max()) > 0, (side, name)
                assert _rel(G, rec[side][name]) < 1e-5, (side, name, _rel(G, rec[side][name]))
    for side in ("in", "out"):  # the all-reduce gives every process the same sum
        for name, G in ranks[0][case][side].items():
            assert torch.equal(G, ranks[1][case][side][name]), (side, name)


@pytest.mark.parametrize("case", ["kronecker", "kronecker_one", "sequential", "randomized"])
def test_calibration_compression_equal_single_process(calibration_runs, case):
    """compress_model(model, 0.5, calibration=shard) under 2 processes: bit-identical factor pairs on both processes
    (also with a global RNG seeded differently per process: ``randomized``, whose range finder draws from its own
    fixed seed), and the ranks and rank-k products of one process over all the batches.

    The products, not the factors, are compared with the single process: the Grams agree to ~6e-8 (the processes sum
    in another order), a truncated SVD amplifies that by 1 / (gap between the kept and the dropped singular values)
    (measured: up to 9e-6 relative on the products), and a near-degenerate pair of singular vectors may rotate or
    flip sign within the kept subspace (measured: 2 o_proj factors of the randomized case), which leaves the
    product as it is."""
    single, ranks = calibration_runs
    ref = single[case]
    assert ref["weighting"] == ("kronecker" if case.startswith("kronecker") else "whitened")
    assert sorted(ref["factors"]) == sorted(ref["ranks"])
    if case.startswith("kronecker"):  # the global allocation moved the budget between modules
        assert len(set(ref["ranks"].values())) > 1 and len(ref["factors"]) >= 10
    else:
        assert len(ref["factors"]) == 14
    for rec in (r[case] for r in ranks):
        assert rec["tokens"] == ref["tokens"] == single["grams_one" if case == "kronecker_one" else "grams"]["tokens"]
        assert rec["ranks"] == ref["ranks"]
        for name, (down, up) in ref["factors"].items():
            down2, up2 = rec["factors"][name]
            assert _rel(up @ down, up2 @ down2) < 1e-4, (name, _rel(up @ down, up2 @ down2))
    for name, pair in ranks[0][case]["factors"].items():
        for a, b in zip(pair, ranks[1][case]["factors"][name]):
            assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (accelerate runs FSDP only there)")
def test_trainer_fsdp_compress_on_save_on_gpu(tmp_path):
    """The GPU-only path: ``Trainer(fsdp=True)`` (FSDP2, one process per GPU, up to 2) shards the model, and
    CompressOnSaveCallback gathers it for compression; the result equals an unsharded run's."""
    from transformers import AutoModelForCausalLM

    n = min(2, torch.cuda.device_count())
    launches = {
        "fsdp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), str(WORKER),
                 "--out", str(tmp_path / "fsdp"), "--methods", "trainer_fsdp", "--grad-accum", str(2 // n)],
        "plain": [sys.executable, str(WORKER), "--out", str(tmp_path / "plain"), "--methods", "trainer_plain",
                  "--grad-accum", "2"],
    }
    for name, cmd in launches.items():
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, f"{name}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    fsdp = json.loads((tmp_path / "fsdp" / "trainer_fsdp" / "rank0.json").read_text())
    plain = json.loads((tmp_path / "plain" / "trainer_plain" / "rank0.json").read_text())
    assert fsdp["sharded"] and not plain["sharded"] and fsdp["wrote"] and plain["wrote"]
    models = [
        AutoModelForCausalLM.from_pretrained(tmp_path / k / f"trainer_{k}" / "compressed").eval() for k in launches
    ]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = [m(input_ids=ids).logits for m in models]
    assert _rel(logits[1], logits[0]) < 1e-3  # GPU reductions are not bit-reproducible across the two layouts
