"""Serving engines that load hf-lowrank factorized checkpoints.

- :mod:`hf_lowrank.integrations.vllm`: a vLLM quantization-method plugin (entry point ``vllm.general_plugins``), so
  that ``vllm serve <compressed folder>`` and ``vllm.LLM(<compressed folder>)`` run the factor pairs as two GEMMs.

Nothing here imports the serving engine at module level: the plugin's ``register()`` imports it when the engine
calls it.
"""
