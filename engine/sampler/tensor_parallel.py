"""Tensor-parallel sampling: the TP / data-parallel process groups, this rank's shard plan, and building
this rank's Llama shard one parameter at a time from full tensors.

Megatron-style, beside the plain model (model/llama.py knows nothing of it): q/k/v and gate/up are
column-parallel (a rank keeps the output rows of its heads / its FFN slice), o and down row-parallel (the
matching input columns, then one all-reduce of the [T, dim] output), the embedding vocab-parallel (its rows,
other ids masked to zero, one all-reduce) and the lm_head vocab-parallel (local logits, all-gathered along the
vocabulary by the runner, so every rank sees the full logits). The shard is itself a Llama, built from a
config with this rank's head / FFN / vocab counts and the full dim, so the attention code and the sampler's
KV cache (sized from model.config) need no TP branches: each rank's cache holds only its own KV heads.

Heads are split by whole GQA groups. With fewer KV heads than ranks each KV head is replicated on
tp / n_kv_heads ranks, which split that head's query heads: every rank holds one KV head and only query heads
that read it. Counts that do not divide (SmolLM2-135M: 9 heads, 3 KV heads on 2 ranks) give ranks unequal
shards. The vocabulary is cut in equal slices padded at the end; the gathered logits are cut back to
vocab_size, so a padded row can never be sampled.

Collectives are plain torch.distributed calls inside small nn.Linear / nn.Embedding subclasses, not DTensor
(torch.distributed.tensor.parallel): the sampler runs under inference_mode, where autograd-aware collectives
buy nothing, and a decode step is launch-bound, so DTensor's per-op dispatch would tax each of its few hundred
small ops; here a step costs exactly 2 * n_layers + 1 all-reduces, one all-gather and one token broadcast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import LlamaConfig
from model.llama import Llama, rope_inv_freq

TP_SIZES = (1, 2, 4, 8)

# parameter (module name) -> which slice of the output rows / input columns a rank keeps
_COLUMN_PARALLEL = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "ffn", "up_proj": "ffn"}
_ROW_PARALLEL = {"o_proj": "q", "down_proj": "ffn"}
_VOCAB_PARALLEL = ("embed_tokens.weight", "lm_head.weight")


# --- process groups ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TPGroups:
    """This rank's place in a world split into TP groups of consecutive ranks (inside one node) and
    data-parallel groups across them (one rank of each TP group, same TP rank)."""
    tp_size: int
    tp_rank: int
    tp_group: object | None  # ProcessGroup of this rank's TP group; None when tp_size == 1
    tp_ranks: tuple[int, ...]  # global ranks of this TP group, in TP-rank order
    dp_size: int  # number of TP groups
    dp_rank: int  # which TP group this rank is in: its share of the prompts
    dp_group: object | None  # same-TP-rank peers of the other TP groups; the world when tp_size == 1


def build_groups(tp: int, *, key: str = "model.tensor_parallel") -> TPGroups:
    """Split the initialized world (or a world of one) into TP and DP groups. Collective: every rank calls
    it with the same tp, because each new_group call is."""
    if tp not in TP_SIZES:
        raise ValueError(f"{key}={tp!r} must be one of {', '.join(map(str, TP_SIZES))}")
    if not (dist.is_available() and dist.is_initialized()):
        if tp != 1:
            raise ValueError(f"{key}={tp} needs torch.distributed initialized with {tp} ranks or more")
        return TPGroups(1, 0, None, (0,), 1, 0, None)
    world, rank = dist.get_world_size(), dist.get_rank()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % tp or local % tp:
        raise ValueError(f"{key}={tp} must divide the world size ({world}) and the ranks per node "
                         f"(LOCAL_WORLD_SIZE={local}): a TP group all-reduces every layer and stays inside a node")
    if tp == 1:
        return TPGroups(1, 0, None, (rank,), world, rank, dist.group.WORLD)
    tp_group = dp_group = None
    for g in range(world // tp):  # every rank creates every group, in the same order
        ranks = list(range(g * tp, (g + 1) * tp))
        pg = dist.new_group(ranks)
        if rank in ranks:
            tp_group = pg
    if world > tp:
        for i in range(tp):
            ranks = list(range(i, world, tp))
            pg = dist.new_group(ranks)
            if rank in ranks:
                dp_group = pg
    first = rank - rank % tp
    return TPGroups(tp, rank % tp, tp_group, tuple(range(first, first + tp)), world // tp, rank // tp, dp_group)


# --- the shard plan (pure: no process groups) -------------------------------------------------
def _split(n: int, parts: int, i: int) -> tuple[int, int]:
    """Part i of range(n) cut into `parts` contiguous pieces differing in size by at most one."""
    return i * n // parts, (i + 1) * n // parts


@dataclass(frozen=True)
class TPPlan:
    """What TP rank `rank` of `size` holds of a model with `config` (all ranges are [start, stop))."""
    config: LlamaConfig  # the full model
    rank: int
    size: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]  # with replication, one KV head shared with other ranks
    ffn: tuple[int, int]
    vocab: tuple[int, int]  # real vocabulary rows; the slice is padded to vocab_rows
    vocab_rows: int
    local_config: LlamaConfig  # this rank's module sizes: local heads / ffn / vocab rows, full dim

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full parameter `name` (our names, e.g. layers.3.self_attn.q_proj.weight).

        A copy, never a view: the caller frees the full tensor (one layer's worth at a time, at most)."""
        module = name.split(".")[-2] if name.startswith("layers.") else ""
        if module in _COLUMN_PARALLEL:
            a, b = self._rows(_COLUMN_PARALLEL[module])
            return full[a:b].clone()
        if module in _ROW_PARALLEL:
            a, b = self._rows(_ROW_PARALLEL[module])
            return full[:, a:b].clone(memory_format=torch.contiguous_format)
        if name in _VOCAB_PARALLEL:
            out = full.new_zeros(self.vocab_rows, full.shape[1])
            out[: self.vocab[1] - self.vocab[0]] = full[self.vocab[0]:self.vocab[1]]
            return out
        return full  # norms: replicated

    def _rows(self, kind: str) -> tuple[int, int]:
        if kind == "ffn":
            return self.ffn
        lo, hi = self.q_heads if kind == "q" else self.kv_heads
        d = self.config.head_dim
        return lo * d, hi * d


