"""Training-step benchmark: SFT and DPO tokens/s and MFU, and ZeRO-3 per-rank memory.

  python bench/train_step.py                 # CPU: tiny model steps + ZeRO-3 memory on 2 ranks vs 1
  python bench/train_step.py --device cuda   # GPU: a ~1.1B Llama, bf16, one process, plain torch runner,
                                             # torch.compile per decoder layer (--no-compile: eager)

The GPU path runs without DeepSpeed (the GPU box has none): the engine's TorchRunner (bf16 weights,
fp32 master + AdamW, fp32 gradient accumulation) with exactly the trainer's loss code. Every speed is
reported next to a baseline measured in the same run: the same step with full [tokens, V] logits and
log_softmax. Loss paths: "fused objective" (kernels.sequence_objective, the trainer's default: logits
once, gradients in forward), "log-prob op" (kernels.sequence_logprobs + autograd: the backward recomputes
the logits), "full-logits baseline".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.config import TrainConfig  # noqa: E402
from engine.data import PreferencePair, SFTExample, collate_pairs, collate_sft  # noqa: E402
from engine.distributed import init_distributed  # noqa: E402
from engine.metrics import format_mfu, mfu, peak_flops  # noqa: E402
from engine.objectives import DPOObjective, SFTObjective  # noqa: E402
from model.config import LlamaConfig, preset  # noqa: E402
from model.llama import Llama  # noqa: E402
from model.weight_loading import CheckpointReader  # noqa: E402

# TinyLlama-1.1B's shape: 1.10e9 parameters.
GPU_MODEL = LlamaConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                        max_seq_len=2048)


def memory_reader(config: LlamaConfig, device) -> CheckpointReader:
    """A reader over a freshly initialized model, so the bench needs no checkpoint on disk."""
    model = Llama(config).to(device)
    model.init_weights(0.02, torch.Generator(device=device).manual_seed(0))
    state = {n: p.detach() for n, p in model.named_parameters()}
    return CheckpointReader(config, state.__getitem__, lambda n: ("memory", n))


def make_batches(kind: str, cfg: TrainConfig, vocab: int, seq_len: int, prompt_len: int, device, pad_multiple):
    """One global batch of micro-batches (same shapes every step: steady-state timing)."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    out = []
    for _ in range(cfg.grad_accum(1)):
        if kind == "sft":
            items = [SFTExample(ids(prompt_len), ids(seq_len - prompt_len)) for _ in range(cfg.micro_batch)]
            out.append(collate_sft(items, max_len=seq_len, pad_multiple=pad_multiple, device=device))
        else:
            items = [PreferencePair(str(i), ids(prompt_len), ids(seq_len - prompt_len), ids(seq_len - prompt_len),
                                    -50.0, -60.0) for i in range(cfg.micro_batch)]
            b = collate_pairs(items, max_len=seq_len, pad_multiple=pad_multiple, device=device)
            b["num_pairs"] = len(items)
            out.append(b)
    return out


def naive_logps(model, b):
    """Baseline: full logits, log_softmax, gather (what the fused op replaces)."""
    logits = F.linear(model(b["input_ids"], return_hidden=True), model.output_weight).float()
    token = torch.log_softmax(logits, -1).gather(-1, b["targets"][..., None])[..., 0] * b["mask"]
    return token.sum(1), b["mask"].sum(1).float()


def time_steps(runner, kind, batches, cfg, steps, warmup, path="fused objective"):
    """Seconds per optimizer step and tokens per step (real tokens)."""
    # the trainer's objectives (engine/objectives.py); DPO at the paper's defaults (sigmoid, beta 0.1)
    objective = SFTObjective() if kind == "sft" else DPOObjective()
    norm = sum(b["num_tokens"] for b in batches) if kind == "sft" else cfg.global_batch

    def one_step():
        for b in batches:
            inputs = (b["input_ids"], b["targets"], b["mask"])
            if path == "fused objective":
                value = runner.forward(*inputs, *objective.chunk(b, norm))[0]
            else:
                logp_sum, count = (runner.forward(*inputs) if path == "log-prob op"
                                   else naive_logps(runner.module.model, b))
                value = objective.loss(b, logp_sum, count, norm)
            runner.backward(value)
            runner.step()

    sync = torch.cuda.synchronize if torch.cuda.is_available() and batches[0]["input_ids"].is_cuda else (lambda: None)
    for _ in range(warmup):
        one_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    return (time.perf_counter() - t0) / steps, sum(b["real_tokens"] for b in batches)


