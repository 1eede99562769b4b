"""Per-GPU memory of a training stage and of the sampler, from the model's shape alone (meta device).

Used by bench/memory_plan.py (the presets' table) and small enough for a startup check. Every term is
bytes per GPU; the sources are this project's own code paths (engine/train_backends.py, engine/ds_config.py,
kernels/sequence_objective.py, engine/sampler/) and DeepSpeed 0.19's ZeRO-3 defaults, which
engine/ds_config.py does not override (prefetch bucket 5e7, max live parameters 1e9, reduce bucket 5e8,
sub-group 1e9 elements).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import TrainConfig
from model.config import LlamaConfig
from model.llama import Llama

GiB = 2 ** 30
# DeepSpeed ZeRO-3 defaults (deepspeed/runtime/zero/config.py), elements.
PREFETCH_BUCKET = int(5e7)
MAX_LIVE_PARAMETERS = int(1e9)
REDUCE_BUCKET = int(5e8)
SUB_GROUP = int(1e9)
# kernels/sequence_objective.py _BLOCK_ELEMENTS["triton"]: logits rows per block = this // vocab.
OBJECTIVE_BLOCK_ELEMENTS = 1 << 28
# Not in torch.cuda.max_memory_allocated: the CUDA context with cuBLAS/cuDNN/NCCL workspaces (~1 GiB on
# an A100/H100), and the caching allocator's fragmentation (blocks freed but not reusable for the next
# shape; ~5% of a 30-70 GiB peak). 2.5 GiB together; the measured 1.1B check below compares without it.
CONTEXT_ALLOWANCE = int(2.5 * GiB)
# Host memory each training process takes beside the offloaded state (torch, CUDA host mappings, the
# tokenized data, DeepSpeed's pinned staging buffers).
HOST_PER_RANK = 8 * GiB
# Share of a node's host memory a plan may fill: the rest is the OS, the page cache the checkpoint load and
# the resumable-checkpoint writes go through, and the loop's own data.
HOST_USABLE = 0.9


@dataclass(frozen=True)
class Node:
    name: str
    gpu_bytes: int  # what torch.cuda.mem_get_info reports as total on the card
    host_bytes: int  # CPU memory of one 8-GPU node (the offloaded optimizer state lives here)
    gpus: int = 8


# 8x A100-80GB: 81,050 MiB per card; host as AWS p4de.24xlarge (1,152 GiB). 8x H100-80GB: 81,559 MiB per
# card; host as DGX H100 / AWS p5.48xlarge (2,048 GiB).
NODES = (Node("A100-80GB", 81050 * 2 ** 20, 1152 * GiB), Node("H100-80GB", 81559 * 2 ** 20, 2048 * GiB))


@dataclass(frozen=True)
class ParamCounts:
    total: int
    largest_layer: int  # one decoder layer: what ZeRO-3 gathers at once
    output: int  # the [V, H] weight the fused objective sees whole (the embedding when tied)


def count_params(config: LlamaConfig) -> ParamCounts:
    """Exact counts from the module built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = Llama(config)
    return ParamCounts(sum(p.numel() for p in model.parameters()),
                       max(sum(p.numel() for p in layer.parameters()) for layer in model.layers),
                       model.output_weight.numel())


