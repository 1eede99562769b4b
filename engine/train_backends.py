"""Two ways to run the same PolicyLoss: DeepSpeed (ZeRO 0-3, any world size) or plain torch (one process).

Both expose one surface to the trainer: forward, backward(objective share), step (every micro-batch;
the optimizer moves at accumulation boundaries), lr, save/load, and `.module.model` for the export and
hand-off walk (engine/handoff.py). The torch runner is
the parity reference for the ZeRO-3 tests, the 1-process default on CPU (no ZeRO bookkeeping for a
world that has nothing to shard), and the GPU path where DeepSpeed is not installed.

Mixed precision in the torch runner mirrors DeepSpeed's bf16 mode: bf16 weights run the model, fp32
master weights and AdamW state take the update, gradients accumulate in fp32. `compile` compiles each
decoder layer in both runners (compile_layers).
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from common.atomic import atomic_write, atomic_write_text

from model.llama import Llama, rope_inv_freq
from model.weight_loading import CheckpointReader, materialize

from .config import TrainConfig
from .distributed import Dist
from .ds_config import build_ds_config
from .optim import adamw, param_groups
from .schedule import CosineSchedule
from .steps import PolicyLoss
from .zero3 import build_partitioned

LATEST = "latest"
# the number of ranks that wrote a checkpoint: its partitions and RNG streams belong to that world size
WORLD_FILE = "world_size"


def load_full_model(reader: CheckpointReader, dtype: torch.dtype, device: torch.device) -> Llama:
    return materialize(reader, dtype, device)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def compile_layers(model: Llama, zero3: bool) -> None:
    """torch.compile each decoder layer (the lm_head and the fused objective stay eager: their chunk
    planning is data-dependent). Under ZeRO-3 each layer is first made a DeepSpeed leaf module (its
    parameters fetched by one hook on the layer, none on its children) and only its forward is compiled,
    so ZeRO's fetch/release hooks run eagerly around the compiled region; compiling the module's call
    instead traces those hooks, recompiling per submodule type until dynamo falls back to eager."""
    for layer in model.layers:
        if zero3:
            from deepspeed.utils import set_z3_leaf_module

            set_z3_leaf_module(layer, True)  # before deepspeed.initialize, which registers the hooks
            layer.forward = torch.compile(layer.forward)
        else:
            layer.compile()


def latest_tag(ckpt_dir: Path) -> str | None:
    file = ckpt_dir / LATEST
    return file.read_text().strip() if file.is_file() else None


class TorchRunner:
    def __init__(self, reader: CheckpointReader, cfg: TrainConfig, dist: Dist, dtype: torch.dtype, total_steps: int,
                 *, train: bool = True):
        if dist.world_size != 1:
            raise ValueError(f"train config: backend='torch' runs one process, got world_size={dist.world_size} "
                             "(use backend='deepspeed')")
        self.dist, self.dtype = dist, dtype
        # fp32 first: the master copy must not inherit a bf16 rounding of an fp32 checkpoint
        model = load_full_model(reader, torch.float32, dist.device)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        params = list(model.parameters())
        if not train:  # inference only (the reference pass): no master copy, no optimizer
            model.to(dtype)
            model.inv_freq = rope_inv_freq(reader.config).to(dist.device)
            self.module = PolicyLoss(model, cfg.kernel_impl)
            return
        if dtype == torch.float32:
            self.master = None
            groups = param_groups(model, cfg.weight_decay)
        else:
            self.master = [p.detach().clone().requires_grad_(True) for p in params]
            inv_freq = model.inv_freq
            model.to(dtype)
            model.inv_freq = inv_freq  # RoPE frequencies stay fp32 (as HF)
            params = list(model.parameters())
            by_id = {id(p): m for p, m in zip(params, self.master)}
            groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]}
                      for g in param_groups(model, cfg.weight_decay)]
        if cfg.compile:
            compile_layers(model, zero3=False)
        self.module = PolicyLoss(model, cfg.kernel_impl)
        self.params = params
        self.optimizer = adamw(groups, cfg.lr, cfg.adam_betas, cfg.adam_eps)
        self.scheduler = CosineSchedule(self.optimizer, total_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        self.grad_clip, self.accum = cfg.grad_clip, cfg.grad_accum(1)
        self.micro = 0

    def train(self, mode: bool = True):
        self.module.train(mode)

    def forward(self, *args):
        return self.module(*args)

    def backward(self, objective: torch.Tensor) -> None:
        objective.backward()
        if self.master is not None:  # fp32 accumulation of bf16 gradients
            grads = [p.grad for p in self.params]
            for m, g in zip(self.master, grads):
                if m.grad is None:
                    m.grad = torch.zeros_like(m)
            torch._foreach_add_([m.grad for m in self.master], [g.float() for g in grads])
            for p in self.params:
                p.grad = None

    def step(self) -> torch.Tensor | None:
        """-> the gradient norm (before clipping, still on the device) at an optimizer step, else None."""
        self.micro += 1
        if self.micro % self.accum:
            return None
        trained = self.master if self.master is not None else self.params
        # max_norm=inf measures without clipping (the clip coefficient clamps to exactly 1)
        norm = torch.nn.utils.clip_grad_norm_(trained, self.grad_clip if self.grad_clip > 0 else math.inf,
                                              foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.master is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)
        return norm.detach()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        weights = self.master if self.master is not None else self.params
        names = [n for n, _ in self.module.model.named_parameters()]
        state = {"model": {n: w.detach() for n, w in zip(names, weights)}, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "client": client_state, "rng": rng_state()}
        _save(state, ckpt_dir / f"{tag}.pt")
        atomic_write_text(ckpt_dir / WORLD_FILE, "1")
        atomic_write_text(ckpt_dir / LATEST, tag)

    def load(self, ckpt_dir: Path) -> dict | None:
        tag = latest_tag(ckpt_dir)
        if tag is None:
            return None
        state = torch.load(ckpt_dir / f"{tag}.pt", map_location=self.dist.device, weights_only=True)
        names = [n for n, _ in self.module.model.named_parameters()]
        with torch.no_grad():
            for n, p in zip(names, self.params):
                p.copy_(state["model"][n])
            if self.master is not None:
                for n, m in zip(names, self.master):
                    m.copy_(state["model"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return state["client"]

    def close(self) -> None:
        pass

    def prune(self, ckpt_dir: Path, keep_tag: str) -> None:
        for f in ckpt_dir.glob("step*.pt"):
            if f.name != f"{keep_tag}.pt":
                f.unlink(missing_ok=True)

    def full_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", dtype, copy=True) for n, p in self.module.model.named_parameters()}


class DeepSpeedRunner:
    def __init__(self, reader: CheckpointReader, cfg: TrainConfig, dist: Dist, dtype: torch.dtype, total_steps: int,
                 *, train: bool = True):
        import deepspeed

        on_cuda = dist.device.type == "cuda"
        self.dist = dist
        ds_config = build_ds_config(cfg, dist.world_size, dtype, on_cuda)
        if cfg.zero_stage == 3:
            model = build_partitioned(reader, ds_config, dist.device, dist.rank)
        else:
            model = load_full_model(reader, dtype, dist.device)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.compile and train:  # the reference pass is one forward per batch: nothing to amortize
            compile_layers(model, zero3=cfg.zero_stage == 3)
        module = PolicyLoss(model, cfg.kernel_impl)
        optimizer = scheduler = None
        if train:
            optimizer = adamw(param_groups(module, cfg.weight_decay), cfg.lr, cfg.adam_betas, cfg.adam_eps)
            scheduler = CosineSchedule(optimizer, total_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
        self.module = self.engine.module
        # DeepSpeed's bf16 cast also hits buffers; RoPE frequencies stay fp32 (as HF)
        self.module.model.inv_freq = rope_inv_freq(reader.config).to(dist.device)
        # DeepSpeed averages gradients over ranks and divides the loss by the accumulation steps;
        # objectives here are shares of the global sum, so undo both.
        self.scale = dist.world_size * cfg.grad_accum(dist.world_size)

    def train(self, mode: bool = True):
        self.engine.train(mode)

    def forward(self, *args):
        return self.engine(*args)

    def backward(self, objective: torch.Tensor) -> None:
        self.engine.backward(objective * self.scale)

    def step(self) -> torch.Tensor | None:
        """-> DeepSpeed's global gradient norm of the last optimizer step (None where it keeps none)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm).detach().float().clone()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        # DeepSpeed writes the sharded model + optimizer state of every rank, the scheduler, and the
        # client state (rank 0's file); RNG streams differ per rank, so each rank adds its own file.
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        _save(rng_state(), ckpt_dir / tag / f"rng_rank{self.dist.rank}.pt")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if self.dist.is_main:
            atomic_write_text(ckpt_dir / WORLD_FILE, str(self.dist.world_size))
            atomic_write_text(ckpt_dir / LATEST, tag)

    def load(self, ckpt_dir: Path) -> dict | None:
        tag = latest_tag(ckpt_dir)
        if tag is None:
            return None
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
        set_rng_state(torch.load(ckpt_dir / tag / f"rng_rank{self.dist.rank}.pt", weights_only=True))
        return client_state

    def prune(self, ckpt_dir: Path, keep_tag: str) -> None:
        import shutil

        if self.dist.is_main:
            for d in ckpt_dir.glob("step*"):
                if d.is_dir() and d.name != keep_tag:
                    shutil.rmtree(d, ignore_errors=True)

    def close(self) -> None:
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
