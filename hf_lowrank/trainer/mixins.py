"""``LowRankTrainer`` / ``LowRankSFTTrainer``: Trainers whose final ``save_model`` writes a compressed model.

The mixin overrides as little as possible: ``__init__`` (attach the Fisher callback when the model carries a
FisherLoRA adapter), ``train`` (tell the callback which checkpoint a resume reads, and the fp16 loss scaler), and
``save_model`` (only the user's final call compresses, through :func:`~.callbacks.compress_on_save` as
``CompressOnSaveCallback`` does; the Trainer's own checkpoint saves stay ordinary adapter checkpoints plus the Fisher
state, written with the model files before ``save_total_limit`` rotation can delete the previous checkpoint, so
training can resume after a kill at any point).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .._deprecation import renamed_keywords
from ..distributed import is_fsdp_model
from ..fisher.state import FISHER_STATE_NAME
from ..io import atomic_directory
from ..precision import warn_if_slow_bf16
from ..tuners.fisher_lora.config import FisherLoRAConfig
from .callbacks import FisherCollectorCallback, compress_on_save, reduced_fisher

__all__ = ["LowRankSFTTrainer", "LowRankTrainer", "LowRankTrainerMixin"]  # noqa: F822 (lazy, see __getattr__)

logger = logging.getLogger(__name__)


class LowRankTrainerMixin:
    """Adds FisherLoRA compression-on-save to a ``transformers.Trainer`` subclass (put it first in the bases).

    With a model that carries a :class:`FisherLoRAConfig` adapter:

    - a :class:`FisherCollectorCallback` is attached (unless one was passed in ``callbacks``; none for
      ``fisher_source="none"``), available as ``trainer.fisher_callback``;
    - ``trainer.save_model(out)`` (the user's call, not the Trainer's internal checkpointing) compresses a copy of
      the trained model with :func:`~hf_lowrank.compress_peft_model` per the adapter config and writes to ``out``,
      atomically: the factorized model (``AutoModelFor*.from_pretrained(out)`` reloads it once ``hf_lowrank`` is
      imported), the tokenizer, ``compression_report.json`` and ``fisher_state.safetensors``. ``trainer.model``
      keeps its adapter and can go on training; the copy costs the memory of the new factors (plus one dense
      weight at a time). ``LowRankTrainer(..., inplace=True)`` compresses the trained model itself instead
      (no extra memory; ``trainer.model`` becomes the compressed model). The report is kept as
      ``trainer.compression_report``.

    Every model save of the trainer (``save_model``, and the model files of each ``checkpoint-*``) is atomic: it is
    written into a temporary sibling folder that replaces the target only once complete, so a run killed mid-save
    leaves the previous files loadable (files already in the folder are carried over as hard links). Without a
    FisherLoRA adapter the trainer otherwise behaves exactly like its base class.
    """

    fisher_callback: FisherCollectorCallback | None = None
    compression_report = None

    @renamed_keywords(compress_inplace="inplace")
    def __init__(self, *args, inplace: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.inplace = inplace
        warn_if_slow_bf16(self.args)
        self._setup_low_rank()

    def _fisher_lora_config(self) -> FisherLoRAConfig | None:
        peft_config = getattr(self.model, "peft_config", None)
        if not isinstance(peft_config, dict):
            return None
        active = getattr(self.model, "active_adapter", None)
        if isinstance(active, (list, tuple)):
            active = active[0] if active else None
        config = peft_config.get(active) if active is not None else None
        return config if isinstance(config, FisherLoRAConfig) else None

    def _setup_low_rank(self) -> None:
        config = self._fisher_lora_config()
        passed = [cb for cb in self.callback_handler.callbacks if isinstance(cb, FisherCollectorCallback)]
        if config is not None:
            passed = [cb for cb in passed if cb.collector.source == config.fisher_source]
        if passed:
            self.fisher_callback = passed[0]
            return
        if config is not None and config.fisher_source != "none":
            self.fisher_callback = FisherCollectorCallback(source=config.fisher_source)
            self.add_callback(self.fisher_callback)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if self.fisher_callback is not None:
            path = resume_from_checkpoint
            if isinstance(path, bool):
                path = get_last_checkpoint(self.args.output_dir) if path else None
            self.fisher_callback.resume_from = path
            self.fisher_callback.collector.grad_scaler = getattr(self.accelerator, "scaler", None)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _save_fisher_into_checkpoint(self, output_dir: str) -> None:
        """Write the Fisher state into the checkpoint folder as part of the checkpoint, from ``_save_checkpoint``.

        Trainer's ``on_save`` event comes only after ``save_total_limit`` rotation has deleted the older checkpoints
        (with their Fisher files); written here, before the rotation, a kill at any point leaves a checkpoint with
        its Fisher state. Every process writes its own file, once the main process has put the folder in place.
        """
        if Path(output_dir).name != f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}":
            return  # not a checkpoint of this step (e.g. push_to_hub's save into output_dir)
        self.accelerator.wait_for_everyone()
        self.fisher_callback.save_checkpoint_state(self.args, self.state, output_dir)

    def _save(self, output_dir: str | None = None, state_dict=None):
        """The Trainer's writer (model or adapter, tokenizer, training args), made atomic (main process only)."""
        if not self.args.should_save:  # a non-writer rank only joins the collectives of a sharded save
            return super()._save(output_dir, state_dict=state_dict)
        with atomic_directory(output_dir or self.args.output_dir) as tmp:
            return super()._save(str(tmp), state_dict=state_dict)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        config = self._fisher_lora_config()
        if _internal_call or config is None:
            super().save_model(output_dir, _internal_call)
            if _internal_call and output_dir is not None and self.fisher_callback is not None:
                self._save_fisher_into_checkpoint(output_dir)
            return None
        output_dir = output_dir or self.args.output_dir
        if is_fsdp_model(self.model):
            raise NotImplementedError(
                "LowRankTrainer cannot compress a FisherLoRA adapter trained under FSDP: the merged weights and the "
                "Fisher are sharded per process (and FSDP loses the per-micro-batch gradients the Fisher needs). "
                "Train FisherLoRA with DDP: `accelerate launch` without FSDP; the adapters are small."
            )
        if not config.has_compression_target:
            warnings.warn(
                "The FisherLoRA config sets no compression target (compress_rank / compress_keep / "
                "compress_rank_pattern), so save_model writes the adapter and the Fisher state only; compress later "
                "with hf_lowrank.compress_peft_model or `hf-lowrank compress --method fwsvd --fisher`.",
                stacklevel=2,
            )
            fisher = reduced_fisher(self.fisher_callback, self.state.global_step)  # a collective under DDP
            super().save_model(output_dir, _internal_call)
            if fisher is not None and self.args.should_save:
                fisher.save(Path(output_dir) / FISHER_STATE_NAME)
            return None
        compressed, report = compress_on_save(
            self.model, output_dir, fisher=self.fisher_callback, tokenizer=self.processing_class,
            should_save=self.args.should_save, progress=not self.args.disable_tqdm, inplace=self.inplace,
            global_step=self.state.global_step,
        )
        if report is not None:
            if self.inplace:
                self.model = self.model_wrapped = compressed
            self.compression_report = report
        return None