def plan_tp(config: LlamaConfig, rank: int, size: int, *, key: str = "model.tensor_parallel") -> TPPlan:
    if size not in TP_SIZES or not 0 <= rank < size:
        raise ValueError(f"{key}={size} (rank {rank}): must be one of {', '.join(map(str, TP_SIZES))}")
    c = config
    group = c.n_heads // c.n_kv_heads  # query heads per KV head
    if c.n_kv_heads >= size:
        kv = _split(c.n_kv_heads, size, rank)
        q = (kv[0] * group, kv[1] * group)
    else:
        # Fewer KV heads than ranks: replicate each on `reps` ranks, which split its query heads.
        if size % c.n_kv_heads:
            raise ValueError(f"{key}={size}: n_kv_heads={c.n_kv_heads} KV heads cannot be replicated evenly "
                             f"(with fewer KV heads than ranks, tensor_parallel must be a multiple of n_kv_heads)")
        reps = size // c.n_kv_heads
        if group < reps:
            raise ValueError(f"{key}={size}: n_heads={c.n_heads} leaves a rank without a query head")
        head = rank // reps
        lo, hi = _split(group, reps, rank % reps)
        kv, q = (head, head + 1), (head * group + lo, head * group + hi)
    ffn = _split(c.ffn_dim, size, rank)
    rows = -(-c.vocab_size // size)
    v0 = min(rank * rows, c.vocab_size)
    vocab = (v0, min(v0 + rows, c.vocab_size))
    local = c.replace(n_heads=q[1] - q[0], n_kv_heads=kv[1] - kv[0], head_dim=c.head_dim,
                      ffn_dim=ffn[1] - ffn[0], vocab_size=rows)
    return TPPlan(c, rank, size, q, kv, ffn, vocab, rows, local)


# --- the parallel modules ---------------------------------------------------------------------
class RowParallelLinear(nn.Linear):
    """nn.Linear over this rank's input columns; the all-reduce sums the ranks' partial outputs."""

    def __init__(self, in_features: int, out_features: int, group):
        super().__init__(in_features, out_features, bias=False)
        self.group = group

    def forward(self, x):
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelEmbedding(nn.Embedding):
    """This rank's vocabulary rows; ids owned by another rank embed to zero here, and the all-reduce
    (one non-zero term per id, so exact) gives every rank the full embedding."""

    def __init__(self, rows: int, dim: int, vocab: tuple[int, int], group):
        super().__init__(rows, dim)
        self.start, self.stop, self.group = vocab[0], vocab[1], group

    def forward(self, ids):
        outside = (ids < self.start) | (ids >= self.stop)
        out = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0)
        dist.all_reduce(out, group=self.group)
        return out


