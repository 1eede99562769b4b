"""TRL's side of bench/dpo_vs_trl.py, and the training probe both sides share.

Run by dpo_vs_trl.py as a script under the TRL venv (`--trl-python`): it imports only the standard
library, torch, transformers, trl and datasets (the project's own code never runs in this process), reads
the pairs, weights and settings the parent wrote into `--work`, trains TRL's DPOTrainer and writes
`--work`/result_trl.json. The probe (TrainingProbe) is stdlib-only so that the project's side imports
it from here and both sides measure the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

RSS_FIELDS = ("VmRSS", "VmHWM")


def _status_kib() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in RSS_FIELDS}


class TrainingProbe:
    """Wall time and memory growth from just before the first optimizer step to the end of the last.

    Memory: Linux's peak-RSS counter (VmHWM) is reset at start() by writing 5 to /proc/self/clear_refs,
    so VmHWM read at stop() is the peak RSS of the training steps alone, with nothing sampled (a sampler
    thread would miss short peaks and steal a core from the 2 the run has). Growth = that peak minus the
    RSS at start(): model, optimizer object and reference pass are already resident then; AdamW's state
    is allocated lazily in the first step on both sides, so it counts as growth on both."""

    def __init__(self):
        self.t0 = self.t1 = None
        self.rss_before = self.peak = None

    def start(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        self.rss_before = _status_kib()["VmRSS"]
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        self.t1 = time.perf_counter()
        self.peak = _status_kib()["VmHWM"]

    def result(self, tokens: int) -> dict:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("training probe: start() or stop() was never called (the trainer's hooks did not fire)")
        seconds = self.t1 - self.t0
        return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                "rss_before_mb": self.rss_before / 1024, "peak_rss_mb": self.peak / 1024,
                "growth_mb": (self.peak - self.rss_before) / 1024}


def real_tokens(pairs: list[dict], epochs: int) -> int:
    """Non-pad tokens the training forwards see: prompt+chosen and prompt+rejected of every pair."""
    return epochs * sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def cache_capacities(settings: dict) -> dict:
    """The oneDNN primitive-cache capacities this process runs with (unset: the library's 1,024)."""
    return {k: os.environ.get(k, "default") for k in settings["cache_keys"]}


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# --- TRL --------------------------------------------------------------------------------------------
PAD, BOS, EOS = 0, 1, 2
SPECIAL = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}


def word(i: int) -> str:
    return SPECIAL.get(i, f"t{i}")


def tokenizer_json(vocab_size: int) -> dict:
    """A word-level tokenizer whose text "t5 t17 </s>" is the ids [5, 17, 2]: the shared pairs become the
    text dataset DPOTrainer takes, and its own tokenization gives back exactly the parent's ids (checked)."""
    vocab = {word(i): i for i in range(vocab_size)}
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in SPECIAL.items()]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": SPECIAL[PAD]}}


def text(ids: list[int], lead: str = "") -> str:
    return lead + " ".join(word(i) for i in ids)


def run_trl(work: Path) -> dict:
    settings = json.loads((work / "settings.json").read_text())
    pairs = json.loads((work / "pairs.json").read_text())
    import torch
    torch.set_num_threads(settings["threads"])
    import datasets
    import transformers
    import trl
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok_file = work / "trl_tokenizer.json"
    tok_file.write_text(json.dumps(tokenizer_json(settings["vocab_size"])))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), pad_token=SPECIAL[PAD],
                                        bos_token=SPECIAL[BOS], eos_token=SPECIAL[EOS])
    # Completions start with a space so that prompt + completion splits on the same word boundary, and end
    # with </s> so that DPOTrainer adds no EOS of its own: both sides train on the same token ids.
    dataset = datasets.Dataset.from_dict({
        "id": [p["id"] for p in pairs],
        "prompt": [text(p["prompt_ids"]) for p in pairs],
        "chosen": [text(p["chosen_ids"], " ") for p in pairs],
        "rejected": [text(p["rejected_ids"], " ") for p in pairs]})
    model = LlamaForCausalLM.from_pretrained(work / "m0", dtype=torch.float32)
    # transformers 5 renamed gradient checkpointing (TRL turns it on by default): set under either name.
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    want_checkpointing = settings.get("checkpointing") == "both"
    checkpointing_arg = {"activation_checkpointing" if "activation_checkpointing" in fields
                        else "gradient_checkpointing": want_checkpointing}
    args = DPOConfig(
        output_dir=str(work / "trl_out"), per_device_train_batch_size=settings["batch"],
        gradient_accumulation_steps=1, max_steps=settings["steps"], learning_rate=settings["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=settings["beta"], loss_type=["sigmoid"], max_length=settings["max_len"],
        precompute_ref_log_probs=True, padding_free=False, **checkpointing_arg,
        pad_to_multiple_of=settings.get("pad_multiple") or "auto",
        bf16=settings.get("dtype") == "bf16", fp16=False, use_cpu=True, report_to="none", save_strategy="no",
        dataloader_num_workers=0, seed=settings["seed"], disable_tqdm=True)
    probe = TrainingProbe()

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            probe.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == settings["steps"]:
                probe.stop()

    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Probe()])
    seen = trainer.train_dataset
    by_id = {p["id"]: p for p in pairs}
    for row in seen:
        want = by_id[row["id"]]
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if row[key] != want[key]:
                raise SystemExit(f"trl side: pair {row['id']}: DPOTrainer tokenized {key} differently from "
                                 "the shared pairs file")
    if len(seen) != len(pairs):
        raise SystemExit(f"trl side: DPOTrainer kept {len(seen)} of {len(pairs)} pairs")
    reference = {row["id"]: [row["ref_chosen_logps"], row["ref_rejected_logps"]] for row in seen}
    output = trainer.train()
    checkpointing = getattr(trainer.model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = trainer.model.is_gradient_checkpointing
    if bool(checkpointing) != want_checkpointing:
        raise SystemExit("trl side: DPOTrainer trained with activation checkpointing "
                         f"{'on' if checkpointing else 'off'}; the benchmark asked for "
                         f"{'on' if want_checkpointing else 'off'}")
    return {"side": "trl", **probe.result(real_tokens(pairs, settings["steps"] * settings["batch"] // len(pairs))),
            "final_loss": output.training_loss, "reference": reference,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl.__version__, "datasets": datasets.__version__},
            "threads": torch.get_num_threads(), "attn_implementation": model.config._attn_implementation,
            "caches": cache_capacities(settings), "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__ + f" ({args.optim})"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder the parent wrote (settings, pairs, m0/)")
    args = ap.parse_args(argv)
    write_json(args.work / "result_trl.json", run_trl(args.work))


if __name__ == "__main__":
    sys.exit(main())
