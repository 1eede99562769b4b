"""Checks of a run's inputs before any stage works (and before the run directory is touched).

Everything here is cheap next to the run and is otherwise found only deep into it: a judge template
without its slots once M0 is trained, an OASST line that is not JSON while the seed stage writes.
Each failure is a LoopConfigError of one line naming the config key and, for a file, file:line.
"""
from __future__ import annotations

from pathlib import Path

from common.errors import ConfigError

from .config import LoopConfig, LoopConfigError
from .records import RecordError, read_jsonl
from .stages import SEED


def _bad(key: str, why: str):
    raise LoopConfigError(f"loop config: {key} {why}")


def _world(cfg: LoopConfig):
    from loop.world import World, WorldConfig

    try:
        return World(WorldConfig.from_dict(cfg.data.world))
    except (ConfigError, TypeError) as e:
        raise LoopConfigError(f"loop config: data.world: {e}") from None


def _templates(cfg: LoopConfig, world) -> None:
    from .judge import load_template, template_path
    from .prompts import load_self_instruct_template

    t = cfg.judge.template
    try:
        load_template(template_path(t, world))
    except (OSError, ValueError) as e:
        _bad("judge.template", f"= {t!r}: {e}")
    try:
        load_self_instruct_template(cfg.prompts.template)
    except (OSError, ValueError) as e:
        _bad("prompts.template", f"= {cfg.prompts.template!r}: {e}")
    if cfg.meta.enabled:
        from .meta_judge import load_meta_template, meta_template_path

        try:
            load_meta_template(meta_template_path(cfg.meta.template, world))
        except (OSError, ValueError) as e:
            _bad("meta.template", f"= {cfg.meta.template!r}: {e}")


def _checkpoint(cfg: LoopConfig) -> None:
    """model.init, model.tokenizer and model.chat_template of a real checkpoint, without loading weights."""
    from model.checkpoint import open_checkpoint
    from model.tokenizer import TokenizerError, load_tokenizer
    from model.weight_loading import CheckpointError

    mc = cfg.model
    if not Path(mc.init).exists():
        _bad("model.init", f"= {mc.init!r}: no such file or directory")
    if mc.tokenizer is not None and not Path(mc.tokenizer).exists():
        _bad("model.tokenizer", f"= {mc.tokenizer!r}: no such file or directory")
    try:
        model_cfg = open_checkpoint(mc.init).config
    except (CheckpointError, ConfigError) as e:
        _bad("model.init", f"= {mc.init!r}: {e}")
    key = "model.tokenizer" if mc.tokenizer is not None else "model.init"
    try:
        tok = load_tokenizer(mc.tokenizer or mc.init, chat_template=mc.chat_template)
    except TokenizerError as e:
        _bad("model.chat_template" if "chat template" in str(e) else key, f"({key} = {mc.tokenizer or mc.init!r}): {e}")
    # An embedding padded past the tokenizer (to a multiple of 64, say) is common and harmless; a
    # tokenizer with ids beyond the embedding belongs to another model.
    if tok.vocab_size > model_cfg.vocab_size:
        _bad(key, f"= {mc.tokenizer or mc.init!r}: the tokenizer has {tok.vocab_size} tokens but the checkpoint's "
             f"embedding has vocab_size={model_cfg.vocab_size} (a tokenizer of another model?)")


def _user_data(cfg: LoopConfig) -> None:
    """data.source = jsonl | hf: every split read and checked in full, as the seed stage will."""
    from .data.sources import user_seed_records
    from .judge import load_template, template_path

    d = cfg.data
    for key in ("ift_path", "eft_path", "eft_eval_path", "eval_path"):
        path = getattr(d, key)
        if path is not None and not (Path(path).is_file() if d.source == "jsonl" else Path(path).exists()):
            _bad(f"data.{key}", f"= {path!r}: no such {'file' if d.source == 'jsonl' else 'file or directory'}")
    template = load_template(template_path(cfg.judge.template, None))
    try:
        user_seed_records(d, seed=cfg.run.seed, judge_template=template)
    except RecordError as e:
        raise LoopConfigError(f"loop config: {e}") from None


def preflight(cfg: LoopConfig, run_dir: Path, *, resume: bool) -> None:
    """Raise LoopConfigError (one line) for the first input that would fail the run; touches nothing."""
    world = None
    if cfg.data.source == "world":
        world = _world(cfg)
        if cfg.model.init != "world":  # a checkpoint M0 on the world's tasks (as chat prompts, so the grader evaluates)
            _checkpoint(cfg)
    elif cfg.data.source in ("jsonl", "hf"):
        _checkpoint(cfg)
        _templates(cfg, world)  # the judge template reads EFT rows in the messages shape
        _user_data(cfg)
    else:
        _checkpoint(cfg)
        from loop.data.oasst import read_export

        if not Path(cfg.data.oasst_path).is_file():
            _bad("data.oasst_path", f"= {cfg.data.oasst_path!r}: no such file")
        try:
            read_export(cfg.data.oasst_path)
        except RecordError as e:
            _bad("data.oasst_path", f": {e}")
    _templates(cfg, world)
    if resume:
        for name in SEED.outputs:  # the seed files a resumed run reads: a hand-edited one is checked first
            path = SEED.path(run_dir, name)
            if path.exists():
                try:
                    read_jsonl(path)
                except RecordError as e:
                    raise LoopConfigError(str(e)) from None
