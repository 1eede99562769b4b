"""Memory plan of every config in configs/: GiB per GPU for SFT, DPO and generation on nodes of 8x A100-80GB
and 8x H100-80GB, computed from the model's shape on the meta device (no weights, no GPU).

  python bench/memory_plan.py            # the table (bench/RESULTS.md holds a copy) + the 1.1B check
  python bench/memory_plan.py --detail   # also each phase's components

The formulas are engine/memory_plan.py's. A config's architecture comes from its model.init: the embedded
world's preset, the checkpoint's own config when the path exists here, else the model/config.py preset
its directory name names (_INIT_PRESETS). A phase is planned at the config's run.nodes; "fits" needs the
card's memory and, with ZeRO-Offload, 90% of the node's host memory; "fewest nodes" is the smallest count
that fits (training: global_batch must split over 8 x nodes ranks; generation runs per tensor-parallel
group inside a node, so it fits on one or not at all).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.config import TrainConfig, TrainConfigError  # noqa: E402
from engine.memory_plan import (GiB, HOST_USABLE, NODES, CONTEXT_ALLOWANCE, Node, Stage, count_params, generation_bytes,  # noqa: E402
                                host_bytes_per_node, training_bytes)
from model.config import LlamaConfig, preset  # noqa: E402

MAX_NODES = 16
# HF directory names of model.init -> the model/config.py preset of the same architecture
_INIT_PRESETS = {"llama-2-70b": "llama2-70b", "llama-2-13b": "llama2-13b", "llama-2-7b": "llama2-7b",
                 "meta-llama-3-8b": "llama3-8b", "meta-llama-3-70b": "llama3-70b", "llama-3.1-8b": "llama3.1-8b",
                 "smollm2-135m": "smollm2-135m"}
_DTYPES = {None: torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_config(cfg, where: str) -> LlamaConfig:
    init = cfg.model.init
    if init == "world":
        from loop.world import WorldConfig

        return WorldConfig.from_dict(cfg.data.world).model_config()
    if Path(init).exists():
        from model.checkpoint import open_checkpoint

        return open_checkpoint(init).config
    name = Path(init).name.lower()
    for prefix in sorted(_INIT_PRESETS, key=len, reverse=True):
        if name.startswith(prefix):
            return preset(_INIT_PRESETS[prefix])
    raise SystemExit(f"{where}: model.init={init!r} is not here and names no known preset "
                     f"({', '.join(_INIT_PRESETS)})")


def train_stage(c: LlamaConfig, cfg: TrainConfig, kind: str, nodes: int, gpus: int) -> Stage | None:
    world = nodes * gpus
    if nodes == 1:  # a small global batch (the CPU configs) uses only the GPUs it splits over
        world = max(g for g in range(1, gpus + 1) if cfg.global_batch % g == 0)
    try:
        run = cfg.for_world(world)
    except TrainConfigError:
        return None  # global_batch does not split over this many ranks
    seq = min(cfg.max_seq_len or c.max_seq_len, c.max_seq_len)
    seq = -(-seq // 8) * 8  # pad_to_multiple 8 on CUDA
    # engine/data.collate_pairs: a DPO micro-batch of n pairs is 2n rows (chosen then rejected)
    return Stage(run, world, seq, run.micro_batch * (2 if kind == "dpo" else 1))


def train_fit(c, counts, cfg, kind, nodes, node: Node):
    stage = train_stage(c, cfg, kind, nodes, node.gpus)
    if stage is None:
        return None, False, None
    parts = training_bytes(c, counts, stage)
    gpu = sum(parts.values())
    host = host_bytes_per_node(counts, stage, node.gpus)
    return parts, gpu <= node.gpu_bytes and host <= HOST_USABLE * node.host_bytes, host


def plan_config(path: Path) -> list[dict]:
    from loop.config import load_config
    from common.errors import ConfigError

    try:
        cfg = load_config(path)
    except ConfigError as e:  # the loop's own one-line message, naming the file and key
        raise SystemExit(str(e)) from None
    c = model_config(cfg, str(path))
    counts = count_params(c)
    rows = []
    for kind in ("sft", "dpo"):
        tcfg = getattr(cfg, kind)
        row = dict(config=path.stem, phase=f"{kind} train", params=counts.total, fits={}, fewest={}, host={})
        for node in NODES:
            parts, ok, host = train_fit(c, counts, tcfg, kind, cfg.run.nodes, node)
            if parts is None:
                raise SystemExit(f"{path}: {kind}.global_batch={tcfg.global_batch} does not split over "
                                 f"run.nodes={cfg.run.nodes} x {node.gpus} ranks")
            row["parts"], row["fits"][node.name], row["host"][node.name] = parts, ok, host
            row["fewest"][node.name] = next((n for n in range(1, MAX_NODES + 1)
                                             if train_fit(c, counts, tcfg, kind, n, node)[1]), None)
        stage = train_stage(c, tcfg, kind, cfg.run.nodes, NODES[0].gpus)
        row["note"] = (f"ZeRO-{tcfg.zero_stage}{' + offload' if tcfg.offload_optimizer else ''}"
                       f"{' + grad ckpt' if tcfg.gradient_checkpointing else ''}, micro {stage.cfg.micro_batch}"
                       f" ({stage.rows} rows) x {stage.seq_len}, {stage.world} ranks")
        rows.append(row)
    tp = cfg.model.tensor_parallel
    dtype = _DTYPES[cfg.model.dtype]
    gen = lambda t: generation_bytes(c, t, cfg.model.max_num_seqs, cfg.model.max_batched_tokens, dtype)
    parts = gen(tp)
    row = dict(config=path.stem, phase="generation", params=counts.total, parts=parts, host={},
               fits={n.name: sum(parts.values()) <= n.gpu_bytes for n in NODES})
    row["fewest"] = {n: 1 if ok else None for n, ok in row["fits"].items()}
    smallest = {n.name: next((t for t in (1, 2, 4, 8) if _tp_ok(c, t) and sum(gen(t).values()) <= n.gpu_bytes), None)
                for n in NODES}
    row["note"] = (f"TP={tp}, {cfg.model.max_num_seqs} seqs x {c.max_seq_len} ctx, "
                   f"{str(dtype).split('.')[-1]}; smallest TP that fits: {smallest[NODES[0].name] or '>8'}")
    rows.append(row)
    return rows


def _tp_ok(c: LlamaConfig, tp: int) -> bool:
    from engine.sampler.tensor_parallel import plan_tp

    try:
        plan_tp(c, 0, tp)
        return True
    except ValueError:
        return False


def check_1p1b() -> tuple[float, float]:
    """bench/train_step.py --device cuda: TinyLlama shape, TorchRunner (bf16 + fp32 master/AdamW), micro 4
    x 2048, no checkpointing, no dropout; peak 32.8 GiB (torch.cuda.max_memory_allocated, bench/RESULTS.md)."""
    from bench.train_step import GPU_MODEL

    cfg = TrainConfig(global_batch=8, micro_batch=4, dropout=0.0, backend="torch")
    parts = training_bytes(GPU_MODEL, count_params(GPU_MODEL), Stage(cfg, 1, 2048, 4))
    return (sum(parts.values()) - CONTEXT_ALLOWANCE) / GiB, 32.8


def gib(b: int) -> str:
    return f"{b / GiB:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=None, help="config files (default: configs/*.yaml)")
    parser.add_argument("--detail", action="store_true", help="print each phase's components")
    args = parser.parse_args()
    paths = [Path(p) for p in args.configs] if args.configs else sorted((ROOT / "configs").glob("*.yaml"))
    rows = [r for p in paths for r in plan_config(p)]
    a, h = (n.name for n in NODES)
    print(f"| config | params | phase | GiB per GPU | fits {a}? | fits {h}? | fewest nodes ({a} / {h}) | setting |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        yes = lambda n: ("yes" if r["fits"][n] else "NO") + (f" (host {gib(r['host'][n])} GiB/node)"
                                                           if r["host"].get(n) and "offload" in r["note"] else "")
        few = " / ".join(str(r["fewest"][n] or f">{MAX_NODES}") for n in (a, h))
        print(f"| {r['config']} | {r['params'] / 1e9:.2f}B | {r['phase']} | {gib(sum(r['parts'].values()))} | "
              f"{yes(a)} | {yes(h)} | {few} | {r['note']} |")
    if args.detail:
        for r in rows:
            print(f"\n{r['config']} {r['phase']}: " + ", ".join(f"{k} {gib(v)}" for k, v in r["parts"].items()))
    plan, measured = check_1p1b()
    print(f"\n1.1B single-GPU check (bench/train_step.py setting, without the {gib(CONTEXT_ALLOWANCE)} GiB context "
          f"allowance): plan {plan:.1f} GiB vs measured {measured} GiB = {plan / measured:.3f}x")


if __name__ == "__main__":
    main()
