"""Pure math on torch tensors: SVD, Fisher weighting, rank allocation, quantization, neuron importance.

Nothing in this subpackage imports transformers, peft or trl.
"""