class LowRankTrainer(LowRankTrainerMixin, Trainer):
    """``transformers.Trainer`` with FisherLoRA Fisher collection and compression on ``save_model``."""


def _make_sft_trainer():
    try:
        from trl import SFTTrainer
    except ImportError:  # pragma: no cover - trl is an optional extra

        class LowRankSFTTrainer:  # noqa: D401
            """Placeholder: needs trl."""

            def __init__(self, *args, **kwargs):
                raise ImportError("LowRankSFTTrainer needs trl: pip install 'hf-lowrank[trl]'.")

        return LowRankSFTTrainer

    class LowRankSFTTrainer(LowRankTrainerMixin, SFTTrainer):
        """``trl.SFTTrainer`` with FisherLoRA Fisher collection and compression on ``save_model``.

        ``LowRankSFTTrainer(model=base, peft_config=FisherLoRAConfig(...), ...)`` works as with ``SFTTrainer``
        (which calls ``get_peft_model``); pass ``processing_class`` (else trl looks the tokenizer up on the Hub).
        """

    return LowRankSFTTrainer


_SFT = None


def __getattr__(name: str):
    # trl is imported only when LowRankSFTTrainer is used (importing it costs seconds).
    global _SFT
    if name == "LowRankSFTTrainer":
        if _SFT is None:
            _SFT = _make_sft_trainer()
        return _SFT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
