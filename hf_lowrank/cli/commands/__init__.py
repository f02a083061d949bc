"""One module per ``hf-lowrank`` subcommand: ``compress``, ``inspect``, ``residual``, ``plot``, ``lm-eval``."""
