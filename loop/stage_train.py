"""Training stages: SFT (M0 -> SFT baseline, M0 -> M1), reference log-probs (5) and DPO (6).

All ranks call these collectively (the trainer runs under DeepSpeed ZeRO when several ranks).
Examples are tokenized here with the model's chat template: EFT examples are the judge prompt as
the user turn and the judgment as the assistant turn, so M1 learns to judge with the very prompt
the AIFT stages use.
"""
from __future__ import annotations

from pathlib import Path

from engine.data import PreferencePair, SFTExample, fit_prompt_side
from engine.distributed import Dist
from engine.handoff import HandedOff, HandoffRequest
from engine.metrics_log import StageMetrics
from engine.trainer import compute_reference_logprobs, train_dpo, train_sft

from .config import LoopConfig
from .judge import fill_template
from .prompts import chat_ids, response_ids
from .records import read_jsonl, write_jsonl
from .stages import F


def sft_examples(tok, ift_path: Path, eft_path: Path | None, judge_template: str | None,
                 extra: list[dict] = ()) -> list[SFTExample]:
    """IFT examples, EFT examples (judge prompt -> judgment), then `extra` ready-made {"prompt", "response"}
    records (the meta-judge's, meta.sft_examples)."""
    records = read_jsonl(ift_path, ("id", "prompt", "response")) + list(extra)
    examples = [SFTExample(chat_ids(tok, r["prompt"]), response_ids(tok, r["response"], True)) for r in records]
    if eft_path is not None:
        for r in read_jsonl(eft_path, ("id", "prompt", "response", "judgment")):
            examples.append(SFTExample(chat_ids(tok, fill_template(judge_template, r["prompt"], r["response"])),
                                       response_ids(tok, r["judgment"], True)))
    return examples


def fit_context(examples: list, init_dir: Path, max_seq_len: int | None) -> tuple[list, int]:
    """(examples cut prompt-side to the training length, how many were cut); the length is the one the
    trainer uses: the section's max_seq_len capped at the checkpoint's context."""
    from model.checkpoint import open_checkpoint

    context = open_checkpoint(init_dir).config.max_seq_len
    max_len = min(max_seq_len or context, context)
    fitted = [fit_prompt_side(x, max_len) for x in examples]
    return [x for x, _ in fitted], sum(cut for _, cut in fitted)


def _summary(result) -> dict:
    losses = list(result.losses)
    out = {"steps": result.steps, "first_loss": losses[0] if losses else None,
           "last_loss": losses[-1] if losses else None, "tokens_per_s": result.tokens_per_s, "mfu": result.mfu,
           "micro_batch": result.micro_batch, "last_metrics": result.metrics[-1] if result.metrics else {}}
    if result.handoff is not None:
        out.update(result.handoff.summary())
    return out


def run_sft(tok, dist: Dist, cfg: LoopConfig, *, init_dir: Path, ift_path: Path, eft_path: Path | None,
            judge_template: str | None, out_dir: Path, handoff: HandoffRequest | None = None,
            sink: StageMetrics | None = None, extra: list[dict] = ()) -> tuple[dict, HandedOff | None]:
    """-> (stage summary, this rank's sampler weights when handoff asked for them); per-step metrics to sink.
    extra: more {"prompt", "response"} examples (sft_examples)."""
    examples, cut = fit_context(sft_examples(tok, ift_path, eft_path, judge_template, extra), init_dir,
                                cfg.sft.max_seq_len)
    result = train_sft(str(init_dir), examples, cfg.sft, str(out_dir), resume=True, handoff=handoff, sink=sink)
    summary = {"examples": len(examples), "truncated_examples": cut, **_summary(result)}
    if extra:
        summary["meta_examples"] = len(extra)
    return summary, result.handoff


def preference_pairs(tok, pairs: list[dict]) -> list[PreferencePair]:
    return [PreferencePair(p["id"], chat_ids(tok, p["prompt"]), response_ids(tok, p["chosen"], p["chosen_finished"]),
                           response_ids(tok, p["rejected"], p["rejected_finished"]),
                           p.get("ref_chosen"), p.get("ref_rejected")) for p in pairs]


def run_ref_logprobs(tok, dist: Dist, cfg: LoopConfig, *, init_dir: Path, pairs_path: Path, work: Path) -> dict:
    """(5) the reference model's (M_t) log-probs of chosen and rejected, stored in the pair records."""
    records = read_jsonl(pairs_path, ("id", "prompt", "chosen", "rejected"))
    pairs, cut = fit_context(preference_pairs(tok, records), init_dir, cfg.dpo.max_seq_len)
    filled = compute_reference_logprobs(str(init_dir), pairs, cfg.dpo) if records else []
    by_id = {p.id: p for p in filled}
    for r in records:
        r["ref_chosen"], r["ref_rejected"] = by_id[r["id"]].ref_chosen, by_id[r["id"]].ref_rejected
    if dist.is_main:
        write_jsonl(work / F.PAIRS, records)
    margins = [r["ref_chosen"] - r["ref_rejected"] for r in records]
    return {"pairs": len(records), "truncated_examples": cut,
            "mean_ref_margin": sum(margins) / len(margins) if margins else None}


def run_dpo(tok, dist: Dist, cfg: LoopConfig, *, init_dir: Path, pairs_path: Path, out_dir: Path,
            handoff: HandoffRequest | None = None, sink: StageMetrics | None = None,
            candidates_dir: Path | None = None, candidates_every: int = 0) -> tuple[dict, HandedOff | None]:
    """(6) DPO from M_t on the pairs -> M_{t+1}; resumes from the trainer's checkpoints under out_dir.ckpt.
    With candidates_dir, also an HF candidate every candidates_every steps (checkpoint selection)."""
    records = read_jsonl(pairs_path, ("id", "prompt", "chosen", "rejected", "ref_chosen", "ref_rejected"))
    if not records:
        raise RuntimeError(f"{pairs_path}: no preference pairs to train on (see the pairs stage's drop reasons)")
    pairs, cut = fit_context(preference_pairs(tok, records), init_dir, cfg.dpo.max_seq_len)
    result = train_dpo(str(init_dir), pairs, cfg.dpo, str(out_dir), resume=True,
                       handoff=handoff, sink=sink, candidates_dir=candidates_dir, candidates_every=candidates_every)
    return {"pairs": len(records), "truncated_examples": cut, **_summary(result)}, result.handoff
