"""What every ``hf-lowrank`` command shares: :class:`CliError` and loading a model and its tokenizer.

``MODEL`` arguments accept a local folder, a Hub id, or ``smollm2`` / ``minilm`` for the embedded offline
SmolLM2-135M / all-MiniLM-L6-v2 (:func:`hf_lowrank.demo.models.resolve_model_alias`).
"""

from __future__ import annotations

import os

from ..compression.checkpoint import load_compressed
from ..demo.models import resolve_model_alias
from ..errors import CliError

__all__ = ["CliError", "load_model_for_cli", "load_tokenizer", "resolve_model_class"]

_MODEL_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "base": "AutoModel",
}
"""Short names for ``--model-class``; any transformers class name (``RobertaForSequenceClassification``) works too."""


def _model_path(model: str) -> str:
    return resolve_model_alias(model)


def _class_named(name: str):
    import transformers

    cls = getattr(transformers, _MODEL_CLASSES.get(name, name), None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        return None
    return cls


def resolve_model_class(model: str, model_class: str | None = None, *, gguf_file: str | None = None, config=None):
    """The transformers class to build ``model`` with.

    Given ``model_class`` (a short name of :data:`_MODEL_CLASSES` or a transformers class name), that class.
    Otherwise the class that ``config.json`` records in ``architectures`` (what ``save_pretrained`` writes), looked up
    in transformers as pipelines do (``getattr(transformers, name)``); so a sequence classifier stays one instead of
    being rebuilt as a causal LM with a random head. A GGUF file without ``architectures`` is read as a causal LM
    (the models transformers reads from GGUF).

    Raises:
        CliError: the class is unknown, or ``config.json`` does not say and no ``model_class`` was given.
    """
    shorts = ", ".join(_MODEL_CLASSES)
    if model_class:
        cls = _class_named(model_class)
        if cls is None:
            raise CliError(
                f"unknown --model-class {model_class!r}: use one of {shorts} or a transformers model class name "
                "such as RobertaForSequenceClassification."
            )
        return cls
    if config is None:
        import transformers

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        config = transformers.AutoConfig.from_pretrained(_model_path(model), **kwargs)
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = _class_named(name)
        if cls is not None:
            return cls
    if not names and gguf_file:
        return _class_named("causal-lm")
    import transformers

    if names:
        found = f"names {names}, which transformers {transformers.__version__} does not have"
    else:
        found = "has no 'architectures' entry"
    raise CliError(
        f"cannot tell which model class to build for {model}: its config (model_type "
        f"{getattr(config, 'model_type', None)!r}) {found}; pass --model-class ({shorts}, or a transformers class "
        "name such as T5ForConditionalGeneration)."
    )


#: A local folder holds a tokenizer only when one of these is in it. Without them transformers 5 still builds one
#: for some model types (GPT-2, RoBERTa) with an empty vocabulary ("hello world" -> no ids), which compress would
#: then save beside the model as if it were the model's.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(path: str, *, gguf_file: str | None = None):
    """The tokenizer saved with the model at ``path`` (a local folder, a Hub id, or a GGUF file's folder), or ``None``
    when there is none: a local folder without any of :data:`_TOKENIZER_FILES` gives ``None`` without asking
    transformers."""
    import transformers

    if not gguf_file and os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError, TypeError):
        return None


def load_model_for_cli(model: str, *, model_class: str | None = None, gguf_file: str | None = None, dtype=None):
    """Load ``model`` (folder, Hub id or ``smollm2``) with its tokenizer when one is there.

    ``model_class``: see :func:`resolve_model_class` (default: the class that the model's config records).
    """
    import torch
    import transformers

    path = _model_path(model)
    kwargs = {"dtype": dtype or torch.float32}
    if gguf_file:
        cls = resolve_model_class(model, model_class, gguf_file=gguf_file)
        kwargs["gguf_file"] = gguf_file
        net = cls.from_pretrained(path, **kwargs)
        quantizer = getattr(net, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(net)
    else:
        config = transformers.AutoConfig.from_pretrained(path)
        cls = resolve_model_class(model, model_class, config=config)
        if getattr(config, "quantization_config", None) and (
            (config.quantization_config or {}).get("quant_method") == "hf_lowrank"
        ):
            net = load_compressed(path, cls, **kwargs)
        else:
            net = cls.from_pretrained(path, **kwargs)
    tok = load_tokenizer(path, gguf_file=gguf_file)
    return net, tok
