"""The training entry points of one self-rewarding stage: train_sft, train_dpo, compute_reference_logprobs.

All ranks call these collectively (torchrun), or one process calls them alone. Each loads the HF
checkpoint in init_dir (partitioned under zero.Init with DeepSpeed ZeRO-3), trains, and writes an
HF checkpoint to out_dir atomically; resumable DeepSpeed checkpoints live in out_dir + ".ckpt".
DPO never holds two models: the reference log-probs are computed first, in a separate pass with the
init model, and stored in the pairs. One loop trains both: the loss is an engine/objectives.py
Objective (its collate, its fused per-chunk objective, its stats); the loop never asks which.

Per step the host does no device sync: losses stay on the device until a log or checkpoint step
reduces all pending ones across ranks at once.
"""
from __future__ import annotations

import gc
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as torch_dist

from .ckpt import check_resumable, ckpt_dir_for, data_fingerprint, export_hf
from .config import DPOConfig, TrainConfig, TrainConfigError
from .data import PreferencePair, SFTExample, collate_pairs, epoch_batches, example_length, rank_micro_batches
from .distributed import Dist, barrier, deepspeed_available, init_distributed, log, seed_everything
from .handoff import HandedOff, HandoffRequest, collect
from .metrics import Throughput, format_mfu, mfu
from .metrics_log import StageMetrics
from .objectives import DPOObjective, Objective, SFTObjective
from .progress import Progress
from .train_backends import WORLD_FILE, DeepSpeedRunner, TorchRunner
from .zero3 import open_init


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    metrics: list[dict] = field(default_factory=list)
    tokens_per_s: float = 0.0
    mfu: float | None = None
    handoff: HandedOff | None = None  # this rank's sampler weights, when the caller asked for them
    micro_batch: int = 0  # the per-rank micro-batch this world size ran with


@dataclass
class Stage:
    """What every entry point resolves before building a model."""
    cfg: TrainConfig
    dist: Dist
    backend: str
    dtype: torch.dtype
    reader: object  # the init checkpoint, opened lazily, its config carrying the training dropout
    file_config: object  # LlamaConfig as stored in init_dir (exported unchanged)
    max_len: int
    pad_multiple: int


def resolve_backend(cfg: TrainConfig, world_size: int) -> str:
    backend = cfg.backend
    if backend == "auto":
        # One process has nothing to shard: plain torch skips ZeRO's hooks and bookkeeping.
        backend = "deepspeed" if (world_size > 1 or cfg.offload_optimizer) else "torch"
    if backend == "deepspeed" and not deepspeed_available():
        raise TrainConfigError("train config: backend='deepspeed' but deepspeed is not installed")
    if backend == "torch" and world_size > 1:
        raise TrainConfigError(f"train config: backend='torch' runs one process, got world_size={world_size}")
    if backend == "torch" and cfg.offload_optimizer:
        raise TrainConfigError("train config: offload_optimizer=True needs backend='deepspeed'")
    return backend


