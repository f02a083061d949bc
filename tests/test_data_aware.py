"""Data-aware compression (METHODS.md section 5): whitened / Kronecker-weighted low-rank numerics against brute force,
calibration Grams against an independent reading of the activations, global rank allocation against exhaustive search,
and the Kronecker Fisher collected during LoRA training against the layers' own inputs and output gradients."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_tiny_llama

from hf_lowrank import FisherLoRAConfig, compress_model
from hf_lowrank.calibration.grams import CalibrationGrams, calibration_grams
from hf_lowrank.fisher.collector import FisherCollector, FisherState
from hf_lowrank.ops.fisher import fwsvd, gram_factor, weighted_lowrank, weighted_relative_error, weighted_spectrum
from hf_lowrank.ops.rank_allocation import global_ranks
from hf_lowrank.ops.svd import SVDError, split_factors, truncated_svd
from hf_lowrank.targets import find_target_linears
from hf_lowrank.tuners.fisher_lora import compress_peft_model


def _objective(W, W_hat, X=None, Gout_root=None):
    D = W - W_hat
    if X is not None:
        D = D @ X
    if Gout_root is not None:
        D = Gout_root.T @ D
    return float(torch.linalg.matrix_norm(D) ** 2)


# ------------------------------------------------------------------------------------------------------ ops numerics
@pytest.mark.parametrize("tokens", [40, 200])
def test_whitened_lowrank_minimises_the_output_error_on_the_data(tokens):
    """||(W - W_hat) X|| of the whitened factors equals the optimum (tail of the spectrum of W L) and is never above
    plain SVD; the optimum is checked against W X's best rank-k approximation computed independently."""
    torch.manual_seed(1)
    W = torch.randn(12, 10, dtype=torch.float64)
    X = torch.randn(10, tokens, dtype=torch.float64) * torch.logspace(-1, 1, 10, dtype=torch.float64)[:, None]
    G = X @ X.T
    f = gram_factor(G, damping=0.0)
    assert f.fallback is None
    torch.testing.assert_close(f.L @ f.L.T * f.scale, G, rtol=1e-10, atol=1e-10)
    for k in (1, 3, 6):
        down, up = weighted_lowrank(W, k, in_factor=f.L, method="exact")
        ours = _objective(W, up @ down, X)
        # independent optimum: best rank-k approximation of Y = W X restricted to the row space of X
        S = torch.linalg.svdvals(W @ X)
        assert ours == pytest.approx(float((S[k:] ** 2).sum()), rel=1e-8)
        d2, u2 = split_factors(*truncated_svd(W, k, method="exact"))
        assert ours <= _objective(W, u2 @ d2, X) + 1e-9
        tail = weighted_spectrum(W, in_factor=f.L)[k:].square().sum() * f.scale
        assert ours == pytest.approx(float(tail), rel=1e-8)


def test_kronecker_weighting_minimises_the_two_sided_objective_brute_force():
    torch.manual_seed(2)
    W = torch.randn(7, 6, dtype=torch.float64)
    X = torch.randn(6, 30, dtype=torch.float64)
    Gz = torch.randn(7, 25, dtype=torch.float64)
    fin, fout = gram_factor(X @ X.T, damping=0.0), gram_factor(Gz @ Gz.T, damping=0.0)
    k = 2
    down, up = weighted_lowrank(W, k, out_factor=fout.L, in_factor=fin.L, method="exact")
    best = _objective(W, up @ down, X, Gz)
    # the exact optimum is the tail of the singular values of Gz^T W X; random rank-k candidates never do better
    S = torch.linalg.svdvals(Gz.T @ W @ X)
    assert best == pytest.approx(float((S[k:] ** 2).sum()), rel=1e-8)
    for _ in range(200):
        cand = (up + 0.05 * torch.randn_like(up)) @ (down + 0.05 * torch.randn_like(down))
        assert _objective(W, cand, X, Gz) >= best - 1e-9
    werr = weighted_relative_error(W, up @ down, fout.L, fin.L)
    assert werr == pytest.approx((best / float(torch.linalg.matrix_norm(fout.L.T @ W @ fin.L) ** 2 * fin.scale
                                               * fout.scale)) ** 0.5, rel=1e-6)


