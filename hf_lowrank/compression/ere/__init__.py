"""ERE: store a fully fine-tuned model as a compressed residual over its base.

ERE (efficient residual encoding): Ryu, Seo and Yoo, 2023, "Efficient Storage of Fine-Tuned Models via Low-Rank
Approximation of Weight Residuals", arXiv:2305.18425.

For every 2-D weight with a counterpart in the base, the residual ``R = W_ft - W_base`` is encoded:

- Linear-like weights (everything 2-D that is not an ``nn.Embedding``): truncated SVD ``R ~= U diag(S) V^T`` with
  per-tensor ranks from the ERE budget allocation (:func:`hf_lowrank.ops.rank_allocation.ere_ranks`: log-linear fit
  of the tail energy, Lagrangian bisection, blend with the prior rank). ``U`` and ``V`` are stored round-to-nearest
  at ``bits`` bits with per-group fp16 scales and offsets (:func:`hf_lowrank.ops.quant.quantize_rtn`, groups of
  ``group_size`` consecutive entries of each singular vector), ``S`` in fp16. On decode the dequantized ``U`` and
  ``V`` are projected back onto the Stiefel manifold (polar factor) before ``W = W_base + U diag(S) V^T``.
- Embedding tables: a fine-tune only moves the rows of the tokens it saw, so the residual is row-sparse. It is
  stored as those rows (indices plus the rows, quantized like ``U``/``V``) or as a rank-``rank`` factorization,
  whichever takes fewer bytes (``embeddings="sparse"|"lowrank"`` forces one). Embeddings do not take part in the
  rank allocation (their ``out + in`` cost would dominate the budget); the low-rank fallback uses the prior rank.
- Stored exactly, in the fine-tuned dtype: tensors with no base counterpart (a new classifier head, a resized
  vocabulary: different shape), every tensor that is not 2-D (biases, norms), 2-D tensors with a side below 16
  (e.g. BERT's 2-row token-type table), 2-D weights outside ``target_modules`` when it is given, and anything named
  in ``store_exact``. Only tensors that changed are stored; when one small tensor of a module changed, all the
  module's small tensors are stored (a LayerNorm keeps weight and bias together), so the module can be exported
  whole to PEFT's ``modules_to_save``. Unchanged tensors are recorded as ``"base"`` and taken from the base.
- Tied weights (``lm_head`` tied to the input embedding) are encoded once; the other names are recorded as aliases.

``bits`` is 2..8 (quantized), 16 (factors kept unquantized in fp16) or 32 (unquantized fp32: lossless up to float
rounding at full rank). Our choices where the paper is silent: group size 64; the tail-energy fit range of
``ere_ranks`` (ranks ``0 .. max(ceil(2 r_avg), 4)``, capped at ``k - 1``, leaving out tail energies below
``1e-12`` of the total; full spectra from float64 Gram eigenvalues,
:func:`hf_lowrank.ops.svd.singular_values` with ``gram=True``); the blended ranks ``(1 - alpha) r_l + alpha
min(r_avg, k_l)`` are rounded budget-aware (floor, then +1 by largest fraction while the budget ``M = r_avg
sum(out + in)`` allows; the encoder takes ``ere_ranks(...).blended`` as is), so the allocation never spends more
than ``M``; the singular values are the SVD's, as in the paper (``refit=True``
replaces them by ``s_i = u_i^T R v_i`` for the quantized, projected factors: the least-squares optimum per matrix,
which lowers each matrix's Frobenius error slightly but did not improve the MiniLM benchmark's outputs, so it is
off by default).

The package, by concern: :mod:`.format` (the folder, its checks, :class:`EREResidual`), :mod:`.fingerprint` (the
base check), :mod:`.encode`, :mod:`.decode`, :mod:`.lora` (export as a PEFT LoRA adapter), :mod:`.report`,
:mod:`.card` (model cards).
"""

from .decode import decode_residual, load_residual
from .encode import encode_residual, save_residual_on_save
from .fingerprint import base_fingerprint
from .format import (
    FORMAT_VERSION,
    BaseMismatchError,
    EREResidual,
    ResidualError,
    ResidualFormatError,
    is_residual_dir,
)
from .lora import export_residual_as_lora
from .report import ResidualEntry, ResidualReport

__all__ = [
    "BaseMismatchError",
    "EREResidual",
    "FORMAT_VERSION",
    "ResidualEntry",
    "ResidualError",
    "ResidualFormatError",
    "ResidualReport",
    "base_fingerprint",
    "decode_residual",
    "encode_residual",
    "export_residual_as_lora",
    "is_residual_dir",
    "load_residual",
    "save_residual_on_save",
]
