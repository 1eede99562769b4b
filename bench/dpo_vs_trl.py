"""DPO training side by side: engine.trainer.train_dpo against TRL's DPOTrainer (issue #17).

  python bench/dpo_vs_trl.py --trl-python /work/trl-venv/bin/python            # the measurement
  python bench/dpo_vs_trl.py --trl-python /work/trl-venv/bin/python --pairs 8 --steps 2   # smoke run

Both sides train the same tiny Llama (vocab 1000, dim 256, 4 layers, 4 heads, ffn 688; its parameter count
is printed) from the same HF checkpoint, which model/ writes and transformers' LlamaForCausalLM loads, on
the same synthetic preference pairs (prompt + response 119-250 tokens, fixed seed), with batch 4, max
length 256, fp32 (or --dtype bf16: ours bf16 weights with an fp32 master copy, TRL bf16 autocast over fp32
weights, each side's own mixed precision), sigmoid DPO at beta 0.1, a constant lr, no dropout,
activation checkpointing as --checkpointing says (off on both sides by default; TRL's own default is on),
batch lengths padded to a multiple of --pad-multiple on both sides (default: neither pads on CPU),
each side's own precomputed reference log-probs, and N threads, each in its own process so neither sees the other's allocator.
oneDNN's per-shape primitive caches: ours bounded by `import engine` (engine/cpu_caches.py), TRL at the
library's 1,024 entries, or at our bound with --same-caches (the line "oneDNN caches" says which ran).
TRL runs under its own venv (it would move the versions this project's suite pins); its process imports
only torch, transformers, trl and datasets (bench/trl_side.py). Each side is left at its defaults
otherwise, as a user would run it: ours groups pairs of similar length, TRL samples at random.

Measured (bench/trl_side.py's TrainingProbe, the same on both sides): tokens/s = non-pad tokens of
prompt+chosen and prompt+rejected over the wall time from just before the first step to the end of the
last (model build and reference pass excluded); memory = peak RSS during those steps (VmHWM, reset at the
start through /proc/self/clear_refs) and its growth over the RSS at the start. The reference log-probs
of both sides are compared as a check that they train the same model on the same tokens.
Prints one table; writes nothing else but `--out` JSON (the checkpoint and pairs go to a temp folder).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The cache capacities the user exported, read before `import engine` below exports its own bound into this
# process's environment, which the children inherit: TRL gets the user's values, or the library default.
EXPORTED = {k: os.environ[k] for k in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY") if k in os.environ}

from bench.trl_side import BOS, EOS, TrainingProbe, cache_capacities, real_tokens, write_json  # noqa: E402
from engine.cpu_caches import CAPACITY, KEYS  # noqa: E402  (no torch import through it)

assert set(EXPORTED) <= set(KEYS)

VOCAB, DIM, LAYERS, HEADS, FFN, MAX_LEN = 1000, 256, 4, 4, 688, 256
MIN_PAIR, MAX_PAIR = 119, 250  # prompt + longer response, tokens
# Inherited from a launcher, these would make the trainer join a process group that is not there.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """n pairs: BOS + prompt, responses ending in EOS, prompt + longer response in [MIN_PAIR, MAX_PAIR]."""
    rng = random.Random(seed)
    body = lambda k: [rng.randrange(EOS + 1, VOCAB) for _ in range(k)]  # noqa: E731
    pairs = []
    for i in range(n):
        total = rng.randint(MIN_PAIR, MAX_PAIR)
        prompt = rng.randint(16, 64)
        longer, shorter = total - prompt, rng.randint(8, total - prompt)
        chosen, rejected = (longer, shorter) if rng.random() < 0.5 else (shorter, longer)
        pairs.append({"id": f"p{i}", "prompt_ids": [BOS] + body(prompt - 1),
                      "chosen_ids": body(chosen - 1) + [EOS], "rejected_ids": body(rejected - 1) + [EOS]})
    return pairs


def write_model(directory: Path, seed: int) -> int:
    """The tiny Llama as an HF checkpoint; -> its parameter count."""
    import torch

    from model.checkpoint import save_pretrained
    from model.config import LlamaConfig
    from model.llama import Llama

    config = LlamaConfig(vocab_size=VOCAB, dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=HEADS,
                         ffn_dim=FFN, max_seq_len=MAX_LEN)
    model = Llama(config).init_weights(0.02, torch.Generator().manual_seed(seed))
    save_pretrained(model, directory)
    return sum(p.numel() for p in model.parameters())


# --- our side (a child process: python bench/dpo_vs_trl.py --side ours --work DIR) -----------------
def run_ours(work: Path) -> dict:
    settings = json.loads((work / "settings.json").read_text())
    pairs = json.loads((work / "pairs.json").read_text())
    import torch
    torch.set_num_threads(settings["threads"])
    from engine.config import DPOConfig, DPOObjectiveConfig
    from engine.data import PreferencePair
    from engine.metrics_log import StageMetrics
    from engine.trainer import compute_reference_logprobs, train_dpo

    probe = TrainingProbe()

    class StartProbe(StageMetrics):
        """The trainer calls begin() once its model and optimizer are built, right before the first step."""

        def __init__(self):
            super().__init__(sink=None, name="dpo")

        def begin(self, from_step: int = 0) -> None:
            probe.start()

        def step(self, record: dict) -> None:
            pass

        def summary(self, summary: dict) -> None:
            pass

    def on_step(done: int) -> None:
        if done == settings["steps"]:
            probe.stop()

    cfg = DPOConfig(lr=settings["lr"], min_lr=settings["lr"], warmup_steps=0, max_steps=settings["steps"],
                    epochs=settings["steps"] * settings["batch"] // len(pairs), global_batch=settings["batch"],
                    micro_batch=settings["batch"], grad_clip=1.0, weight_decay=0.0, dtype=settings["dtype"],
                    dropout=0.0,
                    seed=settings["seed"], checkpoint_every=0, max_seq_len=settings["max_len"], backend="torch",
                    gradient_checkpointing=settings["checkpointing"] in ("ours", "both"),
                    ref_micro_batch=settings["batch"],  # TRL: precompute at train batch
                    pad_to_multiple=settings.get("pad_multiple") or 0,  # 0: the trainer's own default
                    objective=DPOObjectiveConfig(beta=settings["beta"], loss_type="sigmoid"))
    data = [PreferencePair(p["id"], p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in pairs]
    data = compute_reference_logprobs(work / "m0", data, cfg)
    result = train_dpo(work / "m0", data, cfg, work / "ours_out", resume=False, on_step=on_step, sink=StartProbe())
    return {"side": "ours", **probe.result(real_tokens(pairs, cfg.epochs)),
            "final_loss": sum(result.losses) / len(result.losses),
            "reference": {p.id: [p.ref_chosen, p.ref_rejected] for p in data},
            "versions": {"torch": torch.__version__}, "threads": torch.get_num_threads(),
            "caches": cache_capacities(settings)}


# --- the parent -----------------------------------------------------------------------------------
def child_env(name: str, work: Path, threads: int, caches: dict | None = None) -> dict:
    """A side's environment; caches: its oneDNN cache capacities (None: inherit this process's)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and (caches is None or k not in KEYS)}
    env.update(caches or {})
    hf = work / f"hf_{name}"  # caches (datasets, hub) stay inside the temp folder; nothing is downloaded
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HOME=str(hf),
               HF_DATASETS_CACHE=str(hf / "datasets"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TQDM_DISABLE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    return env


def run_child(name: str, command: list[str], work: Path, threads: int, caches: dict | None = None) -> dict:
    env = child_env(name, work, threads, caches)
    log = work / f"{name}.log"
    with log.open("w") as f:
        rc = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text().splitlines()[-25:]
        raise SystemExit(f"dpo_vs_trl: the {name} side exited with {rc}; last lines of its log:\n" + "\n".join(tail))
    return json.loads((work / f"result_{name}.json").read_text())


def check_trl_python(python: str) -> None:
    """Fail in one line, before any work, when --trl-python cannot run TRL."""
    try:
        probe = subprocess.run([python, "-c", "import trl, transformers, datasets, torch"], capture_output=True)
    except OSError as e:
        raise SystemExit(f"dpo_vs_trl: --trl-python {python}: {e.strerror}") from None
    if probe.returncode != 0:
        raise SystemExit(f"dpo_vs_trl: --trl-python {python} cannot import trl, transformers, datasets and torch "
                         "(make a venv with them: python3 -m venv /work/trl-venv; /work/trl-venv/bin/pip install "
                         "torch trl transformers)")


def compare_reference(ours: dict, trl: dict) -> float:
    """Largest |difference| between the two sides' reference log-probs of the same pair and side."""
    if set(ours) != set(trl):
        raise SystemExit("dpo_vs_trl: the two sides computed reference log-probs for different pairs")
    return max(abs(a - b) for k in ours for a, b in zip(ours[k], trl[k]))


def table(report: dict) -> str:
    o, t = report["ours"], report["trl"]
    rows = [("", "ours", "TRL", "ours/TRL"),
            ("tokens/s", f"{o['tokens_per_s']:.0f}", f"{t['tokens_per_s']:.0f}",
             f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x"),
            ("training seconds", f"{o['seconds']:.2f}", f"{t['seconds']:.2f}", ""),
            ("RSS before step 1 (MB)", f"{o['rss_before_mb']:.0f}", f"{t['rss_before_mb']:.0f}", ""),
            ("peak RSS in training (MB)", f"{o['peak_rss_mb']:.0f}", f"{t['peak_rss_mb']:.0f}",
             f"{o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x"),
            ("RSS growth in training (MB)", f"{o['growth_mb']:.0f}", f"{t['growth_mb']:.0f}",
             f"{o['growth_mb'] / t['growth_mb']:.2f}x" if t["growth_mb"] > 0 else "-"),
            ("mean loss", f"{o['final_loss']:.4f}", f"{t['final_loss']:.4f}", "")]
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width))) for r in rows]
    s = report["setup"]
    v = t["versions"]
    return "\n".join([
        f"DPO: {s['params']:,} params (vocab {VOCAB}, dim {DIM}, {LAYERS} layers, {HEADS} heads, ffn {FFN}), "
        f"{s['pairs']} pairs of {s['min_pair_len']}-{s['max_pair_len']} tokens, {s['steps']} steps of {s['batch']}, "
        f"{s['tokens']:,} tokens, {s['dtype']}, {s['threads']} threads, activation checkpointing: {s['checkpointing']}, "
        f"pad multiple: {s.get('pad_multiple') or 'default'}",
        *lines,
        f"reference log-probs, max |ours - TRL| = {report['reference_max_abs_diff']:.2e}",
        f"versions: ours torch {o['versions']['torch']}; TRL side torch {v['torch']}, transformers "
        f"{v['transformers']}, trl {v['trl']}, datasets {v['datasets']} (attention: {t['attn_implementation']})",
        f"optimizer: ours AdamW (foreach), TRL {t['optimizer']}",
        f"oneDNN caches (entries): ours {caches(o)}, TRL {caches(t)}"])