def test_diagonal_grams_reproduce_fwsvd_and_identity_grams_plain_svd():
    torch.manual_seed(3)
    W = torch.randn(16, 12)
    row, col = torch.rand(16) * 5, torch.rand(12) * 3
    eps = 1e-6
    expect_down, expect_up = fwsvd(W, 4, row_fisher=row, col_fisher=col, exponent=0.5, eps=eps, method="exact")
    fin, fout = gram_factor(torch.diag(col), damping=eps), gram_factor(torch.diag(row), damping=eps)
    down, up = weighted_lowrank(W, 4, out_factor=fout.L, in_factor=fin.L, method="exact")
    torch.testing.assert_close(up @ down, expect_up @ expect_down, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(down, expect_down, rtol=1e-4, atol=1e-5)  # same balance: the scale is normalised
    d1, u1 = gram_factor(col, damping=eps).L, gram_factor(row, damping=eps).L  # 1-D Grams: the same diagonal
    down1, up1 = weighted_lowrank(W, 4, out_factor=u1, in_factor=d1, method="exact")
    torch.testing.assert_close(up1 @ down1, expect_up @ expect_down, rtol=1e-5, atol=1e-5)
    eye = gram_factor(torch.eye(12) * 7.0, damping=0.0).L
    down2, up2 = weighted_lowrank(W, 4, in_factor=eye, method="exact")
    d3, u3 = split_factors(*truncated_svd(W, 4, method="exact"))
    torch.testing.assert_close(up2 @ down2, u3 @ d3, rtol=1e-5, atol=1e-5)


def test_rank_deficient_gram_falls_back_and_stays_finite():
    torch.manual_seed(4)
    X = torch.randn(20, 5, dtype=torch.float64)  # 5 tokens for 20 inputs: rank 5
    G = X @ X.T
    f = gram_factor(G, damping=0.0)
    assert f.fallback == "eigh" and torch.isfinite(f.L).all()
    W = torch.randn(8, 20, dtype=torch.float64)
    down, up = weighted_lowrank(W, 3, in_factor=f.L, method="exact")
    assert torch.isfinite(down).all() and torch.isfinite(up).all()
    # on the seen tokens the error is the optimum of the rank-3 problem up to the tiny clamp
    S = torch.linalg.svdvals(W @ X)
    assert _objective(W, up @ down, X) == pytest.approx(float((S[3:] ** 2).sum()), rel=1e-4)
    damped = gram_factor(G, damping=1e-4)  # damping makes it positive definite: no fallback
    assert damped.fallback is None
    zero = gram_factor(torch.zeros(4, 4))
    assert zero.fallback == "zero" and torch.equal(zero.L, torch.eye(4, dtype=torch.float64))


def test_gram_factor_refuses_bad_input():
    with pytest.raises(ValueError, match="inf or NaN"):
        gram_factor(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), name="m")
    with pytest.raises(ValueError, match="square"):
        gram_factor(torch.ones(3, 2))
    with pytest.raises(ValueError, match="damping"):
        gram_factor(torch.eye(2), damping=-1.0)
    with pytest.raises(ValueError, match="in_factor"):
        weighted_lowrank(torch.randn(4, 3), 1, in_factor=torch.eye(4))
    with pytest.raises(SVDError):
        weighted_lowrank(torch.full((4, 3), float("inf")), 1, in_factor=torch.eye(3))


# ------------------------------------------------------------------------------------------------- global allocation
def _brute_force(spectra, shapes, keep, multiple=1):
    budget = keep * sum(o * i for o, i in shapes.values())
    names = list(spectra)
    options = []
    for n in names:
        o, i = shapes[n]
        S2 = spectra[n].double().square()
        opts = [(k * (o + i), float(S2[k:].sum()), k) for k in range(1, min(o, i) + 1)
                if k * (o + i) < o * i and (k == 1 or k % multiple == 0)]
        opts.append((o * i, 0.0, None))
        options.append(opts)
    best = None
    for combo in itertools.product(*options):
        cost = sum(c for c, _, _ in combo)
        if cost <= budget + 1e-9:
            loss = sum(x for _, x, _ in combo)
            if best is None or loss < best[0] - 1e-12:
                best = (loss, {n: k for n, (_, _, k) in zip(names, combo)})
    return best