def for_world(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """cfg with the per-rank micro-batch this world size needs (TrainConfig.for_world)."""
    return cfg.for_world(world_size).validate(world_size)


def _prepare(init_dir, cfg: TrainConfig) -> Stage:
    """Validate everything that can fail cheaply, then join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cfg = for_world(cfg, world_size)
    backend = resolve_backend(cfg, world_size)
    reader = open_init(init_dir)
    file_config = reader.config
    reader.config = config = file_config.replace(dropout=cfg.dropout)
    dist = init_distributed(use_deepspeed=backend == "deepspeed")
    seed_everything(cfg.seed, dist.rank)
    on_cuda = dist.device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.dtype,
                                                                  torch.bfloat16 if on_cuda else torch.float32)
    max_len = min(cfg.max_seq_len or config.max_seq_len, config.max_seq_len)
    pad_multiple = cfg.pad_to_multiple or (8 if on_cuda else 1)
    return Stage(cfg, dist, backend, dtype, reader, file_config, max_len, pad_multiple)


def _runner(stage: Stage, total_steps: int, train: bool = True):
    cls = DeepSpeedRunner if stage.backend == "deepspeed" else TorchRunner
    return cls(stage.reader, stage.cfg, stage.dist, stage.dtype, total_steps, train=train)


def _check_data(objective: Objective, data: Sequence, cfg: TrainConfig) -> None:
    if len(data) < cfg.global_batch:
        raise TrainConfigError(f"train config: global_batch={cfg.global_batch} exceeds the {len(data)} "
                               f"{objective.kind} examples given")
    objective.check(data)


def _reduce(pending: list[torch.Tensor], dist: Dist) -> list[list[float]]:
    """All pending per-step stats, summed over ranks, in one collective and one host sync."""
    if not pending:
        return []
    stacked = torch.stack([p.to(dist.device, torch.float32) for p in pending])
    if dist.world_size > 1:
        torch_dist.all_reduce(stacked)
    return stacked.cpu().tolist()


def train_sft(init_dir, examples: Sequence[SFTExample], cfg: TrainConfig, out_dir, *, resume: bool = True,
              on_step: Callable[[int], None] | None = None, handoff: HandoffRequest | None = None,
              sink: StageMetrics | None = None) -> TrainResult:
    """Supervised fine-tuning on response tokens only. on_step(step) runs after each optimizer step;
    with handoff, the result carries this rank's sampler weights (engine/handoff.py); with sink,
    rank 0 logs one record per optimizer step there (engine/metrics_log.py)."""
    return _train(SFTObjective(), init_dir, list(examples), cfg, out_dir, resume, on_step, handoff, sink)


def train_dpo(init_dir, pairs: Sequence[PreferencePair], cfg: TrainConfig, out_dir, *, resume: bool = True,
              on_step: Callable[[int], None] | None = None, handoff: HandoffRequest | None = None,
              sink: StageMetrics | None = None, candidates_dir=None, candidates_every: int = 0) -> TrainResult:
    """DPO (or IPO/hinge/robust; + RPO NLL) on pairs carrying precomputed reference log-probs; the loss
    is cfg.objective (a DPOConfig), or the paper's sigmoid DPO at beta 0.1 for a plain TrainConfig.
    With candidates_dir, an HF checkpoint is also exported to candidates_dir/step<N> every
    candidates_every steps before the last (checkpoint selection, loop/checkpoint_select.py)."""
    objective = DPOObjective(cfg.objective if isinstance(cfg, DPOConfig) else None)
    return _train(objective, init_dir, list(pairs), cfg, out_dir, resume, on_step, handoff, sink,
                  candidates=(Path(candidates_dir), candidates_every) if candidates_dir and candidates_every else None)


def _train(objective: Objective, init_dir, data: list, cfg: TrainConfig, out_dir, resume: bool, on_step,
           handoff: HandoffRequest | None = None, sink: StageMetrics | None = None,
           candidates: tuple[Path, int] | None = None) -> TrainResult:
    init_dir, out_dir = Path(init_dir), Path(out_dir)
    kind = objective.kind
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    configured = cfg.micro_batch
    cfg = for_world(cfg, world_size)
    _check_data(objective, data, cfg)
    stage = _prepare(init_dir, cfg)
    dist, ckpt_dir = stage.dist, ckpt_dir_for(out_dir)
    steps_per_epoch = len(data) // cfg.global_batch
    total = cfg.epochs * steps_per_epoch
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    lengths = [example_length(x) for x in data]
    fingerprint = data_fingerprint(kind, lengths, cfg)

    if cfg.micro_batch != configured:
        log(stage.dist, f"{kind}: micro_batch {configured} -> {cfg.micro_batch} per rank so that "
            f"global_batch={cfg.global_batch} splits over {world_size} ranks")
    if resume:
        _restart_if_other_world(ckpt_dir, world_size, stage.dist, kind)
    runner = _runner(stage, total)
    start, losses, metrics = 0, [], []
    if resume:
        client = runner.load(ckpt_dir)
        if client is not None:
            check_resumable(client, fingerprint, ckpt_dir)
            start, losses, metrics = client["step"], list(client["losses"]), list(client["metrics"])
            log(dist, f"{kind}: resumed from {ckpt_dir} at step {start}")
    elif dist.is_main and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    barrier()
    sink = sink if dist.is_main else None  # one writer: rank 0
    if sink is not None:
        sink.begin(start)  # a resumed stage's lines past its checkpoint are dropped, then rewritten
    progress = Progress(total, sink.name if sink is not None else kind, initial=start, enabled=dist.is_main,
                        emit=lambda line: log(dist, line))

    seq_per_item, stat_names = objective.sequences_per_item, objective.stat_names
    real_len = [min(n, stage.max_len) * seq_per_item for n in lengths]  # tokens a forward really processes
    collate = dict(max_len=stage.max_len, pad_multiple=stage.pad_multiple, pad_id=0, device=dist.device)
    throughput = Throughput(stage.reader.config, dist.device, dist.world_size)
    overall = Throughput(stage.reader.config, dist.device, dist.world_size)
    pending: list[torch.Tensor] = []
    pending_lrs: list[float] = []
    pending_norms: list[torch.Tensor] = []
    epoch, batches = -1, []
    log(dist, f"{kind}: {len(data)} examples, {total} steps of {cfg.global_batch}, backend={stage.backend} "
        f"zero={cfg.zero_stage if stage.backend == 'deepspeed' else '-'} dtype={stage.dtype} "
        f"world={dist.world_size}")
    runner.train(True)

    def flush(step_done: int) -> None:
        rows = _reduce(pending, dist)
        norms = torch.stack([n.to(dist.device, torch.float32) for n in pending_norms]).cpu().tolist() if rows else []
        first = step_done - len(rows) + 1
        for offset, (row, lr) in enumerate(zip(rows, pending_lrs)):
            losses.append(row[0])
            metrics.append({"step": first + offset, "lr": lr, **dict(zip(stat_names, row)),
                            "grad_norm": norms[offset]})
        pending.clear()
        pending_lrs.clear()
        pending_norms.clear()
        if rows:
            rate, util = throughput.report()
            metrics[-1].update(tokens_per_s=rate, mfu=util)
            if sink is not None:  # the window's rate is each of its steps' rate
                for record in metrics[-len(rows):]:
                    sink.step({**record, "tokens_per_s": rate, "mfu": util})
            loss = sum(r[0] for r in rows) / len(rows)
            extra = "".join(f" {k}={metrics[-1][k]:.4f}" for k in stat_names[1:5])
            progress.report(f"{kind} step {step_done}/{total} loss={loss:.5f}{extra} lr={metrics[-1]['lr']:.3g} "
                            f"tokens/s={rate:.0f} mfu={format_mfu(util)}", loss=loss, tok_s=round(rate))

    for step in range(start, total):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            batches = epoch_batches(lengths, cfg.global_batch, cfg.seed, epoch, cfg.length_grouped)
        batch = batches[step % steps_per_epoch]
        pending_lrs.append(runner.lr())
        norm = objective.normaliser([data[i] for i in batch], stage.max_len)  # over all ranks' items
        step_stats = None
        for micro in rank_micro_batches(batch, cfg.micro_batch, dist.rank, dist.world_size):
            b = objective.collate([data[i] for i in micro], **collate)
            chunk_objective, groups = objective.chunk(b, norm)
            value, logp_sum, count = runner.forward(b["input_ids"], b["targets"], b["mask"], chunk_objective, groups)
            stats = objective.stats(b, value, logp_sum, count, norm)
            runner.backward(value)
            grad_norm = runner.step()  # the norm of the optimizer step that the last micro-batch completes
            step_stats = stats if step_stats is None else step_stats + stats
        pending.append(step_stats)
        pending_norms.append(grad_norm if grad_norm is not None else torch.tensor(float("nan")))
        batch_tokens = sum(real_len[i] for i in batch)
        throughput.add(batch_tokens, len(batch) * seq_per_item)
        overall.add(batch_tokens, len(batch) * seq_per_item)
        progress.advance()
        done = step + 1
        checkpoint_due = cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total
        if done % cfg.log_every == 0 or done == total or checkpoint_due:
            flush(done)
        if checkpoint_due:
            runner.save(ckpt_dir, f"step{done}", {"step": done, "losses": losses, "metrics": metrics,
                                                  "fingerprint": fingerprint, "kind": kind})
            runner.prune(ckpt_dir, f"step{done}")
        if candidates is not None and done % candidates[1] == 0 and done < total:
            # A collective walk over the partitions, as the final export; rank 0 writes the files.
            candidate = {} if dist.is_main else None
            collect(runner.module.model, stage.dtype, stage.file_config, None, candidate)
            if dist.is_main:
                export_hf(candidate, stage.file_config, init_dir, candidates[0] / f"step{done}")
            del candidate
        if on_step is not None:
            on_step(done)
    flush(total)
    progress.close()

    rate, _ = overall.report()
    util = mfu(rate, stage.reader.config, max(1, round(sum(real_len) / max(1, len(data) * seq_per_item))),
               overall.peak, dist.world_size)
    runner.train(False)
    state_dict = {} if dist.is_main else None
    handed = collect(runner.module.model, stage.dtype, stage.file_config, handoff, state_dict)
    if dist.is_main:
        export_hf(state_dict, stage.file_config, init_dir, out_dir)
        log(dist, f"{kind}: exported {out_dir} ({rate:.0f} tokens/s, mfu {format_mfu(util)})")
    del state_dict
    barrier()
    if dist.is_main and not cfg.keep_checkpoints and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    runner.close()
    del runner
    gc.collect()
    return TrainResult(steps=total, losses=losses, metrics=metrics, tokens_per_s=rate, mfu=util, handoff=handed,
                       micro_batch=cfg.micro_batch)


def _restart_if_other_world(ckpt_dir: Path, world_size: int, dist: Dist, kind: str) -> None:
    """A checkpoint written by another number of ranks holds other ZeRO partitions and RNG streams:
    the stage restarts from its first step (said in one line) instead of failing to load."""
    marker = ckpt_dir / WORLD_FILE
    if not marker.is_file():
        return
    written = int(marker.read_text() or 0)
    if written != world_size:
        log(dist, f"{kind}: {ckpt_dir} was written by {written} ranks, this run has {world_size}: "
            "restarting this training stage from step 0")
        barrier()
        if dist.is_main:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        barrier()


def compute_reference_logprobs(init_dir, pairs: Sequence[PreferencePair], cfg: TrainConfig) -> list[PreferencePair]:
    """Summed log p(chosen|prompt) and log p(rejected|prompt) under the init model, for every pair.

    Ranks split the (length-sorted) batches and exchange results; a rank out of batches repeats one
    so that ZeRO-3's collective forwards stay in step. Eval mode: no dropout."""
    pairs = list(pairs)
    size = cfg.ref_micro_batch or 2 * cfg.micro_batch  # the configured size: the same batches on any world size
    stage = _prepare(init_dir, cfg)
    dist = stage.dist
    runner = _runner(stage, total_steps=1, train=False)
    runner.train(False)
    order = sorted(range(len(pairs)), key=lambda i: -example_length(pairs[i]))
    batches = [order[s:s + size] for s in range(0, len(order), size)]
    mine = batches[dist.rank::dist.world_size]
    rounds = -(-len(batches) // dist.world_size)
    collate = dict(max_len=stage.max_len, pad_multiple=stage.pad_multiple, pad_id=0, device=dist.device,
                   with_reference=False)
    computed: list[tuple[list[int], torch.Tensor]] = []
    progress = Progress(rounds, "reference log-probs", unit="batch", enabled=dist.is_main,
                        emit=lambda line: log(dist, line))
    with torch.no_grad():
        for r in range(rounds):
            idx = mine[r] if r < len(mine) else batches[0]
            b = collate_pairs([pairs[i] for i in idx], **collate)
            logp_sum, _ = runner.forward(b["input_ids"], b["targets"], b["mask"])
            if r < len(mine):
                computed.append((idx, logp_sum.float()))
            progress.advance()
            if (r + 1) % cfg.log_every == 0 and r + 1 < rounds:
                progress.report(f"reference log-probs: batch {r + 1}/{rounds} (of {size} pairs, x{dist.world_size} "
                                "ranks)")
    progress.close()
    local = {}
    for idx, logp in computed:
        values = logp.cpu().tolist()
        for j, i in enumerate(idx):
            local[i] = (values[j], values[j + len(idx)])
    if dist.world_size > 1:
        gathered = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, local)
        for part in gathered:
            local.update(part)
    runner.close()
    del runner
    gc.collect()
    log(dist, f"reference log-probs: {len(pairs)} pairs")
    return [p.with_reference(*local[i]) for i, p in enumerate(pairs)]
