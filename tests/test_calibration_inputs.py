"""Calibration inputs a new user passes: each one works, or fails with a message naming the problem and the fix.

One dict instead of a list, 1-D ``input_ids``, int32 ids, tensors made under ``torch.inference_mode()``, an
encoder-decoder (T5) with labels, a classifier with labels; a model on the meta device or a call inside
``torch.inference_mode()`` is refused before any work.
"""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import make_tiny_llama, make_tiny_model, make_tiny_roberta_classifier

from hf_lowrank.calibration.grams import calibration_grams
from hf_lowrank.compression.compress import compress_model
from hf_lowrank.targets import find_target_linears


def _ids(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (n, length), generator=torch.Generator().manual_seed(seed))


def _grams(model, batches, outputs=True):
    return calibration_grams(model, find_target_linears(model), batches, outputs=outputs, progress=False)


def _assert_same_grams(a, b):
    assert a[-1] == b[-1]  # tokens
    for got, want in zip(a[:-1], b[:-1]):
        assert got.keys() == want.keys() and got
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_one_dict_is_one_batch():
    model, ids = make_tiny_llama(), _ids()
    _assert_same_grams(_grams(model, {"input_ids": ids}), _grams(model, [{"input_ids": ids}]))
    report = compress_model(make_tiny_llama(), 0.5, calibration={"input_ids": ids}, progress=False)
    assert report.info["calibration_tokens"] == ids.numel()


def test_a_bare_tensor_is_refused_with_what_to_pass():
    with pytest.raises(ValueError, match=r"iterable of batches.*\[\{'input_ids': ids\}\]"):
        compress_model(make_tiny_llama(), 0.5, calibration=_ids(), progress=False)


def test_one_dimensional_input_ids_are_a_batch_of_one():
    model, ids = make_tiny_llama(), _ids(1)
    for outputs in (False, True):
        _assert_same_grams(_grams(model, [{"input_ids": ids[0]}], outputs),
                           _grams(model, [{"input_ids": ids}], outputs))
    compress_model(make_tiny_llama(), 0.5, calibration=[{"input_ids": ids[0], "attention_mask": torch.ones(12)}],
                   progress=False)


def test_int32_input_ids_give_the_int64_grams():
    model, ids = make_tiny_llama(), _ids()
    _assert_same_grams(_grams(model, [{"input_ids": ids.int()}]), _grams(model, [{"input_ids": ids}]))
    _assert_same_grams(_grams(model, [{"input_ids": ids.int(), "labels": ids.int()}]),
                       _grams(model, [{"input_ids": ids}]))


def test_inference_mode_is_refused_with_the_fix_and_its_tensors_work_outside():
    with torch.inference_mode():
        ids = _ids()
        with pytest.raises(RuntimeError, match=r"inference_mode.*torch\.no_grad\(\) is fine"):
            compress_model(make_tiny_llama(), 0.5, calibration=[{"input_ids": ids}], progress=False)
        with pytest.raises(RuntimeError, match="inference_mode"):
            compress_model(make_tiny_llama(), 0.5, progress=False)
    assert ids.is_inference()
    model = make_tiny_llama()
    compress_model(model, 0.5, calibration=[{"input_ids": ids}], progress=False)  # batches made in inference mode
    model.train()
    model(_ids(), labels=_ids()).loss.backward()  # the factors are ordinary trainable tensors


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = make_tiny_llama()
    for kwargs in ({}, {"calibration": [{"input_ids": _ids()}]}):
        with pytest.raises(ValueError, match="meta device.*Load the weights first"):
            compress_model(model, 0.5, progress=False, **kwargs)


def test_t5_with_labels_whitened_and_kronecker():
    ids, labels = _ids(), _ids(seed=1)
    model = make_tiny_model("t5")
    targets = find_target_linears(model)
    grams_in, grams_out, tokens = calibration_grams(model, targets, [{"input_ids": ids, "labels": labels}],
                                                    outputs=True, progress=False)
    # the backward pass reaches the encoder and the decoder
    assert any(n.startswith("encoder.") for n in grams_out) and any(n.startswith("decoder.") for n in grams_out)
    assert all(bool(g.abs().sum() > 0) for g in grams_out.values())
    for weighting in ("whitened", "kronecker"):
        report = compress_model(make_tiny_model("t5"), 0.5, calibration=[{"input_ids": ids, "labels": labels}],
                                calibration_weighting=weighting, progress=False)
        assert report.method == weighting


def test_t5_without_decoder_inputs_says_what_to_pass():
    with pytest.raises(ValueError, match="encoder-decoder.*'labels'.*'decoder_input_ids'"):
        compress_model(make_tiny_model("t5"), 0.5, calibration=[{"input_ids": _ids()}],
                       calibration_weighting="whitened", progress=False)


def test_classifier_labels_under_whitening_are_named(caplog):
    batch = {"input_ids": _ids(), "labels": torch.tensor([0, 2])}
    with caplog.at_level(logging.WARNING, logger="hf_lowrank.calibration.grams"):
        report = compress_model(make_tiny_roberta_classifier(), 0.5, calibration=[batch], progress=False)
    assert report.method == "whitened"
    assert "carry 'labels'" in caplog.text and "Pass weighting='kronecker' to compress_model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_lowrank.calibration.grams"):
        report = compress_model(make_tiny_roberta_classifier(), 0.5, calibration=[batch],
                                calibration_weighting="kronecker", progress=False)
    assert report.method == "kronecker" and "carry 'labels'" not in caplog.text