@pytest.mark.parametrize("seed", range(6))
def test_global_allocation_matches_exhaustive_search_on_equal_shapes(seed):
    torch.manual_seed(seed)
    shapes = {f"m{j}": (8, 8) for j in range(3)}
    spectra = {n: (torch.rand(8) * 10 ** torch.rand(1) * 3).sort(descending=True).values for n in shapes}
    for keep in (0.3, 0.5, 0.7):
        alloc = global_ranks(spectra, shapes, keep)
        loss, _ = _brute_force(spectra, shapes, keep)
        assert alloc.used <= alloc.budget + 1e-9
        assert alloc.loss == pytest.approx(loss, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_global_allocation_over_rank_multiples_matches_exhaustive_search(seed):
    """multiple=4: every rank is 1 or a multiple of 4 (or dense); the loss is the optimum over such ranks on equal
    shapes, and within the largest single step (greedy on a knapsack) on mixed shapes."""
    torch.manual_seed(seed)
    for shapes in ({n: (16, 16) for n in "abc"}, {"a": (24, 24), "b": (24, 16), "c": (16, 32)}):
        spectra = {n: (torch.rand(min(s)) * 10 ** (2 * torch.rand(1))).sort(descending=True).values
                   for n, s in shapes.items()}
        equal = len(set(shapes.values())) == 1
        slack = 0.0 if equal else max(float(S[:4].square().sum()) for S in spectra.values())
        for keep in (0.3, 0.5, 0.7):
            alloc = global_ranks(spectra, shapes, keep, multiple=4)
            assert all(r is None or r == 1 or r % 4 == 0 for r in alloc.ranks.values()), alloc.ranks
            loss, _ = _brute_force(spectra, shapes, keep, multiple=4)
            assert alloc.used <= alloc.budget + 1e-9
            assert loss * (1 - 1e-9) - 1e-9 <= alloc.loss <= loss * (1 + 1e-9) + slack + 1e-9


def test_compress_model_keep_ranks_are_multiples_of_eight_unless_told():
    """A float keep gives ranks that are multiples of RANK_MULTIPLE (uniform and global); rank_multiple=1 ranks within
    one of each module's floor, filled to the budget; an explicit rank is used as given."""
    from hf_lowrank.ops.svd import RANK_MULTIPLE, rank_for_keep

    assert RANK_MULTIPLE == 8 and rank_for_keep(1536, 576, 0.9, multiple=8) == 376
    assert rank_for_keep(1536, 576, 0.9) == 377 and rank_for_keep(16, 16, 0.3, multiple=8) == 2
    model = make_tiny_llama(seed=0)
    rep = compress_model(copy.deepcopy(model), 0.7, progress=False)
    assert rep.ranks and all(r % 8 == 0 for r in rep.ranks.values())
    exact = compress_model(copy.deepcopy(model), 0.7, rank_multiple=1, progress=False)
    targets = find_target_linears(model)
    floors = {n: rank_for_keep(m.out_features, m.in_features, 0.7) for n, m in targets.items()}
    assert set(exact.ranks) == set(floors) and all(exact.ranks[n] - floors[n] in (0, 1) for n in floors)
    assert sum(r.params_after for r in exact.modules) <= 0.7 * sum(r.params_before for r in exact.modules)
    glob = compress_model(copy.deepcopy(model), 0.7, calibration=_batches(n=2), progress=False)
    assert glob.info["allocation"] == "global" and all(r == 1 or r % 8 == 0 for r in glob.ranks.values())
    assert set(compress_model(copy.deepcopy(model), 13, progress=False).ranks.values()) == {13}


def test_global_allocation_is_near_optimal_on_mixed_shapes_and_keeps_dense_modules():
    torch.manual_seed(7)
    shapes = {"a": (8, 4), "b": (5, 5), "c": (6, 3)}
    spectra = {n: (torch.rand(min(s)) * 5).sort(descending=True).values for n, s in shapes.items()}
    for keep in (0.5, 0.6, 0.8, 1.0):
        alloc = global_ranks(spectra, shapes, keep)
        loss, _ = _brute_force(spectra, shapes, keep)
        assert alloc.used <= alloc.budget + 1e-9
        # greedy on a knapsack: optimal up to the one step that did not fit (the largest single step's loss)
        slack = max(float(S.square().max()) for S in spectra.values())
        assert loss - 1e-9 <= alloc.loss <= loss + slack
    full = global_ranks(spectra, shapes, 1.0)
    assert all(r is None for r in full.ranks.values()) and full.loss == 0.0  # everything fits dense
    flat = global_ranks({"big": torch.full((6,), 100.0), "tiny": torch.tensor([1.0, 1e-3, 1e-6])},
                        {"big": (6, 6), "tiny": (3, 12)}, 0.75)
    assert flat.ranks["big"] is None and flat.ranks["tiny"] == 1
    rel = global_ranks(spectra, shapes, 0.5, normalize="relative")
    assert rel.used <= rel.budget
    with pytest.raises(ValueError, match="raise keep"):
        global_ranks(spectra, shapes, 0.01)


# -------------------------------------------------------------------------------------------------- calibration Grams
def _batches(vocab=128, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 9), generator=g)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0  # right padding on the second row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_calibration_grams_match_the_activations_and_share_inputs():
    model = make_tiny_llama(seed=0)
    targets = find_target_linears(model)
    seen: dict[str, list] = {n: [] for n in targets}
    masks = []

    def capture(name):
        def hook(module, args):
            seen[name].append(args[0].detach().clone())
        return hook

    handles = [m.register_forward_pre_hook(capture(n)) for n, m in targets.items()]
    batches = _batches()
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
            masks.append(b["attention_mask"].bool())
    for h in handles:
        h.remove()
    grams, tokens = calibration_grams(model, targets, batches, progress=False)
    assert tokens == sum(int(m.sum()) for m in masks)
    for name in targets:
        X = torch.cat([x[m] for x, m in zip(seen[name], masks)])  # padded tokens left out
        torch.testing.assert_close(grams[name], X.T @ X, rtol=1e-4, atol=1e-4)
    attn = "model.layers.0.self_attn"
    assert grams[f"{attn}.q_proj"] is grams[f"{attn}.k_proj"] is grams[f"{attn}.v_proj"]
    assert grams[f"{attn}.q_proj"] is not grams[f"{attn}.o_proj"]


