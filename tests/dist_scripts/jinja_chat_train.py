"""Launched by tests/test_chat_templates.py under `torchrun --nproc_per_node=2` (gloo, CPU).

argv: workdir, holding m0/ (an HF checkpoint whose tokenizer ships a ChatML Jinja template with eos
<|endoftext|>, so its end of turn <|im_end|> is not eos) and ift.jsonl. The loop's own SFT examples
(loop.stage_train.sft_examples) train it under ZeRO-3 until it has learnt the one reply; then every
rank samples greedily through generate_distributed with the tokenizer's stop ids. Rank r writes
workdir/rank<r>.json: the examples' ids, the completions and the export's reloaded tokenizer.
"""
import json
import sys
from pathlib import Path

from engine.config import TrainConfig
from engine.distributed import barrier, init_distributed
from engine.sampler import SamplingParams, generate_distributed, load_sampler
from engine.trainer import train_sft
from loop.prompts import chat_ids
from loop.stage_train import sft_examples
from model.tokenizer import load_tokenizer

workdir = Path(sys.argv[1])
dist = init_distributed(use_deepspeed=True)
tok = load_tokenizer(workdir / "m0")
examples = sft_examples(tok, workdir / "ift.jsonl", None, None)
cfg = TrainConfig(lr=1e-2, min_lr=1e-2, warmup_steps=0, epochs=24, max_steps=24, global_batch=2, micro_batch=1,
                  dropout=0.0, weight_decay=0.0, grad_clip=1.0, log_every=20, checkpoint_every=0, zero_stage=3,
                  backend="deepspeed", seed=0)
train_sft(workdir / "m0", examples, cfg, workdir / "sft", resume=False)
barrier()
exported = load_tokenizer(workdir / "sft")
sampler = load_sampler(workdir / "sft", tokenizer=exported, kv_memory=1 << 22)
prompts = [chat_ids(exported, json.loads(line)["prompt"]) for line in (workdir / "ift.jsonl").read_text().splitlines()]
params = SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=tuple(exported.stop_ids))
completions = generate_distributed(sampler, prompts, params)
(workdir / f"rank{dist.rank}.json").write_text(json.dumps({
    "examples": [[e.prompt_ids, e.response_ids] for e in examples],
    "stop_ids": list(tok.stop_ids), "exported_template": exported.chat_template,
    "exported_stop_ids": list(exported.stop_ids),
    "completions": [{"token_ids": list(c.token_ids), "text": c.text, "finish_reason": c.finish_reason}
                    for c in completions]}))
barrier()