def caches(side: dict) -> str:
    values = sorted(set(side["caches"].values()))
    return "1024 (library default)" if values == ["default"] else "/".join(values)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=64, help="synthetic preference pairs")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (0 = one epoch); a whole number of epochs")
    ap.add_argument("--batch", type=int, default=4, help="pairs per optimizer step, both sides")
    ap.add_argument("--lr", type=float, default=1e-5, help="constant learning rate, both sides")
    ap.add_argument("--beta", type=float, default=0.1, help="sigmoid DPO beta, both sides")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per side")
    ap.add_argument("--seed", type=int, default=0, help="weights, pairs and data order")
    ap.add_argument("--checkpointing", choices=("none", "ours", "both"), default="none",
                    help="activation checkpointing: off on both sides, on ours only, or on both (TRL's own default)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="training precision, both sides")
    ap.add_argument("--pad-multiple", type=int, default=0,
                    help="pad every batch's length to a multiple of N, both sides (0: each side's default, no padding "
                         "on CPU); fewer distinct shapes let the allocator reuse freed blocks")
    ap.add_argument("--same-caches", action="store_true",
                    help=f"run TRL with the oneDNN cache bound ours sets itself ({CAPACITY} entries) instead of "
                         "the library default")
    ap.add_argument("--trl-python", default=sys.executable, help="python of the venv where trl is installed")
    ap.add_argument("--out", type=Path, help="also write the report as JSON here")
    ap.add_argument("--side", choices=("ours",), help=argparse.SUPPRESS)  # internal: run one side's child
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side == "ours":
        write_json(args.work / "result_ours.json", run_ours(args.work))
        return
    steps = args.steps or args.pairs // args.batch
    if args.pairs < args.batch or steps <= 0 or (steps * args.batch) % args.pairs:
        ap.error(f"--steps {steps} x --batch {args.batch} must be a whole number of epochs over --pairs {args.pairs}")
    check_trl_python(args.trl_python)
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl.") as tmp:
        work = Path(tmp)
        params = write_model(work / "m0", args.seed)
        pairs = synthetic_pairs(args.pairs, args.seed)
        settings = {"batch": args.batch, "steps": steps, "lr": args.lr, "beta": args.beta, "threads": args.threads,
                    "seed": args.seed, "max_len": MAX_LEN, "vocab_size": VOCAB, "checkpointing": args.checkpointing,
                    "dtype": args.dtype, "pad_multiple": args.pad_multiple, "cache_keys": list(KEYS)}
        write_json(work / "settings.json", settings)
        write_json(work / "pairs.json", pairs)
        ours = run_child("ours", [sys.executable, str(Path(__file__).resolve()), "--side", "ours", "--work", tmp],
                         work, args.threads)
        trl = run_child("trl", [args.trl_python, str(ROOT / "bench" / "trl_side.py"), "--work", tmp],
                        work, args.threads, {k: str(CAPACITY) for k in KEYS} if args.same_caches else EXPORTED)
    lengths = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
    report = {"setup": {**settings, "params": params, "pairs": len(pairs), "min_pair_len": min(lengths),
                        "max_pair_len": max(lengths), "tokens": ours["tokens"]},
              "reference_max_abs_diff": compare_reference(ours.pop("reference"), trl.pop("reference")),
              "ours": ours, "trl": trl}
    print(table(report))
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