def _output_error(model, ref, batches):
    total = 0.0
    with torch.no_grad():
        for b in batches:
            total += float((model(**b).logits - ref(**b).logits)[b["attention_mask"].bool()].square().sum())
    return total


def test_compress_model_with_calibration_beats_plain_svd_on_its_data_and_records_it():
    dense = make_tiny_llama(seed=0)
    batches = _batches(n=6)
    whitened, plain = copy.deepcopy(dense), copy.deepcopy(dense)
    report = compress_model(whitened, 0.5, calibration=batches, calibration_weighting="whitened", progress=False)
    compress_model(plain, report.ranks, progress=False)
    assert report.method == "whitened" and report.info["calibration_tokens"] == sum(
        int(b["attention_mask"].sum()) for b in batches)
    assert _output_error(whitened, dense, batches) < 0.8 * _output_error(plain, dense, batches)
    glob = copy.deepcopy(dense)
    rep = compress_model(glob, 0.5, calibration=batches, allocation="global", progress=False)
    targets = find_target_linears(dense)
    budget = 0.5 * sum(m.out_features * m.in_features for m in targets.values())
    spent = sum(m.params_after - (m.shape[0] if targets[m.name].bias is not None else 0) for m in rep.modules)
    assert spent <= budget and rep.info["allocation"] == "global"


