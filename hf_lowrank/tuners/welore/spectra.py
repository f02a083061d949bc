"""Singular-value spectra of a model's Linear weights, cached: what WeLore's rank allocation (:mod:`.allocation`) reads.

Computing every spectrum is the expensive step of WeLore (a full ``svdvals`` per weight), so spectra are cached, keyed by a content hash of the weight (and of the
Fisher weighting when one is applied). The cache lives in memory for the process and, optionally, on disk as small
safetensors files (``SpectraCache(directory=...)``, or the environment variable ``HF_LOWRANK_SPECTRA_CACHE``), so a
second ``get_peft_model`` of the same base model, in this process or the next, skips the SVDs.

Data-aware WeLore (``WeLoreLRCConfig(spectra="whitened")``) thresholds the WHITENED spectra instead: the singular
values of ``W L_in`` with ``L_in`` the Cholesky factor of the module's calibration input Gram (SVD-LLM's whitening:
Wang, Zheng, Wan and Zhang, 2024, arXiv:2403.07378), from :func:`whitening_factors` and :func:`compute_spectra` ``in_factors=``; they are cached
too, keyed by the weight and the factor.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...compression.compress import _weighting_sides
from ...io import atomic_save_safetensors
from ...modules import dense_weight
from ...ops.fisher import DEFAULT_DAMPING, fisher_weights, weighted_spectrum
from ...ops.svd import singular_values

__all__ = [
    "SPECTRA_CACHE_ENV",
    "SpectraCache",
    "compute_spectra",
    "default_spectra_cache",
    "weight_fingerprint",
    "whitening_factors",
]

logger = logging.getLogger(__name__)

SPECTRA_CACHE_ENV = "HF_LOWRANK_SPECTRA_CACHE"
_FINGERPRINT_VERSION = b"hf-lowrank-spectrum-v1"


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    flat = t.contiguous().reshape(-1).cpu()
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))


def weight_fingerprint(
    weight: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    col_weights: torch.Tensor | None = None,
    in_factor: torch.Tensor | None = None,
) -> str:
    """Content hash of a weight (and of the optional row/column weighting or input whitening applied before the SVD).

    A BLAKE2b digest of the raw bytes, the shape and the dtype: the same weight gives the same key in any process,
    and any change of a single value (fine-tuning, another checkpoint) gives another key. Hashing runs at memory
    speed (under a second for all of SmolLM2), far below the SVDs it saves.

    Args:
        weight: ``(out, in)`` weight (any dtype and device; copied to the CPU one tensor at a time).
        row_weights: optional ``(out,)`` row weighting.
        col_weights: optional ``(in,)`` column weighting.
        in_factor: optional ``(in, in)`` whitening factor (hashed in its own dtype: it is float64).

    Returns:
        A 40-character hex string (the same as before for a weight without any weighting).
    """
    h = hashlib.blake2b(_FINGERPRINT_VERSION, digest_size=20)
    _hash_tensor(h, weight)
    for tag, extra in ((b"row", row_weights), (b"col", col_weights)):
        if extra is not None:
            h.update(tag)
            _hash_tensor(h, extra.float())
    if in_factor is not None:
        h.update(b"in_factor")
        _hash_tensor(h, in_factor)
    return h.hexdigest()


class SpectraCache:
    """Singular values keyed by :func:`weight_fingerprint`, in memory and optionally on disk.

    Args:
        directory: folder for one ``<fingerprint>.safetensors`` file per spectrum (written atomically); ``None`` or
            ``""`` keeps spectra in memory only (``Path("")`` would be the current directory, which nobody means).
        max_entries: bound on the in-memory entries (oldest dropped first); spectra are small (``min(out, in)``
            floats each), the default holds those of several 7B models.
    """

    def __init__(self, directory: str | os.PathLike | None = None, max_entries: int = 100_000) -> None:
        self.directory = None if directory is None or directory == "" else Path(directory)
        self.max_entries = int(max_entries)
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._memory)

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached spectrum for ``key`` (a CPU float tensor), or ``None``."""
        S = self._memory.get(key)
        if S is None:
            path = self._path(key)
            if path is not None and path.is_file():
                from safetensors import SafetensorError
                from safetensors.torch import load_file

                try:
                    S = load_file(str(path))["S"]
                except (SafetensorError, KeyError, OSError) as exc:  # a damaged file is a miss, not a failure
                    logger.warning("ignoring unreadable cached spectrum %s (%s)", path, exc)
                    S = None
                if S is not None:
                    self._remember(key, S)
        if S is None:
            self.misses += 1
        else:
            self.hits += 1
        return S

    def put(self, key: str, S: torch.Tensor) -> None:
        """Store a spectrum (in memory, and on disk when the cache has a directory)."""
        S = S.detach().to("cpu").contiguous()
        self._remember(key, S)
        path = self._path(key)
        if path is not None:
            try:
                atomic_save_safetensors({"S": S}, path, metadata={"format": "hf_lowrank.spectrum.v1"})
            except OSError as exc:  # a read-only or full disk must not stop the method
                logger.warning("could not write the spectra cache %s (%s); continuing in memory", path, exc)

    def _remember(self, key: str, S: torch.Tensor) -> None:
        self._memory.pop(key, None)
        self._memory[key] = S
        while len(self._memory) > self.max_entries:
            self._memory.pop(next(iter(self._memory)))

    def clear(self) -> None:
        """Forget the in-memory entries (files on disk are kept)."""
        self._memory.clear()