def layer_activation_bytes(c: LlamaConfig, dropout: bool) -> int:
    """Bytes one decoder layer keeps for backward, per token, bf16 (model/llama.py under autograd).

    Korthikanti et al. 2022 (34 h per token for GPT), redone for this Llama block with fused attention:
      2 RMSNorms: the fp32 upcast x.float() (4h, read by pow and mul) + the bf16 normalized output (2h,
        the input of the q/k/v or gate/up matmuls) = 12h;
      attention: rotated q (2 q_dim), K and V as SDPA sees them (repeat_interleave'd to n_heads: 2 x 2 q_dim),
        the output (2 q_dim, also the o_proj input) and SDPA's fp32 log-sum-exp (4 n_heads); no [T, T] scores
        (flash / memory-efficient kernel). With flash-attn installed, GQA K and V stay at kv_dim: the plan is
        then an upper bound by 4 (q_dim - kv_dim);
      SwiGLU MLP: gate out, silu(gate), up out, their product (the down_proj input) = 4 x 2 ffn = 8 ffn;
      dropout (p > 0): two bool masks = 2h.
    The residual adds and RoPE (cos/sin are constants) keep nothing of size h. With q_dim = h this is
    (20 + 8 ffn / h) h: 42h for TinyLlama (ffn 2.75h), 48h for Llama 3 8B (+2h with dropout)."""
    h, q = c.dim, c.n_heads * c.head_dim
    attn = 8 * q + 4 * c.n_heads
    return 12 * h + attn + 8 * c.ffn_dim + (2 * h if dropout else 0)