def test_calibration_kronecker_grams_are_the_loss_gradients_at_each_output_and_change_nothing():
    """outputs=True: G_out = sum over unpadded tokens of g g^T, g the gradient of the summed next-token loss at the
    module's output (read independently with tensor hooks); the weights, their requires_grad and .grad are left as
    they were, and the input Grams equal the forward-only ones."""
    model = make_tiny_llama(seed=0)
    targets = find_target_linears(model)
    batches = _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grams_in, grams_out, tokens = calibration_grams(model, targets, batches, outputs=True, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    forward_only, _ = calibration_grams(model, targets, batches, progress=False)
    for name in targets:
        torch.testing.assert_close(grams_in[name], forward_only[name], rtol=1e-5, atol=1e-5)

    reference = {n: 0.0 for n in targets}
    ref_model = copy.deepcopy(model).eval()
    mods = dict(ref_model.named_modules())
    for b in batches:
        outs = {}
        handles = [mods[n].register_forward_hook(lambda m, a, o, n=n, outs=outs: outs.__setitem__(n, o)) for n in targets]
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        out = ref_model(**b, labels=labels, use_cache=False)
        for h in handles:
            h.remove()
        loss = out.loss * int((labels != -100).sum())
        grads = torch.autograd.grad(loss, [outs[n] for n in targets])
        mask = b["attention_mask"].bool()
        for n, g in zip(targets, grads):
            rows = g[mask]
            reference[n] = reference[n] + rows.T @ rows
    for name in targets:
        torch.testing.assert_close(grams_out[name], reference[name], rtol=1e-4, atol=1e-6)
    assert tokens == sum(int(b["attention_mask"].sum()) for b in batches)


def test_reduce_grams_merges_what_each_process_holds(monkeypatch):
    """reduce_grams against a simulated second process (the 2-process run is tests/test_distributed.py): a Gram one
    process lacks is summed as zeros, a key no process holds stays absent, keys stay shared only where every process
    that holds them shares them (one all-reduce per tensor), the counts are summed, and an error or a shape that
    differs stops every process."""
    import hf_lowrank.calibration.grams as st

    a, d = torch.ones(2, 2), torch.full((3,), 2.0)
    mine = {"q": a, "k": a, "v": a, "d": d}  # q/k/v share one tensor here
    theirs = (None, {"q": "q", "k": "q", "v": "v", "e": "e"}, {"q": (2, 2), "k": (2, 2), "v": (2, 2), "e": (4,)}, [5, 1])
    reduced: list[list[torch.Tensor]] = []

    def fake_all_reduce(tensors):  # the other process contributes 1 everywhere
        reduced.append(list(tensors))
        for t in reduced[-1]:
            t.add_(1)

    monkeypatch.setattr(st, "world_size", lambda: 2)
    monkeypatch.setattr(st, "all_gather_objects", lambda obj: [obj, theirs])
    monkeypatch.setattr(st, "all_reduce_sum_", fake_all_reduce)
    store, counts = st.reduce_grams(mine, [7, 0])
    assert counts == [12, 1]
    assert sorted(store) == ["d", "e", "k", "q", "v"]
    assert store["q"] is store["k"] is a and store["v"] is not a  # v is alone on the other process
    assert len(reduced) == 1 and len(reduced[0]) == 4  # (q, k), v, d, e: each once
    assert torch.equal(store["q"], torch.full((2, 2), 2.0)) and torch.equal(store["v"], torch.full((2, 2), 2.0))
    assert torch.equal(store["d"], torch.full((3,), 3.0)) and torch.equal(store["e"], torch.ones(4))

    monkeypatch.setattr(st, "all_gather_objects", lambda obj: [obj, ("ValueError: bad batch", {}, {}, [0, 0])])
    with pytest.raises(RuntimeError, match="process 1 .*bad batch"):
        st.reduce_grams({}, [0, 0])
    with pytest.raises(KeyError, match="mine"):  # the process that failed raises its own error
        st.reduce_grams({}, [0, 0], error=KeyError("mine"))
    monkeypatch.setattr(st, "all_gather_objects", lambda obj: [obj, (None, {"d": "d"}, {"d": (4,)}, [])])
    with pytest.raises(ValueError, match="shape"):
        st.reduce_grams({"d": d})


def test_compress_model_kronecker_calibration_is_the_one_path_with_those_grams():
    """calibration_weighting='kronecker' factorizes with the Grams of calibration_grams(outputs=True) (the same
    weighted errors as passing them, with their token count, as CalibrationGrams) and is labelled so."""
    dense = make_tiny_llama(seed=0)
    batches = _batches(n=6)
    kron, explicit = copy.deepcopy(dense), copy.deepcopy(dense)
    report = compress_model(kron, 0.6, calibration=batches, calibration_weighting="kronecker", progress=False)
    assert report.method == "kronecker" and report.info["weighting"] == "kronecker"
    targets = find_target_linears(dense)
    g_in, g_out, tokens = calibration_grams(dense, targets, batches, outputs=True, progress=False)
    kept = report.ranks  # the global allocation may keep some modules dense
    collected = CalibrationGrams({n: g_in[n] for n in kept}, {n: g_out[n] for n in kept}, tokens)
    other = compress_model(explicit, kept, calibration=collected, progress=False)
    # the factors themselves are not unique where the damped spectrum is flat (few tokens): compare the objective
    ours = {m.name: m.weighted_rel_error for m in report.modules if m.rank is not None}
    assert ours and ours == pytest.approx({m.name: m.weighted_rel_error for m in other.modules}, rel=1e-3, abs=1e-5)

    with pytest.raises(ValueError, match="calibration_weighting='whitened'"):
        compress_model(copy.deepcopy(dense), 0.6, calibration=batches, calibration_weighting="kronecker",
                       sequential=True, progress=False)
    with pytest.raises(ValueError, match="calibration_weighting must be one of"):
        compress_model(copy.deepcopy(dense), 0.6, calibration=batches, calibration_weighting="fisher",
                       progress=False)


def test_calibration_defaults_are_the_measured_best_and_recorded():
    """A causal LM with a float keep: Kronecker weighting and global allocation; a rank map or an int stays uniform;
    sequential calibration is whitened; a model without a language-model head is whitened (it needs labels)."""
    from transformers import BertConfig, BertModel

    batches = _batches(n=2)
    rep = compress_model(make_tiny_llama(seed=0), 0.5, calibration=batches, progress=False)
    assert (rep.method, rep.info["weighting"], rep.info["allocation"]) == ("kronecker", "kronecker", "global")
    assert rep.info["loss_normalization"] == "none"  # losses on the model's loss scale compare raw
    rep = compress_model(make_tiny_llama(seed=0), 0.5, calibration=batches, calibration_weighting="whitened",
                         allocation="global", progress=False)
    assert rep.info["loss_normalization"] == "relative"  # raw output errors do not compare across modules
    rep = compress_model(make_tiny_llama(seed=0), 4, calibration=batches, progress=False)
    assert (rep.method, rep.info["allocation"]) == ("kronecker", "uniform")
    rep = compress_model(make_tiny_llama(seed=0), 0.5, calibration=batches, sequential=True, progress=False)
    assert (rep.method, rep.info["allocation"]) == ("whitened", "uniform")
    bert = BertModel(BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32))
    rep = compress_model(bert, 0.5, calibration=batches, progress=False)
    assert (rep.method, rep.info["allocation"]) == ("whitened", "uniform")


