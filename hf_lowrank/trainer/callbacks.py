"""Trainer callbacks: Fisher collection with checkpoint/resume, and compression when training ends.

Both work with a plain ``transformers.Trainer`` / ``trl.SFTTrainer``; ``LowRankTrainer`` / ``LowRankSFTTrainer``
attach :class:`FisherCollectorCallback` by themselves and compress in ``save_model``. :func:`compress_on_save` is the
one compress-and-write path that both :class:`CompressOnSaveCallback` and ``LowRankTrainer.save_model`` go through.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._deprecation import renamed_keywords
from ..compression.checkpoint import save_compressed
from ..compression.compress import CompressionReport, compress_model
from ..compression.config import CompressionConfig
from ..compression.ere import save_residual_on_save
from ..distributed import barrier, gather_full_model, is_fsdp_model
from ..fisher.collector import FisherCollector
from ..fisher.state import FisherState, FisherStateError, fisher_state_filename
from ..fisher.walk import lora_linear_modules, unwrap_model, unwrap_wrappers
from ..tuners.fisher_lora.compress import compress_peft_model, resolve_fisher, shared_weight_copy

__all__ = ["CompressOnSaveCallback", "FisherCollectorCallback", "compress_on_save", "reduced_fisher"]

logger = logging.getLogger(__name__)


class FisherCollectorCallback(TrainerCallback):
    """Accumulate per micro-batch squared gradients during ``Trainer.train`` and keep them across checkpoints.

    Gradient hooks are registered on the training model at ``on_train_begin`` (see
    :class:`~hf_lowrank.tuners.fisher_lora.FisherCollector`): each micro-batch's gradient of the LoRA factors
    (``source="lora"``) or of the dense target weights (``source="full"``) is squared BEFORE gradient accumulation
    sums it and before gradient clipping, and added to float32 accumulators on the parameter's device.

    Checkpoints: at every save the state goes into the checkpoint folder as ``fisher_state.safetensors`` (one file
    per process, ``fisher_state.rank{i}.safetensors``, in multi-process runs). On resume the state is read back from
    the checkpoint, so a resumed run ends with the same Fisher as an uninterrupted one. The checkpoint folder is
    ``resume_from`` when set (``LowRankTrainer.train`` sets it from ``resume_from_checkpoint``), else
    ``args.resume_from_checkpoint``, else ``<output_dir>/checkpoint-<global step>``, which covers
    ``trainer.train(resume_from_checkpoint=True)`` and explicit paths inside ``output_dir``. With a plain Trainer and
    a checkpoint elsewhere, set ``callback.resume_from = path`` before ``train``.

    After training, ``callback.state`` is the accumulated :class:`FisherState`; compress with
    ``hf_lowrank.compress_peft_model(trainer.model, fisher=callback)``.

    Args:
        source: ``"lora"`` (FisherLoRA) or ``"full"`` (full-gradient FWSVD baseline).
        adapter_name: LoRA adapter to collect (default: the active one).
        target_modules: for ``"full"`` on a model without adapters: which Linears (default: every Linear in the
            transformer blocks).
        reset_on_train_begin: start from zero when a run starts at step 0 (default). False keeps collecting across
            several ``train()`` calls.
        strict_resume: when resuming (step > 0) and no Fisher state is found in the checkpoint, raise (default)
            instead of continuing with an incomplete Fisher.
    """

    def __init__(
        self,
        source: str = "lora",
        *,
        adapter_name: str | None = None,
        target_modules=None,
        reset_on_train_begin: bool = True,
        strict_resume: bool = True,
    ) -> None:
        self.collector = FisherCollector(source, adapter_name=adapter_name, target_modules=target_modules)
        self.reset_on_train_begin = reset_on_train_begin
        self.strict_resume = strict_resume
        self.resume_from: str | os.PathLike | None = None
        self._written: tuple[str, int] | None = None  # (checkpoint folder, step) already holding this state

    @property
    def state(self) -> FisherState:
        """The accumulated Fisher (live; counters up to date)."""
        return self.collector.snapshot()

    def load_state(self, path: str | os.PathLike) -> None:
        """Load a saved Fisher state now (a file, or a checkpoint folder)."""
        self.collector.load_state(self._file_in(path, 0, 1) if Path(path).is_dir() else path)

    @staticmethod
    def _file_in(folder, process_index: int, world_size: int) -> Path:
        return Path(folder) / fisher_state_filename(process_index, world_size)

    # ---------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("FisherCollectorCallback needs the model at on_train_begin; use it with a Trainer.")
        self.collector.attach(model)
        if state.global_step > 0:
            self._restore(args, state)
        elif self.reset_on_train_begin:
            self.collector.reset()

    def _restore(self, args, state) -> None:
        explicit = [p for p in (self.resume_from, getattr(args, "resume_from_checkpoint", None)) if isinstance(p, (str, os.PathLike))]
        default = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        rank, world = getattr(args, "process_index", 0), getattr(args, "world_size", 1)
        for folder in [*explicit, default]:
            path = self._file_in(folder, rank, world)
            if not path.is_file():
                if folder is not default and Path(folder).is_dir() and Path(folder).resolve() != default.resolve():
                    if self.strict_resume:
                        raise FisherStateError(
                            f"Resuming from '{folder}' but it holds no Fisher state ({path.name}): it was saved without "
                            "FisherCollectorCallback, so the Fisher of the steps before it is lost. Resume from a "
                            "checkpoint saved with the callback, or pass strict_resume=False to collect from here on."
                        )
                continue
            loaded = FisherState.load(path)
            if loaded.global_step != state.global_step:
                raise FisherStateError(
                    f"The Fisher state in '{path}' was saved at step {loaded.global_step}, but training resumes at step "
                    f"{state.global_step}: it belongs to another checkpoint. Resume from the folder it came from."
                )
            self.collector.load_state(loaded)
            logger.info("Fisher state restored from %s (step %d)", path, loaded.global_step)
            return
        if self.strict_resume:
            raise FisherStateError(
                f"Resuming at step {state.global_step} but no Fisher state was found (looked in {explicit or []} and "
                f"'{default}'). Set callback.resume_from = <checkpoint folder> before trainer.train(), or pass "
                "strict_resume=False to collect from here on."
            )
        logger.warning("No Fisher state found for step %d; collecting from zero.", state.global_step)
        self.collector.reset()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.collector.grad_scaler is not None:
            self.collector.update_loss_scale()

    def save_checkpoint_state(self, args, state, folder: str | os.PathLike) -> None:
        """Write this process's state into the checkpoint ``folder`` now.

        ``LowRankTrainer`` calls this while it saves the checkpoint, before ``save_total_limit`` rotation deletes
        older checkpoints. A plain ``Trainer`` only reaches :meth:`on_save`, which runs after that rotation: a run
        killed between the two keeps only a checkpoint without Fisher state (resuming from it is refused, see
        ``strict_resume``); use ``LowRankTrainer`` or leave ``save_total_limit`` unset to close that window.
        """
        path = self._file_in(folder, getattr(args, "process_index", 0), getattr(args, "world_size", 1))
        self.collector.save(path, global_step=state.global_step)
        self._written = (str(Path(folder).resolve()), state.global_step)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            logger.warning("Checkpoint folder %s not found; the Fisher state was not saved with it.", folder)
            return
        written = self._file_in(folder, getattr(args, "process_index", 0), getattr(args, "world_size", 1))
        if self._written == (str(folder.resolve()), state.global_step) and written.is_file():
            return  # already written with the checkpoint (LowRankTrainer)
        self.save_checkpoint_state(args, state, folder)

    def on_train_end(self, args, state, control, **kwargs):
        self.collector.snapshot().global_step = state.global_step
        self.collector.detach()


class CompressOnSaveCallback(TrainerCallback):
    """Write a compressed copy of the trained model when training ends (and, optionally, into every checkpoint).

    The training model is not modified: compression works on a copy that shares the untouched tensors. What to do is
    ``config`` (a :class:`~hf_lowrank.CompressionConfig`; for a FisherLoRA model without one, the adapter config's
    ``compression``); with ``fisher`` the factorization is Fisher-weighted (FWSVD, Hsu et al. 2022,
    arXiv:2207.00112; the Kronecker-factored Fisher when the state holds Grams), without it plain truncated SVD. A
    LoRA ``PeftModel`` goes through :func:`~hf_lowrank.compress_peft_model` (merged per its config), a plain model
    (full fine-tuning with ``FisherCollectorCallback(source="full")``) through :func:`~hf_lowrank.compress_model`.

    ``method="ere"`` writes an efficient residual encoding of the fine-tuned weights instead (Ryu, Seo and Yoo 2023,
    arXiv:2305.18425), delegated to ``hf_lowrank.compression.ere.save_residual_on_save(model, path,
    base_model=..., **kwargs)``; it encodes ``W_finetuned - W_base`` and therefore needs the base weights
    (``base_model=``, or see that function for how it finds them).

    Args:
        config: the compression.
        fisher: a :class:`FisherCollectorCallback` in the same Trainer, or a Fisher state / path.
        method: ``"ere"``, or (deprecated) ``"fwsvd"`` / ``"svd"``, which ``fisher`` now says.
        rank, keep, rank_pattern, weighting: deprecated aliases of the config's fields (``rank`` stays the ERE
            prior rank with ``"ere"``).
        output_subdir: folder name written inside ``args.output_dir`` (and inside checkpoints).
        at_checkpoints: also write ``<checkpoint>/<output_subdir>`` at every save (costly for big models).
        base_model: for ``"ere"``.
        **method_kwargs: passed to the method's function.
    """

    def __init__(
        self,
        method: str | None = None,
        *,
        config: CompressionConfig | None = None,
        fisher=None,
        rank: int | None = None,
        keep: float | None = None,
        rank_pattern: dict | None = None,
        weighting: str | None = None,
        output_subdir: str = "compressed",
        at_checkpoints: bool = False,
        base_model=None,
        **method_kwargs,
    ) -> None:
        if method not in (None, "fwsvd", "svd", "ere"):
            raise ValueError(f"CompressOnSaveCallback method must be 'ere' (or None: compress), got {method!r}.")
        if config is not None and not isinstance(config, CompressionConfig):
            raise ValueError(f"config must be a hf_lowrank.CompressionConfig, got {type(config).__name__}.")
        if method in ("fwsvd", "svd"):
            warnings.warn(f"CompressOnSaveCallback(method={method!r}) is deprecated and will be removed in the next "
                          "release: pass fisher= for the Fisher-weighted SVD, leave it out for plain SVD.",
                          DeprecationWarning, stacklevel=2)
        if method == "fwsvd" and fisher is None:
            raise ValueError(
                "method='fwsvd' needs fisher=<FisherCollectorCallback> (add the same callback object to the Trainer) "
                "or a saved Fisher state; use method='svd' for plain SVD."
            )
        aliases = {k: v for k, v in (("rank", rank), ("keep", keep), ("rank_pattern", rank_pattern),
                                     ("weighting", weighting)) if v is not None and not (k == "rank" and method == "ere")}
        if aliases:
            warnings.warn(f"CompressOnSaveCallback({', '.join(f'{k}=' for k in aliases)}) is deprecated and will be "
                          "removed in the next release: pass config=CompressionConfig(...).", DeprecationWarning,
                          stacklevel=2)
        self.method = "ere" if method == "ere" else "compress"
        self.config = config
        self.fisher = None if method == "svd" else fisher
        self.rank, self.keep, self.rank_pattern = rank, keep, rank_pattern
        self.weighting = weighting
        self.output_subdir = output_subdir
        self.at_checkpoints = at_checkpoints
        self.base_model = base_model
        self.method_kwargs = method_kwargs
        self.last_report = None
        self.last_output_dir: Path | None = None

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.at_checkpoints and model is not None:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / self.output_subdir
            self._write(args, state, model, folder, kwargs.get("processing_class"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._write(args, state, model, Path(args.output_dir) / self.output_subdir, kwargs.get("processing_class"))

    def _write(self, args, state, model, folder: Path, tokenizer) -> None:
        """Every process calls this (the Fisher reduction and the FSDP gather are collectives); the main process
        writes; the others wait for it, so the folder is complete wherever training goes on."""
        should_save = getattr(args, "should_save", True)
        if self.method == "ere":
            self._write_residual(model, folder, tokenizer, should_save)
            barrier()
            return
        _, report = compress_on_save(
            model, folder, config=self.config, fisher=self.fisher,
            fisher_source=None if self.fisher is not None else "none", tokenizer=tokenizer, should_save=should_save,
            progress=not getattr(args, "disable_tqdm", False), global_step=getattr(state, "global_step", None),
            rank=self.rank, keep=self.keep, rank_pattern=self.rank_pattern, weighting=self.weighting,
            **self.method_kwargs,
        )
        if report is not None:
            self.last_report = report
            self.last_output_dir = folder

    def _write_residual(self, model, folder: Path, tokenizer, should_save: bool) -> None:
        model = unwrap_wrappers(model)
        if is_fsdp_model(model):  # full weights on the main process only (a collective)
            model = gather_full_model(unwrap_model(model))
        if model is not None and should_save:
            ere_kwargs = dict(self.method_kwargs)
            if self.rank is not None:  # `rank` is the ERE prior (average) rank
                ere_kwargs.setdefault("rank", self.rank)
            self.last_report = save_residual_on_save(
                model, folder, base_model=self.base_model, tokenizer=tokenizer, **ere_kwargs
            )
            self.last_output_dir = folder


def reduced_fisher(fisher, global_step: int | None = None) -> FisherState | None:
    """The Fisher to compress or save with: a callback's or collector's state summed over processes (a collective:
    every process calls it; a copy, whose ``global_step`` is set to ``global_step`` when given), a loaded path, or a
    ``FisherState`` as given (not modified); None for None. See
    :func:`~hf_lowrank.tuners.fisher_lora.resolve_fisher`."""
    state = resolve_fisher(fisher)
    if state is not None and state is not fisher and global_step is not None:
        state.global_step = int(global_step)
    return state


@renamed_keywords(output_dir="path")
def compress_on_save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    config: CompressionConfig | None = None,
    fisher=None,
    fisher_source: str | None = None,
    tokenizer=None,
    should_save: bool = True,
    progress: bool = True,
    inplace: bool = False,
    global_step: int | None = None,
    rank: int | None = None,
    keep: float | None = None,
    rank_pattern: Mapping | None = None,
    weighting: str | None = None,
    **method_kwargs,
) -> tuple[nn.Module | None, CompressionReport | None]:
    """Compress a trained model and write it to ``path``: the one compress-on-save path.

    :class:`CompressOnSaveCallback` (``"fwsvd"`` / ``"svd"``) and ``LowRankTrainer.save_model`` both call it. Every
    process calls it: the Fisher reduction over processes and the FSDP gather are collectives. In order:

    1. unwrap DDP / DataParallel / DeepSpeed / ``torch.compile`` wrappers (:func:`unwrap_wrappers`);
    2. reduce the Fisher over processes (:func:`reduced_fisher`);
    3. gather FSDP-sharded weights onto the main process;
    4. on the writing process (``should_save``) only: compress, a model with LoRA layers through
       :func:`~hf_lowrank.compress_peft_model` (every argument left None from its :class:`FisherLoRAConfig`), a plain
       model on a weight-sharing copy through ``compress_model`` (with ``fisher=`` when there is one; it
       needs ``rank``, ``keep`` or ``rank_pattern``);
    5. write it atomically (:func:`~hf_lowrank.save_compressed`: the factorized
       model, ``tokenizer``, ``compression_report.json`` and the Fisher state);
    6. wait for every process, so the folder is complete wherever training goes on.

    Args:
        model: the trained model (a ``PeftModel``, a model with LoRA layers, or a plain model), wrapped or not.
        path: the folder to write.
        config: the compression (:class:`~hf_lowrank.CompressionConfig`); for a FisherLoRA model it replaces the
            adapter config's ``compression``; a plain model needs it (or ``rank`` / ``keep`` / ``rank_pattern``).
        fisher: ``FisherCollectorCallback`` / ``FisherCollector`` / ``FisherState`` / path, or None (plain SVD).
        fisher_source: for ``compress_peft_model`` (None: the adapter config's).
        tokenizer: saved with the model when given.
        should_save: whether this process writes (``TrainingArguments.should_save``).
        progress: show progress bars.
        inplace: compress the LoRA model itself instead of a copy (``compress_peft_model(inplace=True)``).
        global_step: recorded in the reduced Fisher state (a ``FisherState`` passed in is not modified).
        rank, keep, rank_pattern, weighting, **method_kwargs: the compression target and settings.

    Returns:
        ``(model, report)`` on the writing process: ``model`` is the compressed model with ``inplace=True`` (it
        replaces the trained one), else None (the copy is dropped once written). ``(None, None)`` elsewhere.
    """
    model = unwrap_wrappers(model)
    state = reduced_fisher(fisher, global_step)  # a collective under DDP
    gathered = gather_full_model(unwrap_model(model)) if is_fsdp_model(model) else model  # FSDP: a collective
    compressed = report = None
    if gathered is not None and should_save:
        lora, _ = lora_linear_modules(gathered)
        if lora:
            compressed, report = compress_peft_model(
                gathered, fisher=state, fisher_source=fisher_source, rank=rank, keep=keep, rank_pattern=rank_pattern,
                weighting=weighting, inplace=inplace, progress=progress, compression=config, **method_kwargs,
            )
        else:
            given = {k: v for k, v in (("rank", rank), ("keep", keep), ("rank_pattern", rank_pattern)) if v is not None}
            if state is not None and weighting:
                given["weighting"] = weighting
            if not given and (config is None or not config.has_target):
                raise ValueError("CompressOnSaveCallback on a model without adapters needs config=CompressionConfig("
                                 "keep=... or rank=...) (the model carries no LoRA adapter on a Linear layer).")
            if config is not None and (rank is not None or keep is not None):  # a rank or keep replaces the other
                given = {"rank": rank, "keep": keep, **given}
            compressed = shared_weight_copy(unwrap_model(gathered))
            report = compress_model(compressed, config, fisher=state, progress=progress, **given, **method_kwargs)
        save_compressed(compressed, path, tokenizer=tokenizer, report=report, fisher_state=state)
        logger.info("Compressed model saved to %s: %s", path, report.summary())
        if not inplace:
            compressed = None  # the copy's new factors are freed before the other processes are released
    barrier()
    return compressed, report