def objective_bytes(c: LlamaConfig, tokens: int, single_block: bool) -> dict[str, int]:
    """kernels/sequence_objective.py on the GPU (triton impl, bf16): one logits block reused by every chunk,
    d(hidden) [N, H] and d(weight) [V, H] made in forward and held until backward (fp32 accumulation of
    d(weight) plus its bf16 copy when the batch takes several blocks)."""
    rows = min(max(1, OBJECTIVE_BLOCK_ELEMENTS // c.vocab_size), tokens)
    vh = c.vocab_size * c.dim
    return {"logits block": 2 * rows * c.vocab_size, "d(hidden)": 2 * tokens * c.dim,
            "d(weight)": 2 * vh if single_block else 6 * vh}


def zero3_state_bytes(params: int, world: int, param_bytes: int, offload: bool = False) -> dict[str, int]:
    """What one ZeRO-3 rank stores of the model and the optimizer: its parameter partition, the fp32 master
    partition and AdamW's fp32 m, v (both on the host with offload_optimizer). DeepSpeed 0.19 copies the
    master even when the parameters are fp32 already (measured: tests/test_memory_plan.py)."""
    shard = params // world
    return {"params": param_bytes * shard, "master": 0 if offload else 4 * shard, "adam": 0 if offload else 8 * shard}


@dataclass(frozen=True)
class Stage:
    """One training stage as the trainer runs it on one rank."""
    cfg: TrainConfig  # already for_world(world)
    world: int
    seq_len: int  # padded sequence length of the longest micro-batch
    rows: int  # sequences per forward: micro_batch (SFT) or 2 x micro_batch (DPO: chosen + rejected)


def training_bytes(c: LlamaConfig, n: ParamCounts, stage: Stage) -> dict[str, int]:
    """Per-GPU bytes at the stage's peak, by component (bf16 weights, fp32 master + AdamW)."""
    cfg, W, P = stage.cfg, stage.world, n.total
    tokens = stage.rows * stage.seq_len
    out: dict[str, int] = {}
    torch_runner = W == 1 and cfg.backend != "deepspeed" and not cfg.offload_optimizer
    if torch_runner:
        # engine/train_backends.py TorchRunner: bf16 params + fp32 master + fp32 accumulated grads + AdamW m, v
        out["params (bf16)"] = 2 * P
        out["fp32 master + grad accum + Adam m, v"] = 16 * P
        step_extra = 2 * P + 4 * P  # at accumulation: the bf16 grads and their fp32 copies ([g.float() ...])
    else:
        z = cfg.zero_stage
        state = zero3_state_bytes(P, W if z >= 1 else 1, 2, cfg.offload_optimizer)
        out["params (bf16)"] = state["params"] if z == 3 else 2 * P
        if z == 3:
            # the gathered layer, the prefetch bucket behind it, and the fused objective's whole [V, H]
            live = min(MAX_LIVE_PARAMETERS, max(n.largest_layer, n.output)) + PREFETCH_BUCKET
            out["gathered params + layer grads"] = 2 * live + 2 * n.largest_layer
        if cfg.offload_optimizer:
            out["grads (bf16)"] = 0  # ZeRO-Offload keeps the grad partitions in pinned host memory
        else:
            out["grads (bf16)"] = 2 * P // W if z >= 2 else 2 * P
        if z >= 2:
            out["reduce bucket"] = 2 * REDUCE_BUCKET
        shard = P // W if z >= 1 else P
        out["fp32 master + Adam m, v"] = state["master"] + state["adam"]
        # optimizer step: the fp32 gradient of one sub-group (on the host when offloaded)
        step_extra = 0 if cfg.offload_optimizer else 4 * min(SUB_GROUP, shard)
    per_layer = layer_activation_bytes(c, cfg.dropout > 0) * tokens
    final_norm = 6 * c.dim * tokens
    obj = objective_bytes(c, tokens, tokens <= OBJECTIVE_BLOCK_ELEMENTS // c.vocab_size)
    held = obj["d(hidden)"] + obj["d(weight)"]
    if cfg.gradient_checkpointing:
        # each layer keeps only its bf16 input (2h per token); backward recomputes one layer at a time,
        # after the objective's logits block is gone
        stored = c.n_layers * 2 * c.dim * tokens + final_norm
        out["activations"] = stored + max(obj["logits block"], per_layer) + held
    else:
        out["activations"] = c.n_layers * per_layer + final_norm + obj["logits block"] + held
    fwd_bwd = sum(out.values())
    step = sum(v for k, v in out.items() if k != "activations") + step_extra
    out["optimizer-step transients"] = max(0, step - fwd_bwd)
    out["CUDA context + fragmentation"] = CONTEXT_ALLOWANCE
    return out


def host_bytes_per_node(n: ParamCounts, stage: Stage, gpus: int) -> int:
    """CPU memory on one node: ZeRO-Offload's fp32 master, Adam m, v, the bf16 grad partitions and one
    fp32 sub-group gradient per rank, each process's own footprint, and (node 0) the bf16 export copy that
    the export/hand-off walk (engine/handoff.py) builds on rank 0."""
    per_rank = HOST_PER_RANK
    if stage.cfg.offload_optimizer:
        shard = n.total // stage.world
        per_rank += 14 * shard + 4 * min(SUB_GROUP, shard)
    return gpus * per_rank + 2 * n.total


def generation_bytes(c: LlamaConfig, tp: int, max_num_seqs: int, max_batched_tokens: int,
                     dtype: torch.dtype) -> dict[str, int]:
    """One sampler rank of a tensor-parallel group (engine/sampler/tensor_parallel.py shards), its KV cache
    for every sequence slot filled to the context window, and its forward's transients. Nothing of the
    trainer is resident: each stage runs after the trainer has been torn down (engine/trainer.py returns;
    loop/iterate.py releases the sampler before training), so no optimizer state here."""
    from engine.sampler.runner import kv_bytes_per_block
    from engine.sampler.tensor_parallel import plan_tp

    elem = torch.finfo(dtype).bits // 8
    shards = [plan_tp(c, r, tp).local_config for r in range(tp)]
    weights = max(count_params(s).total for s in shards) * elem
    local = max(shards, key=lambda s: s.n_kv_heads)
    block = 16  # engine/sampler Sampler's default block_size
    blocks = max_num_seqs * -(-c.max_seq_len // block) + 1  # the most engine/sampler/kv_sizing.num_kv_blocks keeps
    ffn = max(s.ffn_dim for s in shards)
    # a forward over max_batched_tokens: the gate/up/silu outputs and a few [T, H] streams, plus full
    # fp32 logits (gathered over the vocabulary) for every decoding sequence and their sampling copy
    work = max_batched_tokens * (3 * ffn + 4 * c.dim) * elem + 2 * max_num_seqs * c.vocab_size * 4
    return {"weights (TP shard)": weights, "KV cache": blocks * kv_bytes_per_block(local, block, dtype),
            "forward transients": work, "CUDA context + fragmentation": CONTEXT_ALLOWANCE}