def test_calibration_kronecker_on_a_model_without_a_language_model_loss_asks_for_labels():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     num_labels=2)
    model = BertForSequenceClassification(cfg)
    targets = find_target_linears(model)
    batch = {"input_ids": torch.randint(0, 64, (2, 5))}
    with pytest.raises(ValueError, match="pass batches with 'labels'"):
        calibration_grams(model, targets, [batch], outputs=True, progress=False)
    assert all(p.requires_grad for p in model.parameters())
    _, grams_out, _ = calibration_grams(model, targets, [{**batch, "labels": torch.tensor([0, 1])}], outputs=True,
                                        progress=False)
    assert set(grams_out) == set(targets)


def test_compress_model_is_all_or_nothing():
    model = make_tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = list(find_target_linears(model))
    with torch.no_grad():
        model.get_submodule(targets[-1]).weight[0, 0] = float("nan")
    before[targets[-1] + ".weight"][0, 0] = float("nan")
    with pytest.raises(SVDError):
        compress_model(model, 0.5, progress=False)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) or k == targets[-1] + ".weight" for k in before)
    assert getattr(model.config, "quantization_config", None) is None


def test_unknown_weight_keys_are_refused():
    model = make_tiny_llama(seed=0)
    with pytest.raises(ValueError, match="not compression targets"):
        compress_model(model, 0.5, row_weights={"model.layers.0.mlp.up_projj": torch.ones(128)}, progress=False)
    with pytest.raises(ValueError, match="float keep fraction"):
        compress_model(model, 4, allocation="global", progress=False)
    with pytest.raises(ValueError, match="torch.dtype"):
        compress_model(model, 4, dtype="float16", progress=False)


# ---------------------------------------------------------------------------------------- Kronecker Fisher from LoRA
def test_kronecker_grams_from_lora_training_match_inputs_and_output_gradients():
    torch.manual_seed(0)
    cfg = FisherLoRAConfig(r=4, target_modules=["up_proj", "down_proj"], fisher_weighting="kronecker",
                           kronecker_max_dim=100, lora_dropout=0.5, init_lora_weights=False)
    model = get_peft_model(make_tiny_llama(seed=0), cfg)
    model.train()
    collector = FisherCollector("lora").attach(model)
    name = "model.layers.1.mlp.up_proj"
    layer = model.get_base_model().get_submodule(name)
    xs, gs = [], []
    h1 = layer.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().clone()))
    h2 = layer.register_full_backward_hook(lambda m, gin, gout: gs.append(gout[0].detach().clone()))
    batches = _batches(n=2)
    for b in batches:
        out = model(**b, labels=b["input_ids"])
        out.loss.backward()
    h1.remove()
    h2.remove()
    collector.detach()
    state = collector.snapshot()
    G_in, G_out = state.grams(name)
    masks = [b["attention_mask"].bool() for b in batches]
    X = torch.cat([x[m] for x, m in zip(xs, masks)])
    G = torch.cat([g[m] for g, m in zip(gs, masks)])
    torch.testing.assert_close(G_in, X.T @ X, rtol=1e-4, atol=1e-5)
    assert G_in.shape == (64, 64) and G_out.shape == (128,)  # a side wider than kronecker_max_dim: its diagonal
    torch.testing.assert_close(G_out, G.square().sum(0), rtol=1e-4, atol=1e-12)
    down_in, _ = state.grams("model.layers.1.mlp.down_proj")
    assert down_in.shape == (128,)  # down_proj's input (128) is wider than 100: its diagonal only
    # the state round-trips through safetensors with its Grams, and shapes are checked
    copy_state = FisherState(**{**state.__dict__, "tensors": dict(state.tensors)})
    copy_state.check_shapes({name: (128, 64)})


