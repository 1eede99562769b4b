"""M0 of the world: train its tokenizer, pretrain a tiny Llama from scratch, cache by config hash
(or take the shipped M0 of the same recipe, loop/world/shipped.py).

The cache key hashes the WorldConfig and the source of every file that shapes the corpus, the
tokenizer or the training step (of the task families: only the modules of the config's own, `m0_sources`),
so a code change rebuilds M0 and a rerun with the same config skips straight to the cached checkpoint.

Pretraining is a plain next-token loss over packed documents, stepped by the engine's AdamW groups
(engine/optim.py) and cosine schedule (engine/schedule.py). The vocabulary is a few hundred pieces,
so full logits are cheaper here than the fused kernels.linear_logprobs (which exists to avoid
[N, V] logits for 32k-128k vocabularies); the loop's SFT and DPO stages use the engine trainer.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.atomic import atomic_write_text
from engine.optim import adamw, param_groups
from engine.progress import Progress
from engine.schedule import CosineSchedule
from model.checkpoint import save_pretrained
from model.llama import Llama

from .config import WorldConfig
from .corpus import CorpusMix, corpus_documents
from .families import FAMILIES
from .shipped import find_shipped
from .tokenizer_train import train_tokenizer

WORLD_DIR = Path(__file__).resolve().parent
FAMILIES_DIR = WORLD_DIR / "families"
ENGINE_DIR = WORLD_DIR.parent.parent / "engine"
_SOURCES = tuple(WORLD_DIR / name for name in ("tasks.py", "families/base.py", "grader.py", "seed.py", "corpus.py",
                                               "tokenizer_train.py", "m0.py", "config.py", "judge_template.txt")) + \
    (ENGINE_DIR / "optim.py", ENGINE_DIR / "schedule.py")
# beta2 0.95 as in Llama pretraining: the loss is noisy over a few hundred steps of a tiny model
PRETRAIN_BETAS = (0.9, 0.95)


def m0_sources(cfg: WorldConfig) -> tuple[Path, ...]:
    """The files whose bytes shape this config's M0: the common ones, then the module of each of its families'
    classes (and of their bases) under loop/world/families/. A family in a module of its own changes no other
    world's key, so adding one leaves every shipped M0 valid."""
    modules = []
    for name in cfg.families:
        for cls in type(FAMILIES[name]).__mro__:
            file = getattr(sys.modules.get(cls.__module__), "__file__", None)
            path = Path(file).resolve() if file else None
            if path is not None and path.parent == FAMILIES_DIR and path.name != "base.py" and path not in modules:
                modules.append(path)
    return _SOURCES + tuple(sorted(modules))


def m0_cache_key(cfg: WorldConfig) -> str:
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    # the registry (families/__init__.py) is not hashed, so the class each family name maps to is
    for name in cfg.families:
        cls = type(FAMILIES[name])
        h.update(f"{name}={cls.__module__}.{cls.__qualname__}\n".encode())
    for path in m0_sources(cfg):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def tokenizer_texts(docs: list[str], judge_template: str) -> list[str]:
    # The judge prompt is read for every judgment: repeat it so its words become whole pieces.
    return docs + [judge_template] * 30


def _pack(docs: list[str], sp, seq_len: int) -> torch.Tensor:
    """Documents as <s> text </s>, concatenated and cut into rows of seq_len + 1 tokens."""
    ids: list[int] = []
    for d in docs:
        ids.append(sp.bos_id())
        ids.extend(sp.encode(d))
        ids.append(sp.eos_id())
    n_rows = len(ids) // (seq_len + 1)
    if n_rows == 0:
        raise ValueError(f"loop/world/m0.py: corpus of {len(ids)} tokens is shorter than one row ({seq_len + 1})")
    return torch.tensor(ids[: n_rows * (seq_len + 1)], dtype=torch.long).view(n_rows, seq_len + 1)


