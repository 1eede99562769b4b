"""The one sampler a run holds at a time, and where its weights come from.

After a training stage the trained weights are handed over in memory (engine/handoff.py): each rank
keeps what its sampler needs while the trainer walks its ZeRO-3 partitions once, and the next
generation phase builds its sampler from those tensors. Only when nothing was handed over (a resumed
run, another model such as M0 for prompt generation) is the checkpoint read from disk. Before any
training stage the sampler, its KV cache and any unused hand-off are released.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from engine.distributed import Dist, log
from engine.handoff import HandedOff, HandoffRequest

DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class SamplerPhase:
    def __init__(self, model_cfg, dist: Dist, tokenizer=None):
        self.mc, self.dist, self.tok = model_cfg, dist, tokenizer
        self._sampler = None
        self._path: Path | None = None
        self._handed: tuple[Path, HandedOff] | None = None
        self.last_build: dict = {}  # how the current sampler was built: source, seconds
        self._tp = None  # engine.sampler.tensor_parallel.TPGroups, made on first use (needs the process group)

    def tp_groups(self):
        """This rank's tensor-parallel and data-parallel groups; None when model.tensor_parallel = 1."""
        if self.mc.tensor_parallel == 1:
            return None
        if self._tp is None:
            from engine.sampler.tensor_parallel import build_groups

            self._tp = build_groups(self.mc.tensor_parallel)
        return self._tp

    def _sampler_kw(self) -> dict:
        mc = self.mc
        return dict(kv_memory=mc.kv_memory, max_num_seqs=mc.max_num_seqs, max_batched_tokens=mc.max_batched_tokens)

    def request(self) -> HandoffRequest:
        """What a training stage should hand over for this rank's sampler."""
        groups = self.tp_groups()
        if groups is None:
            return HandoffRequest(dtype=DTYPES[self.mc.dtype], device=self.dist.device)
        from engine.sampler.tensor_parallel import plan_tp

        def plan(config):
            return plan_tp(config, groups.tp_rank, groups.tp_size).shard

        return HandoffRequest(dtype=DTYPES[self.mc.dtype], device=self.dist.device, plan=plan)

    def handed(self, model_dir: Path, weights: HandedOff | None) -> None:
        """Weights of model_dir taken out of training; used by the next get(model_dir)."""
        self.release()
        if weights is not None:
            self._handed = (Path(model_dir), weights)

    def get(self, model_dir: Path):
        """The sampler for model_dir, built once per phase; a different model replaces it."""
        model_dir = Path(model_dir)
        if self._path == model_dir:
            return self._sampler
        handed = self._handed if self._handed is not None and self._handed[0] == model_dir else None
        self.release()
        t0 = time.perf_counter()
        if handed is not None:
            from engine.sampler import Sampler
            from model.weight_loading import materialize

            weights = handed[1]
            if weights.sharded:
                from engine.sampler.tensor_parallel import build_tp_model

                model = build_tp_model(weights.config, self.tp_groups(), weights.tensors.pop, device=self.dist.device,
                                       sharded=True)
            else:  # the tensors already have the sampler's dtype
                model = materialize(weights.reader(), None, self.dist.device)
            model.eval()
            self._sampler = Sampler(model, tokenizer=self.tok, **self._sampler_kw())
            source = "in-memory hand-off"
        else:
            from engine.sampler import load_sampler

            self._sampler = load_sampler(model_dir, tokenizer=self.tok, dtype=DTYPES[self.mc.dtype],
                                         device=self.dist.device, tp_group=self.tp_groups(), **self._sampler_kw())
            source = "disk"
        self._path = model_dir
        self.last_build = {"model": model_dir.name, "source": source, "seconds": time.perf_counter() - t0}
        log(self.dist, f"sampler: {model_dir.name} from {source} in {self.last_build['seconds']:.2f} s")
        return self._sampler

    def release(self) -> None:
        """Drop the sampler (weights, KV cache, CUDA graphs) and any unused hand-off."""
        self._sampler = self._path = None
        self._handed = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