def test_kronecker_compression_of_a_peft_model_beats_two_sided_on_the_training_loss():
    torch.manual_seed(0)
    cfg = FisherLoRAConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], fisher_weighting="kronecker",
                           merge_before_compress=False, compress_keep=0.4)
    model = get_peft_model(make_tiny_llama(seed=0), cfg)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    collector = FisherCollector("lora").attach(model)
    batches = _batches(n=8, seed=3)
    for b in batches:
        model(**b, labels=b["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    collector.detach()
    state = collector.snapshot()
    model.eval()
    base = model.get_base_model()

    def logits(m):
        with torch.no_grad():
            return torch.cat([m(**b).logits[b["attention_mask"].bool()] for b in batches])

    with model.disable_adapter():
        ref = logits(model)  # VRAM-limited pipeline: the original weights are what is compressed

    def change(m):  # second-order change of the loss around the dense model (KL of the output distributions)
        return float(torch.nn.functional.kl_div(logits(m).log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                reduction="sum"))

    kron, rep = compress_peft_model(model, fisher=state, allocation="uniform", progress=False)
    two, _ = compress_peft_model(model, fisher=state, weighting="two_sided", allocation="uniform", progress=False)
    plain, _ = compress_peft_model(model, fisher_source="none", allocation="uniform", progress=False)
    assert rep.info["fisher_weighting"] == "kronecker" and rep.info["allocation"] == "uniform"
    assert change(kron) < min(change(two), change(plain))
    glob, rep_g = compress_peft_model(model, fisher=state, progress=False)  # the config's default: global
    assert rep_g.info["allocation"] == "global" and rep_g.kept_fraction <= 0.4 + 1e-6
    assert base is model.get_base_model()  # the trained model stays intact
    with pytest.raises(Exception, match="Kronecker Grams"):
        FisherState(tensors={k: v for k, v in state.tensors.items() if "gram" not in k}).grams(
            "model.layers.0.mlp.up_proj")


def test_save_compressed_writes_a_model_card_with_the_method_and_how_to_load(tmp_path):
    import hf_lowrank

    model = make_tiny_llama(seed=0)
    report = compress_model(model, 0.5, calibration=_batches(n=2), allocation="global", progress=False)
    folder = hf_lowrank.save_compressed(model, tmp_path / "out", report=report)
    card = (folder / "README.md").read_text()
    assert card.startswith("---") and "hf-lowrank" in card and "import hf_lowrank" in card
    assert "kronecker" in card and "global" in card
    plain = make_tiny_llama(seed=0)
    hf_lowrank.save_compressed(plain, tmp_path / "dense")
    assert not (tmp_path / "dense" / "README.md").exists()  # not compressed: no hf-lowrank card


def test_plot_ranks_of_a_global_allocation_checkpoint(tmp_path):
    """hf-lowrank plot ranks FOLDER draws a compressed checkpoint's rank map; dense-kept modules count as full rank."""
    pytest.importorskip("matplotlib")
    import hf_lowrank
    from hf_lowrank.cli import main
    from hf_lowrank.demo.plotting import ranks_from_report

    model = make_tiny_llama(seed=0)
    report = compress_model(model, 0.5, calibration=_batches(n=2), progress=False)
    folder = hf_lowrank.save_compressed(model, tmp_path / "out", report=report)
    ranks, shapes, factorized, saved = ranks_from_report(folder)
    assert saved["method"] == report.method
    assert set(ranks) == {m.name for m in report.modules} and set(factorized) == set(report.ranks)
    assert all(ranks[n] == (report.ranks[n] if n in report.ranks else min(shapes[n])) for n in ranks)
    assert main(["plot", "ranks", str(folder), "--out", str(tmp_path / "ranks.png")]) == 0
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="compression_report.json"):
        ranks_from_report(tmp_path)


def test_sequential_calibration_measures_each_block_after_the_compressed_ones_before_it():
    dense = make_tiny_llama(seed=0)
    batches = _batches(n=4)
    seq, flat = copy.deepcopy(dense), copy.deepcopy(dense)
    rep = compress_model(seq, 0.5, calibration=batches, sequential=True, progress=False)
    compress_model(flat, 0.5, calibration=batches, calibration_weighting="whitened", progress=False)
    assert rep.info["sequential"] and rep.info["calibration_tokens"] == sum(int(b["attention_mask"].sum())
                                                                             for b in batches)

    def product(model, name):
        m = model.get_submodule(name)
        return m.up.weight @ m.down.weight

    names = [m.name for m in rep.modules]
    first = [n for n in names if n.startswith("model.layers.0.")]
    later = [n for n in names if n.startswith("model.layers.1.")]
    for n in first:  # nothing is compressed before block 0: the same Grams, the same factors
        torch.testing.assert_close(product(seq, n), product(flat, n), rtol=1e-4, atol=1e-5)
    # block 1 saw the outputs of the compressed block 0: its Grams (and factors) differ
    assert any(not torch.allclose(product(seq, n), product(flat, n), atol=1e-4) for n in later)
    # block 1's Grams are those of the inputs that reach it in the model with block 0 compressed
    probe = copy.deepcopy(dense)
    for n in first:
        from hf_lowrank.compression.compress import set_submodule

        set_submodule(probe, n, copy.deepcopy(seq.get_submodule(n)))
    grams, tokens = calibration_grams(probe, {n: probe.get_submodule(n) for n in later}, batches, progress=False)
    ref = copy.deepcopy(probe)
    compress_model(ref, {n: rep.ranks[n] for n in later}, calibration=CalibrationGrams(grams, None, tokens),
                   calibration_weighting="whitened", progress=False)
    for n in later:
        torch.testing.assert_close(product(seq, n), product(ref, n), rtol=1e-4, atol=1e-5)


def test_sequential_calibration_is_all_or_nothing_and_validates():
    model = make_tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    last = list(find_target_linears(model))[-1]
    with torch.no_grad():
        model.get_submodule(last).weight[0, 0] = float("inf")
    before[last + ".weight"][0, 0] = float("inf")
    with pytest.raises(SVDError):
        compress_model(model, 0.5, calibration=_batches(n=2), sequential=True, progress=False)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="sequential"):
        compress_model(model, 0.5, sequential=True, progress=False)
    with pytest.raises(ValueError, match="sequential"):
        compress_model(model, 0.5, calibration=_batches(n=1), sequential=True, allocation="global", progress=False)


