"""The tiny-model builders under their first module name; they live in :mod:`testing_common`."""

from testing_common import (  # noqa: F401
    TINY_BERT,
    TINY_FISHER_LORA,
    TINY_LLAMA,
    TINY_MLP,
    TINY_ROBERTA,
    TINY_SHAPES,
    CallCounter,
    make_finetuned_copy,
    make_tiny_bert_config,
    make_tiny_fisher_lora,
    make_tiny_llama,
    make_tiny_llama_config,
    make_tiny_model,
    make_tiny_roberta_classifier,
    write_safetensors_header,
)
