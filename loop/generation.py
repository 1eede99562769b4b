"""Resumable, sharded generation: the one code path every sampling stage goes through.

A stage hands over requests {"id", "ids" (prompt token ids), "seed"} and one SamplingParams
template. Requests are processed in fixed chunks of `chunk_size` (each chunk one sampler call over
all its prompts x n samples, sharded over ranks by generate_distributed); rank 0 appends each
chunk's records to the stage's JSONL with one write + fsync. Every request carries its own seed,
derived from (run seed, stage, record id), and the sampler draws each sample from its own
generator, so after a kill the resumed stage regenerates exactly the missing records: no
duplicates, no gaps, the same records an uninterrupted run writes.

A request whose prompt tokens plus max_new_tokens exceed the sampler's context is not generated:
its records go to `<out>.skipped.jsonl` ({"id", "request_id", "skipped": reason}) beside out_path,
never to out_path, and the stage's summary counts them (loop/stage_dir.py). Which requests are skipped
is a pure function of the prompts, the params and the model, so a resumed stage skips the same ones.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch.distributed as torch_dist
from tqdm import tqdm

from engine.distributed import Dist, barrier
from engine.sampler import SamplingParams, generate_distributed

from .records import JsonlAppender, read_jsonl, write_jsonl

SKIPPED_SUFFIX = ".skipped.jsonl"


def broadcast_object(obj, dist: Dist):
    if dist.world_size == 1 or not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def sample_id(request_id: str, sample_index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}-s{sample_index}"


def skipped_path(out_path: Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name.removesuffix(".jsonl") + SKIPPED_SUFFIX)


def read_skipped(out_path: Path) -> list[dict]:
    """The records generate_records skipped for out_path (over-long requests); [] when none."""
    path = skipped_path(out_path)
    return read_jsonl(path, ("id", "request_id", "skipped")) if path.exists() else []


def context_length(sampler) -> int:
    config = getattr(sampler, "config", None) or sampler.model.config
    return int(config.max_seq_len)


def split_overlong(requests: list[dict], params: SamplingParams, context: int) -> tuple[list[dict], list[dict]]:
    """(requests that fit, skipped records): a prompt fits when its tokens + max_new_tokens <= context."""
    fit, skipped = [], []
    for r in requests:
        n = len(r["ids"])
        if n + params.max_new_tokens <= context:
            fit.append(r)
            continue
        why = f"prompt of {n} tokens + max_new_tokens {params.max_new_tokens} > context {context}"
        skipped += [{"id": sample_id(r["id"], s, params.n), "request_id": r["id"], "skipped": why}
                    for s in range(params.n)]
    return fit, skipped


def generate_records(sampler, dist: Dist, requests: list[dict], params: SamplingParams, out_path: Path, *,
                     chunk_size: int, make_record: Callable[[dict, object, str], dict], desc: str = "generate",
                     finalize: Callable[[list[tuple[dict, dict]]], None] | None = None,
                     chunk_hook: Callable[[int], None] | None = None) -> list[dict]:
    """Generate params.n samples per request into out_path (resuming what is already there).

    make_record(request, completion, record_id) -> the record to store (must keep "id").
    Returns the records of every request that fits the context, in request order (rank 0; other ranks
    get []); the others are written to skipped_path(out_path) (see the module docstring).
    finalize([(request, record), ...]) may complete a chunk's records in place before they are written
    (rank 0 only; e.g. the expected judge score, which needs one batched forward per chunk).
    chunk_hook(chunk_index) runs after each chunk is written.
    """
    n = params.n
    requests, skipped = split_overlong(requests, params, context_length(sampler))
    if dist.is_main:
        if skipped:
            write_jsonl(skipped_path(out_path), skipped)
        else:
            skipped_path(out_path).unlink(missing_ok=True)
    appender = JsonlAppender(out_path) if dist.is_main else None
    done_ids = broadcast_object(set(appender.ids) if appender else None, dist)
    chunks = [requests[i:i + chunk_size] for i in range(0, len(requests), chunk_size)]
    bar = tqdm(total=len(requests), desc=desc, disable=not dist.is_main, leave=False)
    try:
        for ci, chunk in enumerate(chunks):
            todo = [r for r in chunk if any(sample_id(r["id"], s, n) not in done_ids for s in range(n))]
            bar.update(len(chunk) - len(todo))
            if not todo:
                continue
            plist = [dataclasses.replace(params, seed=r["seed"]) for r in todo]
            completions = generate_distributed(sampler, [r["ids"] for r in todo], plist)
            if dist.is_main:
                made = []
                for i, r in enumerate(todo):
                    for s in range(n):
                        rid = sample_id(r["id"], s, n)
                        if rid not in done_ids:
                            made.append((r, make_record(r, completions[i * n + s], rid)))
                if finalize is not None:
                    finalize(made)
                batch = [rec for _, rec in made]
                appender.append(batch)
                done_ids.update(rec["id"] for rec in batch)
            bar.update(len(todo))
            if chunk_hook is not None:
                chunk_hook(ci)
    finally:
        bar.close()
        if appender is not None:
            appender.close()
    barrier()
    if not dist.is_main:
        return []
    with JsonlAppender(out_path) as reread:
        by_id = {r["id"]: r for r in reread.records}
    ordered = [by_id[sample_id(r["id"], s, n)] for r in requests for s in range(n)]
    if len(ordered) != len(by_id):
        raise RuntimeError(f"{out_path}: {len(by_id)} records for {len(ordered)} expected ids")
    return ordered