def test_recompressing_a_compressed_model_says_so():
    model = make_tiny_llama(seed=0)
    compress_model(model, 0.5, progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        compress_model(model, 0.5, progress=False)


def test_kronecker_on_a_4bit_base_compresses_the_dequantized_weights(tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_fisher_lora import _qlora_model

    import hf_lowrank

    base = _qlora_model(make_tiny_llama(seed=0), tmp_path)
    assert type(base.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    cfg = FisherLoRAConfig(r=4, target_modules=["up_proj", "down_proj"], merge_before_compress=False,
                           compress_keep=0.5, init_lora_weights=False)
    assert cfg.fisher_weighting == "kronecker" and cfg.compress_allocation == "global"  # the measured defaults
    assert cfg.kronecker_max_dim == "hidden_size"
    pm = get_peft_model(base, cfg)
    collector = FisherCollector("lora").attach(pm)
    pm.train()
    for b in _batches(n=3):
        pm(**b, labels=b["input_ids"]).loss.backward()
    collector.detach()
    G_in, G_out = collector.snapshot().grams("model.layers.0.mlp.up_proj")
    # kronecker_max_dim='hidden_size' (64): the 128-wide output side keeps its diagonal
    assert G_in.shape == (64, 64) and G_out.shape == (128,) and G_in.any() and G_out.any()
    out, report = compress_peft_model(pm, fisher=collector, progress=False)
    assert not any(type(m).__name__ == "Linear4bit" for m in out.modules())
    assert report.info["fisher_weighting"] == "kronecker" and report.kept_fraction <= 0.5 + 1e-6
    folder = hf_lowrank.save_compressed(out, tmp_path / "q", report=report)
    reloaded = hf_lowrank.load_compressed(folder).eval()
    x = _batches(n=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**x).logits, out.eval()(**x).logits, rtol=1e-5, atol=1e-5)


def test_global_allocation_of_raw_whitened_losses_warns(caplog):
    """Raw whitened losses do not compare across modules (measured far worse than uniform): that choice is named."""
    import logging

    model = make_tiny_llama(seed=0)
    grams, _ = calibration_grams(model, find_target_linears(model), _batches(), progress=False)
    with caplog.at_level(logging.WARNING, logger="hf_lowrank.compression.compress"):
        compress_model(copy.deepcopy(model), 0.5, grams_in=grams, allocation="global", loss_normalization="relative",
                       progress=False)
    assert "loss_normalization='none'" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="hf_lowrank.compression.compress"):
        compress_model(model, 0.5, grams_in=grams, allocation="global", loss_normalization="none", progress=False)
    assert "loss_normalization='none'" in caplog.text and "relative" in caplog.text