@dataclass(frozen=True)
class TPState:
    """Attached to a sharded model as `model.tp`: the plan, the groups and the collectives the sampler
    needs outside the model's forward."""
    plan: TPPlan
    groups: TPGroups

    @property
    def config(self) -> LlamaConfig:
        return self.plan.config

    def gather_vocab(self, local_logits: torch.Tensor) -> torch.Tensor:
        """[S, vocab_rows] on each rank -> the full [S, vocab_size] logits on every rank."""
        local_logits = local_logits.contiguous()
        parts = [torch.empty_like(local_logits) for _ in range(self.plan.size)]
        dist.all_gather(parts, local_logits, group=self.groups.tp_group)
        return torch.cat(parts, dim=-1)[:, : self.plan.config.vocab_size]

    def agree_min(self, value: int, device) -> int:
        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.groups.tp_group)
        return int(t.item())

    def broadcast_tokens(self, tokens: list[int], logprobs: list[float] | None, device):
        """The group's first rank's tokens (and log-probs) on every rank of the group."""
        t = torch.tensor([tokens, logprobs if logprobs is not None else [0.0] * len(tokens)],
                         dtype=torch.float64, device=device)  # token ids < 2**53 are exact in float64
        dist.broadcast(t, src=self.groups.tp_ranks[0], group=self.groups.tp_group)
        return [int(x) for x in t[0].tolist()], (t[1].tolist() if logprobs is not None else None)


def as_groups(tp_group) -> TPGroups:
    """A TPGroups as is, or a TP ProcessGroup of consecutive ranks (build_groups' layout) turned into one."""
    if isinstance(tp_group, TPGroups):
        return tp_group
    ranks = tuple(dist.get_process_group_ranks(tp_group))
    size, world, rank = len(ranks), dist.get_world_size(), dist.get_rank()
    if ranks != tuple(range(ranks[0], ranks[0] + size)) or ranks[0] % size or rank not in ranks:
        raise ValueError(f"tensor parallel: group ranks {list(ranks)} are not this rank's block of consecutive "
                         "ranks; make the groups with engine.sampler.tensor_parallel.build_groups")
    return TPGroups(size, ranks.index(rank), tp_group, ranks, world // size, rank // size, None)


# --- building the shard -----------------------------------------------------------------------
def build_tp_model(config: LlamaConfig, groups: TPGroups, load_fn: Callable[[str], torch.Tensor], *,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                   sharded: bool = False) -> Llama:
    """This rank's shard of the Llama described by the full `config`, built on the meta device and filled
    one parameter at a time (in named_parameters order: embedding, layer by layer, norm, lm_head).

    load_fn(name) returns the full tensor, sliced here with plan.shard and then freed (peak: one full
    parameter), or, with sharded=True, this rank's slice already (e.g. made by plan.shard during a
    ZeRO-3 walk). dtype None keeps the first tensor's dtype; device None means CPU."""
    groups = as_groups(groups)
    plan = plan_tp(config, groups.tp_rank, groups.tp_size)
    lc, group = plan.local_config, groups.tp_group
    with torch.device("meta"):
        model = Llama(lc)
        for layer in model.layers:
            layer.self_attn.o_proj = RowParallelLinear(lc.n_heads * lc.head_dim, lc.dim, group)
            layer.mlp.down_proj = RowParallelLinear(lc.ffn_dim, lc.dim, group)
        model.embed_tokens = VocabParallelEmbedding(plan.vocab_rows, lc.dim, plan.vocab, group)
    device = torch.device(device or "cpu")
    for name, param in list(model.named_parameters()):
        tensor = load_fn(name)
        if not sharded:
            tensor = plan.shard(name, tensor)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"tensor parallel rank {plan.rank}/{plan.size}: tensor {name!r} has shape "
                             f"{list(tensor.shape)}, the shard expects {list(param.shape)}")
        if dtype is None:
            dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        path, _, attr = name.rpartition(".")
        owner = model.get_submodule(path) if path else model
        setattr(owner, attr, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=param.requires_grad))
        del tensor
    model.inv_freq = rope_inv_freq(config).to(device)
    model.tp = TPState(plan, groups)
    return model