_DEFAULT_CACHES: dict[str | None, SpectraCache] = {}


def default_spectra_cache(directory: str | os.PathLike | None = None) -> SpectraCache:
    """The process-wide cache for ``directory``.

    ``None`` (default): ``$HF_LOWRANK_SPECTRA_CACHE`` when set, else memory only. ``""``: memory only, whatever the
    environment says (an explicit "no disk cache"; ``Path("")`` would otherwise resolve to the current directory and
    scatter ``<hash>.safetensors`` files there).
    """
    if directory is None:
        directory = os.environ.get(SPECTRA_CACHE_ENV) or None
    elif directory == "":
        directory = None
    key = None if directory is None else str(Path(directory).expanduser().resolve())
    if key not in _DEFAULT_CACHES:
        _DEFAULT_CACHES[key] = SpectraCache(key)
    return _DEFAULT_CACHES[key]


def _side_weights(fisher: Mapping[str, torch.Tensor] | None, name: str, size: int, what: str) -> torch.Tensor | None:
    if not fisher or name not in fisher:
        return None

    f = fisher[name]
    if tuple(f.shape) != (size,):
        raise ValueError(
            f"{what}['{name}'] has shape {tuple(f.shape)} but the module needs ({size},): the Fisher was collected on "
            "a model of another shape. Collect it again on this model."
        )
    return fisher_weights(f.float())


