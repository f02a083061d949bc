"""The vLLM side of the hf-lowrank plugin: a ``QuantizationConfig`` and a Linear method holding factor pairs.

Imported only by :func:`hf_lowrank.integrations.vllm.register`, inside a vLLM process (it imports vLLM at module
level). Written against vLLM 0.32's API; see :data:`hf_lowrank.integrations.vllm.SUPPORTED_VLLM`.

A vLLM Linear may fuse several checkpoint modules (``qkv_proj`` = ``q_proj | k_proj | v_proj``). Each fused group is
factorized with its own rank or left dense (a global rank allocation keeps some modules dense). The layer holds:

- ``hf_lowrank_down``: the ``down`` factors of its factorized groups stacked along the rank, ``(sum r, in)``;
- ``hf_lowrank_up``: their ``up`` factors, flattened one after the other (the ranks differ, so no single 2-D shape);
- ``weight``: the dense groups' rows, ``(sum dense out, in)``, when there are any.

``apply`` runs one GEMM ``x @ down^T`` for all factorized groups, one per group ``h_g @ up_g^T``, one for the dense
rows, and concatenates in the layer's output order. Tensor parallelism follows :mod:`hf_lowrank.ops.tp_sharding`.

A checkpoint whose factors are stored as group-wise codes (``quantization_config.factor_quantization``) is refused at
engine start, with the conversion to float factors in the message
(:func:`hf_lowrank.quantized_modules.dequantize_factors`): dequantizing into float factors at load would save disk
bytes only, not GPU memory, and the codes' bytes are what such a checkpoint is for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.utils import set_weight_attrs

from ..compression.checkpoint_checks import (
    QUANT_METHOD,
    CompressedCheckpointError,
    checked_factor_quantization,
    checked_fields,
)
from ..ops.tp_sharding import RowSpan, column_spans, row_parallel_span, take_rows
from .vllm import DOWN_PARAM, UP_PARAM, FusedGroup, checkpoint_name_rules, lookup_rank, plan_groups

_QKV_IDS = ("q", "k", "v")


class LowRankVllmConfig(QuantizationConfig):
    """``quantization_config`` of an hf-lowrank checkpoint, read by vLLM from the checkpoint's ``config.json``.

    Args:
        ranks: ``{module: rank}`` in the checkpoint's (transformers') module names.
        method, format_version, extra: the other recorded fields, checked as transformers-side loading does.
        factor_quantization: must be absent: a checkpoint whose factors are stored as group-wise codes is refused
            at engine start (this plugin runs float factor pairs; see the error for the conversion).
    """

    def __init__(self, ranks: dict[str, int], method: str = "svd", format_version: int = 1, extra: Any = None,
                 factor_quantization: Any = None):
        super().__init__()
        self.checkpoint_ranks, self.method, self.format_version, self.extra = checked_fields(
            ranks, method, format_version, extra
        )
        quantized = checked_factor_quantization(factor_quantization, self.format_version)
        if quantized is not None:
            raise CompressedCheckpointError(
                f"This hf_lowrank checkpoint stores its factors as {quantized['bits']}-bit group-wise codes "
                "(quantization_config.factor_quantization), which the hf_lowrank vLLM plugin does not run: it serves "
                "float factor pairs. Convert it once with transformers: model = hf_lowrank.load_compressed(path); "
                "hf_lowrank.quantized_modules.dequantize_factors(model); model.save_pretrained(float_dir) (the "
                "same values, float factors), and serve float_dir."
            )
        self.ranks = dict(self.checkpoint_ranks)  # renamed to vLLM's module names by apply_vllm_mapper

    def __repr__(self) -> str:
        return f"LowRankVllmConfig({len(self.checkpoint_ranks)} factorized modules, method={self.method!r})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain GEMMs: any device

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LowRankVllmConfig:
        keys = ("ranks", "method", "format_version", "extra", "factor_quantization")
        return cls(**{k: v for k, v in config.items() if k in keys})

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper) -> None:
        self.ranks = hf_to_vllm_mapper.apply_dict(self.checkpoint_ranks)

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:  # an instance method: the renames need the rank map
        rules = checkpoint_name_rules(list(self.checkpoint_ranks))
        return QuantizationConfig.get_checkpoint_weight_mapper() | WeightsMapper(orig_to_new_regex=rules)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            sizes = getattr(layer, "output_sizes", None)
            groups = plan_groups(prefix, len(sizes) if sizes else 1, self.packed_modules_mapping, self.ranks)
            if all(group.rank is None for group in groups):
                return UnquantizedLinearMethod()
            if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear, ReplicatedLinear)):
                raise NotImplementedError(
                    f"The checkpoint factorizes '{prefix}', which vLLM builds as a {type(layer).__name__}; the "
                    "hf_lowrank vLLM plugin supports column-parallel, row-parallel and replicated Linear layers. "
                    "Compress without this module (target_modules) or serve hf_lowrank.decompress_model(model)."
                )
            return LowRankLinearMethod(groups, prefix)
        if lookup_rank(self.ranks, prefix) is not None:
            raise NotImplementedError(
                f"The checkpoint factorizes '{prefix}', which vLLM builds as a {type(layer).__name__}, not a Linear "
                "layer: the hf_lowrank vLLM plugin cannot run it. Compress without this module (target_modules) or "
                "serve hf_lowrank.decompress_model(model)."
            )
        return None


class LowRankLinearMethod(LinearMethodBase):
    """Linear method of one vLLM Linear whose groups are factor pairs or dense (see the module docstring)."""

    def __init__(self, groups: list[FusedGroup], prefix: str):
        self.groups = groups
        self.prefix = prefix

    # -- layout ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _full_sizes(layer: torch.nn.Module, local_sizes: list[int]) -> list[int]:
        if isinstance(layer, QKVParallelLinear):
            heads, kv, head = layer.total_num_heads, layer.total_num_kv_heads, layer.head_size
            return [heads * head, kv * head, kv * layer.v_head_size]
        if isinstance(layer, ColumnParallelLinear):
            return list(getattr(layer, "output_sizes", None) or [layer.output_size])
        return list(local_sizes)  # replicated / row-parallel: the output is not split

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        tp_rank, tp_size = layer.tp_rank, layer.tp_size
        full = self._full_sizes(layer, output_partition_sizes)
        column = isinstance(layer, ColumnParallelLinear)
        if isinstance(layer, RowParallelLinear) and tp_size > 1:
            self.in_span = row_parallel_span(input_size, tp_rank, tp_size)
        else:
            self.in_span = RowSpan(0, input_size)
        if self.in_span.size != input_size_per_partition:
            raise ValueError(f"'{self.prefix}': {input_size_per_partition} input features per rank, expected "
                             f"{self.in_span.size}.")
        self.rows: list[list[RowSpan]] = []  # per group: rows of the checkpoint module this rank keeps
        self.pieces: list[tuple] = []  # per group, in output order: ("dense", start, stop) / ("factor", start, stop)
        self.full_shapes: list[int] = []  # per group: output rows of the checkpoint module
        rank_total = dense_total = up_total = 0
        for group in self.groups:
            sub_full = [full[i] for i in group.shards]
            sub_local = [output_partition_sizes[i] for i in group.shards]
            spans = column_spans(sub_full, sub_local, tp_rank, tp_size) if column else column_spans(
                sub_full, sub_local, 0, 1)
            out_local = sum(sub_local)
            self.rows.append(spans)
            self.full_shapes.append(sum(sub_full))
            if group.rank is None:
                self.pieces.append(("dense", dense_total, dense_total + out_local))
                dense_total += out_local
            else:
                self.pieces.append(("factor", rank_total, rank_total + group.rank, up_total, out_local))
                rank_total += group.rank
                up_total += out_local * group.rank
        self.input_size = input_size

        def add(name: str, shape: tuple[int, ...], loader) -> None:
            param = Parameter(torch.empty(shape, dtype=params_dtype), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, {"weight_loader": loader})

        add(DOWN_PARAM, (rank_total, input_size_per_partition), self._load_down)
        add(UP_PARAM, (up_total,), self._load_up)
        if dense_total:
            add("weight", (dense_total, input_size_per_partition), self._load_dense)
        self.loaded: set[tuple[int, str]] = set()

    # -- loading ---------------------------------------------------------------------------------------------------

    def _group(self, shard_id: Any) -> int:
        if shard_id is None:
            shards = tuple(sorted({i for g in self.groups for i in g.shards}))
        elif isinstance(shard_id, str) and shard_id in _QKV_IDS:
            shards = (_QKV_IDS.index(shard_id),)
        elif isinstance(shard_id, int):
            shards = (shard_id,)
        elif isinstance(shard_id, tuple):
            shards = tuple(shard_id)
        else:
            raise ValueError(f"'{self.prefix}': unknown shard id {shard_id!r}.")
        for index, group in enumerate(self.groups):
            if group.shards == shards:
                return index
        raise ValueError(
            f"'{self.prefix}': the checkpoint stores sub-shards {shards} as one tensor, but the rank map splits this "
            f"layer as {[g.shards for g in self.groups]}: config.json and the weights come from different saves."
        )

    def _check(self, index: int, part: str, loaded: torch.Tensor, shape: tuple[int, int]) -> None:
        if tuple(loaded.shape) != shape:
            group = self.groups[index]
            raise ValueError(
                f"'{group.name}.{part}' in the checkpoint has shape {tuple(loaded.shape)}, but config.json "
                f"(rank {group.rank}) and the model's sizes make it {shape}: the weights and config.json come from "
                "different saves. Copy every file of the same save_pretrained."
            )
        self.loaded.add((index, part))

    def _load_down(self, param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        index = self._group(shard_id)
        group, piece = self.groups[index], self.pieces[index]
        if group.rank is None:
            raise ValueError(f"'{group.name}' has factors in the checkpoint but no rank in config.json.")
        self._check(index, "down.weight", loaded, (group.rank, self.input_size))
        param.data[piece[1] : piece[2]].copy_(loaded.narrow(1, self.in_span.source, self.in_span.size))

    def _load_up(self, param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        index = self._group(shard_id)
        group, piece = self.groups[index], self.pieces[index]
        if group.rank is None:
            raise ValueError(f"'{group.name}' has factors in the checkpoint but no rank in config.json.")
        self._check(index, "up.weight", loaded, (self.full_shapes[index], group.rank))
        local = take_rows(loaded, self.rows[index])
        param.data[piece[3] : piece[3] + local.numel()].copy_(local.reshape(-1))

    def _load_dense(self, param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        index = self._group(shard_id)
        group, piece = self.groups[index], self.pieces[index]
        if group.rank is not None:
            raise ValueError(
                f"'{group.name}' is stored dense in the checkpoint but config.json records rank {group.rank} for it: "
                "the weights and config.json come from different saves."
            )
        self._check(index, "weight", loaded, (self.full_shapes[index], self.input_size))
        local = take_rows(loaded, self.rows[index]).narrow(1, self.in_span.source, self.in_span.size)
        param.data[piece[1] : piece[2]].copy_(local)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        missing = [
            f"{group.name}.{part}"
            for index, group in enumerate(self.groups)
            for part in (("weight",) if group.rank is None else ("down.weight", "up.weight"))
            if (index, part) not in self.loaded
        ]
        if missing:
            raise ValueError(
                f"The checkpoint lacks {', '.join(missing)}, which config.json's rank map implies: a file is missing "
                "or config.json comes from another save. Copy every file of the same save_pretrained."
            )
        flat = getattr(layer, UP_PARAM)
        ups = []
        for piece in self.pieces:
            if piece[0] == "factor":
                _, start, stop, offset, out = piece
                ups.append(flat.data[offset : offset + out * (stop - start)].view(out, stop - start))
            else:
                ups.append(None)
        layer.hf_lowrank_ups = ups

    # -- forward ---------------------------------------------------------------------------------------------------

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        ups = layer.hf_lowrank_ups
        hidden = F.linear(x, getattr(layer, DOWN_PARAM))
        if len(self.pieces) == 1:
            return F.linear(hidden, ups[0], bias)
        dense = F.linear(x, layer.weight) if "weight" in layer._parameters else None
        parts = []
        for piece, up in zip(self.pieces, ups):
            if up is None:
                parts.append(dense[..., piece[1] : piece[2]])
            else:
                parts.append(F.linear(hidden[..., piece[1] : piece[2]], up))
        out = torch.cat(parts, dim=-1)
        return out + bias if bias is not None else out


def register_with_vllm() -> None:
    """Register :class:`LowRankVllmConfig` under ``quant_method: hf_lowrank`` (idempotent: a second call replaces
    the registration with the same class)."""
    register_quantization_config(QUANT_METHOD)(LowRankVllmConfig)