def bench_steps(device: str, config: LlamaConfig, cfg: TrainConfig, seq_len: int, prompt_len: int, steps: int,
                warmup: int, dtype: torch.dtype, baseline: bool) -> list[dict]:
    from engine.train_backends import TorchRunner

    dist = init_distributed(use_deepspeed=False)
    runner = TorchRunner(memory_reader(config, dist.device), cfg, dist, dtype, total_steps=10_000)
    runner.train(True)
    peak = peak_flops(dist.device)
    rows = []
    for kind in ("sft", "dpo"):
        # a DPO micro-batch of n pairs is 2n rows: halve n so both stages move the same tokens per step
        kind_cfg = cfg if kind == "sft" else cfg.replace(micro_batch=max(1, cfg.micro_batch // 2),
                                                          global_batch=max(1, cfg.global_batch // 2))
        batches = make_batches(kind, kind_cfg, config.vocab_size, seq_len, prompt_len, dist.device,
                               8 if device == "cuda" else 1)
        variants = ["fused objective", "log-prob op"] + (["full-logits baseline"] if baseline else [])
        for name in variants:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                dt, tokens = time_steps(runner, kind, batches, kind_cfg, steps, warmup, name)
            except torch.OutOfMemoryError:
                rows.append(dict(kind=kind, variant=name, error="out of memory"))
                torch.cuda.empty_cache()
                continue
            rate = tokens / dt
            rows.append(dict(kind=kind, variant=name, step_s=dt, tokens_per_s=rate,
                             mfu=mfu(rate, config, seq_len, peak),
                             peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None))
            print(f"  {kind} {name}: {dt * 1e3:.1f} ms/step, {rate:,.0f} tokens/s, MFU {format_mfu(rows[-1]['mfu'])}",
                  flush=True)
    return rows


# --- ZeRO-3 memory: 2 ranks vs 1 (CPU, gloo) ---------------------------------------------------------
def memory_worker(model_dir: str, out: str) -> None:
    """Under torchrun: build the DeepSpeed runner, take one step, report this rank's state bytes."""
    from engine.train_backends import DeepSpeedRunner
    from engine.zero3 import open_init

    dist = init_distributed(use_deepspeed=True)
    cfg = TrainConfig(global_batch=2 * dist.world_size, micro_batch=2, dropout=0.0, backend="deepspeed")
    runner = DeepSpeedRunner(open_init(model_dir, 0.0), cfg, dist, torch.float32, total_steps=10)
    runner.train(True)
    b = make_batches("sft", cfg.replace(global_batch=2), runner.module.model.config.vocab_size, 64, 16, dist.device, 1)[0]
    logp_sum, count = runner.forward(b["input_ids"], b["targets"], b["mask"])
    runner.backward(SFTObjective().loss(b, logp_sum, count, b["num_tokens"] * dist.world_size))
    runner.step()
    params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in runner.module.parameters())
    zero_opt = runner.engine.optimizer
    master = sum(t.numel() * t.element_size() for t in zero_opt.fp32_partitioned_groups_flat)
    adam = sum(v.numel() * v.element_size() for s in zero_opt.optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)
    Path(f"{out}.rank{dist.rank}").write_text(json.dumps(dict(params=params, master=master, adam=adam)))


def memory_bench() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        from model.checkpoint import save_pretrained

        config = preset("tiny")
        save_pretrained(Llama(config).init_weights(0.02, torch.Generator().manual_seed(0)), Path(tmp) / "m")
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
        totals = {}
        for world in (1, 2):
            out = Path(tmp) / f"mem{world}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   __file__, "--memory-worker", str(Path(tmp) / "m"), str(out)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise RuntimeError(f"memory worker (world {world}) failed:\n{done.stderr[-2000:]}")
            per_rank = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]
            totals[world] = max(sum(r.values()) for r in per_rank)
            print(f"  world {world}: per-rank bytes {per_rank}", flush=True)
    return [dict(params=config.num_params(), one_rank=totals[1], two_ranks=totals[2], ratio=totals[2] / totals[1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default 3 CPU, 5 GPU)")
    parser.add_argument("--no-compile", action="store_true",
                        help="GPU: eager layers (default: torch.compile each decoder layer, ~10 s)")
    parser.add_argument("--micro-batch", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the 2-rank ZeRO-3 memory measurement")
    parser.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(*args.memory_worker)
        return
    t0 = time.perf_counter()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench/train_step.py: --device cuda but no CUDA device is visible")
        os.environ["DS_ACCELERATOR"] = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True
        config, seq_len, prompt_len = GPU_MODEL, 2048, 256
        micro = args.micro_batch or 4
        cfg = TrainConfig(global_batch=2 * micro, micro_batch=micro, dropout=0.0, backend="torch",
                          compile=not args.no_compile, lr=1e-5, min_lr=1e-6)
        print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | plain torch runner "
              f"(DeepSpeed not used on the GPU path) | bf16 weights, fp32 master + AdamW | "
              f"{'torch.compile per layer' if cfg.compile else 'eager'} | "
              f"{config.num_params() / 1e9:.2f}B params, seq {seq_len}, micro {micro} x accum 2", flush=True)
        rows = bench_steps("cuda", config, cfg, seq_len, prompt_len, args.steps or 5, 2, torch.bfloat16,
                           baseline=True)
        mem = []
    else:
        config, seq_len, prompt_len = preset("tiny"), 256, 64
        cfg = TrainConfig(global_batch=8, micro_batch=4, dropout=0.0, backend="torch")
        print(f"CPU: tiny preset ({config.num_params() / 1e6:.1f}M params), seq {seq_len}, fp32, "
              f"plain torch runner, {torch.get_num_threads()} threads", flush=True)
        rows = bench_steps("cpu", config, cfg, seq_len, prompt_len, args.steps or 3, 1, torch.float32, baseline=True)
        mem = [] if args.no_memory else memory_bench()

    print()
    print("| stage | loss path | ms/step | tokens/s | MFU | vs full-logits baseline | peak memory |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["kind"], r.get("variant")): r for r in rows}
    for r in rows:
        if "error" in r:
            continue
        base = by.get((r["kind"], "full-logits baseline"))
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and "tokens_per_s" in base else "-"
        print(f"| {r['kind']} | {r['variant']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{format_mfu(r['mfu'])} | {speedup} | "
              f"{'-' if r['peak_gib'] is None else format(r['peak_gib'], '.1f') + ' GiB'} |")
    for r in rows:
        if "error" in r:
            print(f"| {r['kind']} | {r['variant']} | - | - | - | {r['error']} | |")
    for m in mem:
        print(f"| ZeRO-3 per-rank params+optimizer state (tiny, fp32) | 1 rank {m['one_rank'] / 2**20:.1f} MiB | "
              f"2 ranks {m['two_ranks'] / 2**20:.1f} MiB | ratio {m['ratio']:.3f} (target <= 0.55) | | | |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