@torch.no_grad()
def whitening_factors(
    targets: Mapping[str, nn.Module],
    grams_in: Mapping[str, torch.Tensor],
    *,
    damping: float | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Whitening factors ``L_in`` of the targets' calibration input Grams, as ``compress_model`` computes them.

    The one path of :func:`hf_lowrank.compression.compress_model` (``grams_in=``): each Gram is symmetrised, divided
    by the mean of its diagonal, damped by ``damping * I`` and Cholesky-factorized in float64
    (:func:`hf_lowrank.ops.fisher.gram_factor`); modules fed the same input (one shared Gram tensor, as
    :func:`hf_lowrank.calibration.grams.calibration_grams` returns for q/k/v and gate/up) share one factor.

    Args:
        targets: ``{name: Linear}``.
        grams_in: ``{name: (in, in) Gram}`` (``sum x x^T`` over calibration tokens) for some or all targets; a
            diagonal ``(in,)`` Gram gives a diagonal factor.
        damping: ``lambda`` (default :data:`hf_lowrank.ops.fisher.DEFAULT_DAMPING`).

    Returns:
        ``({name: L_in}, fallbacks)``: the factors of the targets that have a Gram, and the names whose factorization
        needed the eigendecomposition fallback (a singular Gram).

    Raises:
        ValueError: Grams of non-targets or of the wrong shape, non-finite Grams, bad damping.
    """
    damping = DEFAULT_DAMPING if damping is None else damping
    sides = _weighting_sides(targets, None, None, grams_in, None, damping)
    factors = {n: side.in_factor for n, side in sides.items() if side.in_factor is not None}
    return factors, sorted(n for n, side in sides.items() if side.fallback)


@torch.no_grad()
def compute_spectra(
    targets: Mapping[str, nn.Module],
    *,
    cache: SpectraCache | None = None,
    row_fisher: Mapping[str, torch.Tensor] | None = None,
    col_fisher: Mapping[str, torch.Tensor] | None = None,
    in_factors: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Singular values of each target's weight, from the cache when possible.

    Without Fisher these are the spectra of ``W``; with ``row_fisher`` / ``col_fisher`` (accumulated Fisher per output
    row ``(out,)`` / input column ``(in,)``, e.g. from a FisherLoRA run) they are the spectra of ``D_out W D_in`` with
    ``D = diag(fisher_weights(F))``, the matrix whose truncation FWSVD optimises (Hsu et al., 2022, arXiv:2207.00112), so the global
    threshold ranks layers by how low-rank they are *where the data puts weight*. With ``in_factors`` (whitening
    factors from :func:`whitening_factors`) they are the WHITENED spectra, the singular values of ``W L_in``
    (:func:`hf_lowrank.ops.fisher.weighted_spectrum`): ``sum_{i>k} s_i^2`` is the output error of the best rank-``k``
    approximation on the calibration inputs, ``||(W - W_k) X||_F^2``, up to the Gram's normalisation and damping.

    Args:
        targets: ``{name: Linear}`` (``nn.Linear`` or bitsandbytes 4/8-bit, dequantized for the SVD).
        cache: a :class:`SpectraCache` (default: :func:`default_spectra_cache`).
        row_fisher: optional ``{name: (out,) Fisher}``; modules without an entry are unweighted on that side.
        col_fisher: optional ``{name: (in,) Fisher}``.
        in_factors: optional ``{name: (in, in) or (in,) whitening factor}``; modules without an entry keep the
            spectrum of ``W``. Not together with Fisher (one weighting at a time).
        progress: show a progress bar over the weights whose spectrum is not cached.

    Returns:
        ``{name: (min(out, in),) singular values}``, descending, float32 on the CPU.

    Raises:
        ValueError: Fisher or factors of the wrong shape, or Fisher together with whitening factors.
    """
    if in_factors and (row_fisher or col_fisher):
        raise ValueError(
            "WeLore spectra take one weighting: Fisher (row_fisher / col_fisher, with_fisher) or whitening "
            "(in_factors, with_calibration), not both."
        )
    cache = cache if cache is not None else default_spectra_cache()
    spectra: dict[str, torch.Tensor] = {}
    todo: list[tuple[str, str, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = []
    for name, module in targets.items():
        W = dense_weight(module)
        if not W.is_floating_point():
            W = W.float()
        rw = _side_weights(row_fisher, name, W.shape[0], "row_fisher")
        cw = _side_weights(col_fisher, name, W.shape[1], "col_fisher")
        L = (in_factors or {}).get(name)
        if L is not None and tuple(L.shape) not in ((W.shape[1], W.shape[1]), (W.shape[1],)):
            raise ValueError(
                f"in_factors['{name}'] has shape {tuple(L.shape)} but the module needs ({W.shape[1]}, {W.shape[1]}): "
                "the calibration Grams were collected on a model of another shape."
            )
        key = weight_fingerprint(W, rw, cw, L)
        S = cache.get(key)
        if S is not None and S.numel() == min(W.shape):
            spectra[name] = S.float()
        else:
            todo.append((name, key, W, rw, cw, L))
    for name, key, W, rw, cw, L in tqdm(todo, desc="WeLore spectra", unit="weight", disable=not progress or not todo):
        if L is not None:
            S = weighted_spectrum(W.float(), in_factor=L, name=name).float().cpu()
        else:
            A = W.float()
            if rw is not None:
                A = rw.to(A.device)[:, None] * A
            if cw is not None:
                A = A * cw.to(A.device)[None, :]
            S = singular_values(A, name=name).float().cpu()
        cache.put(key, S)
        spectra[name] = S
    return {name: spectra[name] for name in targets}