def pretrain(cfg: WorldConfig, rows: torch.Tensor, log_every: int = 50, log=print,
             device: str | torch.device = "cpu", metrics=None, on_eval=None,
             eval_every: int = 0) -> tuple[Llama, list[dict]]:
    """Train a fresh Llama on `rows` ([R, seq_len + 1] token ids) for cfg.pretrain_steps steps.

    Progress: a bar on a terminal, else a `log` line every log_every steps (engine/progress.py);
    metrics (an engine.metrics_log.StageMetrics) gets a record at those steps (1-based).
    on_eval(steps_done, model) runs every eval_every steps and after the last, in eval mode without
    gradients; it draws from no generator of the run's, so the weights are those of a run without it."""
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Llama(cfg.model_config()).init_weights(cfg.init_std, gen).to(device)
    model.train()
    # the engine's optimizer and schedule, so M0 is pretrained by the same recipe the trainer runs
    opt = adamw(param_groups(model, cfg.pretrain_weight_decay), cfg.pretrain_lr, PRETRAIN_BETAS, eps=1e-8)
    schedule = CosineSchedule(opt, cfg.pretrain_steps, cfg.pretrain_lr, cfg.pretrain_min_lr, cfg.pretrain_warmup)
    history = []
    t0 = t_window = time.perf_counter()
    window_tokens = 0
    progress = Progress(cfg.pretrain_steps, "m0 pretrain", enabled=log is not None, emit=log)
    if metrics is not None:
        metrics.begin(0)
    for step in range(cfg.pretrain_steps):
        lr = schedule.get_last_lr()[0]
        batch = rows[torch.randint(0, rows.shape[0], (cfg.pretrain_batch,), generator=gen)]
        batch = batch.to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        progress.advance()
        window_tokens += x.numel()
        if step % log_every == 0 or step == cfg.pretrain_steps - 1:
            now = time.perf_counter()
            elapsed, value = now - t0, loss.item()
            rate = window_tokens / max(now - t_window, 1e-9)
            t_window, window_tokens = now, 0
            history.append({"step": step, "loss": round(value, 4), "elapsed_s": round(elapsed, 1)})
            if metrics is not None:
                metrics.step({"step": step + 1, "loss": value, "lr": lr,
                              "grad_norm": grad_norm.item(), "tokens_per_s": rate})
            progress.report(f"[m0] step {step}/{cfg.pretrain_steps} loss {value:.3f} ({elapsed:.0f}s)",
                            loss=value, tok_s=round(rate))
        done = step + 1
        if on_eval is not None and eval_every > 0 and (done % eval_every == 0 or done == cfg.pretrain_steps):
            model.eval()
            with torch.no_grad():
                on_eval(done, model)
            model.train()
    progress.close()
    model.eval()
    return model.cpu(), history


def corpus_and_tokenizer(cfg: WorldConfig, out_dir: Path, forbidden_texts: set[str],
                         judge_template: str) -> tuple[list[str], Path]:
    """M0's pretraining documents and the tokenizer trained on them (out_dir/tokenizer.model), the first half
    of a build; scripts/ship_m0.py --rekey compares that tokenizer with a shipped one."""
    # the four base kinds' weights sum to 1 (without answers, 1 - qa), so a share s of the corpus weighs
    # s / (1 - shares) of that sum
    rest = 1.0 - cfg.corpus_copy_share - cfg.corpus_check_share - cfg.corpus_lookup_share
    base = 1.0 if cfg.corpus_answers else 1.0 - CorpusMix.qa
    mix = CorpusMix(qa=CorpusMix.qa if cfg.corpus_answers else 0.0, copy=cfg.corpus_copy_share / rest * base,
                    checks=cfg.corpus_check_share / rest * base, lookups=cfg.corpus_lookup_share / rest * base)
    docs = corpus_documents(cfg.seed, cfg.corpus_docs, forbidden_texts, mix, cfg.families)
    tok_path = train_tokenizer(tokenizer_texts(docs, judge_template), Path(out_dir) / "tokenizer.model",
                               cfg.tokenizer_vocab_size)
    return docs, tok_path


def build_m0(cfg: WorldConfig, cache_dir: str | Path, forbidden_texts: set[str], judge_template: str,
             log=print, metrics=None, use_shipped: bool = True, on_eval=None,
             eval_every: int = 0) -> tuple[Path, Path]:
    """(checkpoint_dir, tokenizer_path) of M0 for this config: the cached build, else the shipped M0 of the
    same recipe (loop/world/shipped.py; not with use_shipped=False), else pretrained once and cached.
    When it pretrains, on_eval(steps_done, model, tokenizer_path) runs every eval_every steps (see pretrain);
    what it returns, when not None, is kept in pretrain_log.json's "evals" with the step."""
    import sentencepiece as spm

    key = m0_cache_key(cfg)
    root = Path(cache_dir) / f"m0-{key}"
    ckpt = root / "checkpoint"
    if (ckpt / "config.json").is_file() and (ckpt / "tokenizer.model").is_file():
        return ckpt, ckpt / "tokenizer.model"
    shipped = find_shipped(key) if use_shipped else None
    if shipped is not None:
        if log is not None:
            log(f"[m0] using the shipped M0 {shipped} (recipe {key}): no pretraining")
        return shipped, shipped / "tokenizer.model"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    docs, tok_path = corpus_and_tokenizer(cfg, root, forbidden_texts, judge_template)
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    rows = _pack(docs, sp, cfg.pretrain_seq_len)
    evals = []

    def hook(steps: int, model: Llama) -> None:
        if (result := on_eval(steps, model, tok_path)) is not None:
            evals.append({"step": steps, **result})

    model, history = pretrain(cfg, rows, log=log, metrics=metrics, on_eval=hook if on_eval else None,
                              eval_every=eval_every)
    save_pretrained(model, ckpt, tokenizer_dir=tok_path)
    summary = {"config": cfg.to_dict(), "corpus_rows": rows.shape[0], "corpus_tokens": rows.numel(),
               "params": cfg.model_config().num_params(), "wall_s": round(time.perf_counter() - t0, 1),
               "history": history, **({"evals": evals} if evals else {})}
    atomic_write_text(root / "pretrain_log.json", json.dumps(summary, indent=1))
    return ckpt, ckpt / "tokenizer.model"
