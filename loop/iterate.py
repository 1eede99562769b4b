"""The self-rewarding loop, M0 -> M_{T+1}, in one resumable command.

    torchrun --nproc_per_node 8 loop/iterate.py --config configs/llama2_70b_8xa100.yaml
    python loop/iterate.py                       # configs/cpu_default.yaml: the embedded world
    python loop/iterate.py --run-dir runs/x --resume dpo.lr=2e-6

Every rank runs this orchestrator: generation is sharded over ranks, training runs under the
trainer's ZeRO, rank 0 writes every file, and ranks meet at a barrier after each stage. Run layout
and record formats: docs/DATA.md. A stage whose folder is in place is done and is skipped; an
interrupted one continues from its last complete record (see loop/generation.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun loop/iterate.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.distributed import Dist, barrier, init_distributed, log, seed_everything  # noqa: E402
from engine.metrics_log import MetricsSink, StageMetrics, check_sinks  # noqa: E402
from common.errors import ConfigError  # noqa: E402

from loop import manifest as M  # noqa: E402
from loop import stages as S  # noqa: E402
from loop.config import LoopConfig, load_config  # noqa: E402
from loop.generation import broadcast_object  # noqa: E402
from loop.judge import load_template, template_path  # noqa: E402
from loop.preflight import preflight  # noqa: E402
from loop.records import RecordError  # noqa: E402
from loop.sampler_phase import SamplerPhase  # noqa: E402
from loop.stage_dir import StageDir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "cpu_default.yaml"


class Loop:
    """One run directory's pipeline; holds at most one loaded sampler at a time."""

    def __init__(self, cfg: LoopConfig, dist: Dist, run_dir: Path, metrics: MetricsSink | None = None):
        self.cfg, self.dist, self.run_dir = cfg, dist, run_dir
        self.metrics = metrics  # rank 0's sink (metrics.jsonl + run.log_to); None on the other ranks
        self.world = None
        self.tok = None
        self.phase = SamplerPhase(cfg.model, dist)

    # --- plumbing ---------------------------------------------------------------------------
    def stage(self, stage: S.Stage, key: int | str | None = None) -> StageDir:
        """stage's folder (key: its iteration or model, see loop/stages.py); done = skipped on resume."""
        sink = self.stage_metrics(stage, key)
        return StageDir(stage.folder(self.run_dir, key), self.dist, on_finish=sink.summary if sink else None)

    def stage_metrics(self, stage: S.Stage, key: int | str | None = None) -> StageMetrics | None:
        if self.metrics is None:
            return None
        return self.metrics.stage(stage.folder(self.run_dir, key).relative_to(self.run_dir).as_posix())

    def model_dir(self, name: str) -> Path:
        m0 = StageDir(S.M0.folder(self.run_dir), self.dist)
        if name == "M0" and m0.done:  # a .gguf M0 is linked with its suffix: see prepare
            return self.run_dir / m0.summary().get("link", "models/M0")
        return self.run_dir / "models" / name

    def sampler(self, model_dir: Path):
        """The generation phase's sampler: the weights a training stage handed over, else from disk."""
        self.phase.tok = self.tok
        return self.phase.get(model_dir)

    def release_sampler(self) -> None:
        self.phase.release()

    # --- seed data and M0 -------------------------------------------------------------------
    def prepare(self) -> None:
        cfg = self.cfg
        if cfg.data.source == "world":
            from loop.world import World, WorldConfig

            try:
                self.world = World(WorldConfig.from_dict(cfg.data.world))
            except (ConfigError, TypeError) as e:
                raise ConfigError(f"loop config: data.world: {e}") from None
        st = self.stage(S.SEED)
        if not st.done:
            work = st.begin()
            summary = {}
            if self.dist.is_main:
                if self.world is not None:
                    paths = self.world.build_seed(work, eval_prompts=cfg.data.world_eval_prompts)
                else:
                    from loop.data.sources import build_seed

                    paths = build_seed(cfg, work, judge_template=self.judge_template())
                summary = {name: sum(1 for _ in open(p, encoding="utf-8")) for name, p in paths.items()}
            st.finish(summary)
        m0 = self.stage(S.M0)
        if not m0.done:
            m0.begin()
            if cfg.model.init == "world":
                cache = Path(cfg.data.world_cache_dir)
                built = None
                if self.dist.is_main:  # pretraining M0 is cached by config hash: rank 0 builds, others reuse
                    built = self.world.build_m0(cache, log=lambda m: log(self.dist, m),
                                                metrics=self.stage_metrics(S.M0))
                # rank 0's paths, not a second hash on each rank: a source edited during the run would
                # give another key and pretrain a second M0 under it with the code already imported
                ckpt, tok_path = broadcast_object(built, self.dist)
            else:  # any checkpoint format, also with the world's data (its tasks as chat prompts)
                from model.checkpoint import CheckpointError, checkpoint_format

                ckpt = Path(cfg.model.init)
                tok_path = Path(cfg.model.tokenizer or cfg.model.init)
                try:
                    checkpoint_format(ckpt)
                except CheckpointError as e:
                    raise ConfigError(f"loop config: model.init: {e}") from None
            ckpt = Path(ckpt).resolve()
            # The link keeps a file's suffix (models/M0.gguf): checkpoint formats are told apart by it.
            link = self.run_dir / "models" / ("M0" + (ckpt.suffix if ckpt.is_file() else ""))
            if self.dist.is_main:
                link.parent.mkdir(parents=True, exist_ok=True)
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(ckpt)
            m0.finish({"checkpoint": str(ckpt), "tokenizer": str(Path(tok_path).resolve()),
                       "link": str(link.relative_to(self.run_dir))})
        info = m0.summary()
        from model.tokenizer import load_tokenizer

        world_m0 = self.world is not None and cfg.model.init == "world"
        template = cfg.model.chat_template or (self.world.cfg.chat_template if world_m0 else None)
        self.tok = load_tokenizer(info["tokenizer"], chat_template=template)

    def seed_path(self, file: str) -> Path:
        """A seed file (loop/stages.py F.*), from the EFT stage where that stage rebuilt it."""
        if file in (S.F.EFT_TRAIN, S.F.EFT_EVAL) and self.cfg.data.source == "oasst":
            return S.EFT.path(self.run_dir, file)
        if file == S.F.EFT_TRAIN and self.cfg.data.eft_own_samples:
            return S.EFT.path(self.run_dir, file)
        return S.SEED.path(self.run_dir, file)

    def judge_template(self) -> str:
        return load_template(template_path(self.cfg.judge.template, self.world))

    def meta_template(self) -> str:
        from loop.meta_judge import load_meta_template, meta_template_path

        return load_meta_template(meta_template_path(self.cfg.meta.template, self.world))

    # --- SFT, EFT builder -------------------------------------------------------------------
    def train_sft(self, name: str, with_eft: bool) -> None:
        run_sft = S.SFT.function()
        st = self.stage(S.SFT, name)
        if st.done:
            return
        work = st.begin()
        self.release_sampler()
        eft = self.seed_path(S.F.EFT_TRAIN) if with_eft else None
        meta = self.meta_sft_records(eft, work) if eft is not None else []
        summary, weights = run_sft(self.tok, self.dist, self.cfg, init_dir=self.model_dir("M0"),
                                   ift_path=self.seed_path(S.F.IFT), eft_path=eft, judge_template=self.judge_template(),
                                   out_dir=self.model_dir(name), handoff=self.phase.request(),
                                   sink=self.stage_metrics(S.SFT, name), extra=meta)
        st.finish(summary)
        self.phase.handed(self.model_dir(name), weights)

    def meta_sft_records(self, eft_path: Path, work: Path) -> list[dict]:
        """meta.sft_examples meta-judge examples from the EFT records (loop/meta_judge.py sft_records), kept in
        the SFT stage's folder; [] with meta off. Every rank builds the same list from the same files."""
        mc = self.cfg.meta
        if not (mc.enabled and mc.sft_examples):
            return []
        from loop.meta_judge import sft_records
        from loop.records import read_jsonl, write_jsonl

        records = sft_records(read_jsonl(eft_path, ("id", "group_id", "prompt", "response", "judgment", "score")),
                              template=self.meta_template(), judge_template=self.judge_template(),
                              n=mc.sft_examples, seed=self.cfg.run.seed)
        if self.dist.is_main:
            write_jsonl(work / S.F.META_SFT, records)
        return records

    def build_eft(self) -> None:
        """EFT data from the SFT baseline (loop/stage_eft.py): OASST's ranked candidates judged, or the world's
        instructions answered and graded."""
        build_eft = S.EFT.function()
        st = self.stage(S.EFT)
        if st.done:
            return
        work = st.begin()
        grade = self.world.grade if self.cfg.data.source == "world" else None
        st.finish(build_eft(self.sampler(self.model_dir("sft_baseline")), self.tok, self.dist, self.cfg,
                            run_dir=self.run_dir, template=self.judge_template(), grade=grade, work=work))

    # --- one AIFT iteration -----------------------------------------------------------------
    def iteration(self, t: int) -> None:
        # each stage's function, as the stage table names it
        gen_prompts, gen_responses, judge_responses, meta_judge, make_pairs = (
            st.function() for st in (S.PROMPTS, S.RESPONSES, S.JUDGMENTS, S.META_JUDGE, S.PAIRS))
        cfg, run, F = self.cfg, self.run_dir, S.F
        current = self.model_dir(f"M{t}")
        gen_model = {"current": current, "M0": self.model_dir("M0")}.get(cfg.prompts.model) or Path(cfg.prompts.model)
        s1, s2, s3, s4 = (self.stage(st, t) for st in (S.PROMPTS, S.RESPONSES, S.JUDGMENTS, S.PAIRS))
        earlier = [S.PROMPTS.path(run, F.PROMPTS, k) for k in range(1, t)]
        is_valid = self.world.is_valid_prompt if (self.world is not None and cfg.prompts.world_filter) else None
        if not s1.done:
            work = s1.begin()
            s1.finish(gen_prompts(self.sampler(gen_model), self.tok, self.dist, cfg, ift_path=self.seed_path(F.IFT),
                                  earlier_prompt_paths=earlier, work=work, iteration=t, is_valid=is_valid))
        prompts_path = S.PROMPTS.path(run, F.PROMPTS, t)
        responses_path = S.RESPONSES.path(run, F.RESPONSES, t)
        if not s2.done:
            work = s2.begin()
            s2.finish(gen_responses(self.sampler(current), self.tok, self.dist, cfg, prompts_path=prompts_path,
                                    work=work, iteration=t))
        if not s3.done:
            work = s3.begin()
            s3.finish(judge_responses(self.sampler(current), self.tok, self.dist, cfg,
                                      template=self.judge_template(), prompts_path=prompts_path,
                                      responses_path=responses_path, work=work, iteration=t))
        judge_pairs = None
        if cfg.meta.enabled:  # Meta-Rewarding: M_t also judges its judgments (loop/meta_judge.py)
            s3m = self.stage(S.META_JUDGE, t)
            if not s3m.done:
                work = s3m.begin()
                s3m.finish(meta_judge(self.sampler(current), self.tok, self.dist, cfg,
                                      judge_template=self.judge_template(), meta_template=self.meta_template(),
                                      prompts_path=prompts_path,
                                      responses_path=responses_path,
                                      judgments_path=S.JUDGMENTS.path(run, F.JUDGMENTS, t), work=work, iteration=t))
            judge_pairs = S.META_JUDGE.path(run, F.JUDGE_PAIRS, t)
        if not s4.done:
            work = s4.begin()
            summary = make_pairs(cfg, prompts_path=prompts_path, responses_path=responses_path,
                                 scores_path=S.JUDGMENTS.path(run, F.SCORES, t), work=work,
                                 judge_pairs_path=judge_pairs) if self.dist.is_main else {}
            s4.finish(summary)
        self.train_dpo(t, S.PAIRS.path(run, F.PAIRS, t))
        self.select(t)

    def train_dpo(self, t: int, pairs_path: Path) -> None:
        from loop.records import read_jsonl
        from loop.checkpoint_select import candidates_dir

        run_ref_logprobs, run_dpo = S.REF_LOGPROBS.function(), S.DPO.function()
        current, nxt = self.model_dir(f"M{t}"), self.model_dir(f"M{t + 1}")
        s5, s6 = self.stage(S.REF_LOGPROBS, t), self.stage(S.DPO, t)
        ref_pairs = S.REF_LOGPROBS.path(self.run_dir, S.F.PAIRS, t)
        if not s5.done:
            work = s5.begin()
            self.release_sampler()
            s5.finish(run_ref_logprobs(self.tok, self.dist, self.cfg, init_dir=current, pairs_path=pairs_path,
                                       work=work))
        if s6.done:
            return
        s6.begin()
        self.release_sampler()
        n_pairs = len(read_jsonl(ref_pairs, ("id",)))
        if n_pairs < self.cfg.dpo.global_batch:
            # Not one optimizer step's worth: M_{t+1} = M_t, said loudly in the stage summary and the report.
            why = f"{n_pairs} preference pairs < dpo.global_batch={self.cfg.dpo.global_batch}"
            log(self.dist, f"iter {t}: {why}; M{t + 1} is a copy of M{t}")
            if self.dist.is_main and not nxt.exists():
                tmp = nxt.with_name(nxt.name + ".copy")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(current, tmp)
                os.replace(tmp, nxt)
            s6.finish({"skipped": why, "pairs": n_pairs})
            return
        sel = self.cfg.select
        summary, weights = run_dpo(self.tok, self.dist, self.cfg, init_dir=current,
                                   pairs_path=ref_pairs, out_dir=nxt, handoff=self.phase.request(),
                                   sink=self.stage_metrics(S.DPO, t),
                                   candidates_dir=candidates_dir(nxt) if sel.enabled else None,
                                   candidates_every=sel.every or self.cfg.dpo.checkpoint_every)
        s6.finish(summary)
        self.phase.handed(nxt, weights)

    def select(self, t: int) -> None:
        """(7) which DPO checkpoint becomes M(t+1) (loop/checkpoint_select.py); recorded also when selection is off."""
        from loop import checkpoint_select as CS

        select_checkpoint = S.SELECT.function()
        st = self.stage(S.SELECT, t)
        if st.done:
            return
        work = st.begin()
        dpo = self.stage(S.DPO, t).summary()
        if not self.cfg.select.enabled or "skipped" in dpo:
            st.finish({"disabled": True, "chosen": "last"} if not self.cfg.select.enabled else
                      {"skipped": dpo["skipped"], "chosen": "last"})
            return
        current, nxt = self.model_dir(f"M{t}"), self.model_dir(f"M{t + 1}")
        last = f"step{dpo['steps']}"
        summary = select_checkpoint(sampler_for=self.sampler, judge=lambda: self.select_judge(current),
                                    tok=self.tok, dist=self.dist, cfg=self.cfg, t=t, current=current,
                                    candidates=CS.list_candidates(nxt, dpo["steps"]),
                                    prompts=CS.validation_prompts(self.cfg, self.world), work=work)
        if summary["chosen"] != last:
            self.release_sampler()  # it may hold the last step's weights under M(t+1)'s name
            if self.dist.is_main:
                CS.apply_choice(nxt, summary["chosen"], last, work)
            barrier()
        log(self.dist, f"iter {t}: M{t + 1} = {summary['chosen']} of {len(summary['candidates'])} checkpoints")
        st.finish(summary)

    def select_judge(self, current: Path):
        """(judge sampler, its tokenizer, its name) of checkpoint selection: eval.pairwise_judge, else M(t)."""
        judge = self.cfg.eval.pairwise_judge
        if judge is None:
            return self.sampler(current), self.tok, f"{current.name} (the model before DPO)"
        from model.tokenizer import load_tokenizer

        judge_tok = load_tokenizer(judge)
        self.phase.tok = judge_tok
        return self.phase.get(Path(judge)), judge_tok, Path(judge).name

    # --- evaluation ---------------------------------------------------------------------------
    def evaluate(self, name: str) -> None:
        eval_model = S.EVAL.function()
        st = self.stage(S.EVAL, name)
        if st.done or not self.cfg.eval.enabled:
            return
        work = st.begin()
        ec = self.cfg.eval
        eft_eval = self.seed_path(S.F.EFT_EVAL)
        # The world's grader only knows the world's tasks: a user's prompt set gets no ground truth.
        grader = self.world.grade if (self.world is not None and ec.prompts_path is None) else None
        prompts = Path(ec.prompts_path) if ec.prompts_path else self.seed_path(S.F.EVAL_PROMPTS)
        summary = eval_model(self.sampler(self.model_dir(name)), self.tok, self.dist, self.cfg, name=name,
                             eval_prompts_path=prompts,
                             eft_eval_path=eft_eval if eft_eval.exists() else None,
                             judge_template=self.judge_template(), work=work, grader=grader)
        if ec.pairwise:
            summary["pairwise"] = self.pairwise(name, work)
        st.finish(summary)

    def pairwise(self, name: str, work: Path) -> dict:
        """name against the SFT baseline and the previous model, judged pairwise (loop/pairwise.py) by
        eval.pairwise_judge (with its own tokenizer) or, when none is given, by name itself."""
        from loop.stage_eval import pairwise_matches
        from model.tokenizer import load_tokenizer

        prev = f"M{int(name[1:]) - 1}" if name.startswith("M") and name[1:].isdigit() else None
        opponents = {o: S.EVAL.path(self.run_dir, S.F.GENERATIONS, o) for o in ("sft_baseline", prev)
                     if o not in (None, name) and StageDir(S.EVAL.folder(self.run_dir, o), self.dist).done}
        if not opponents:
            return {}
        barrier()  # rank 0 wrote work/generations.jsonl; every rank builds the judge prompts from it
        judge = self.cfg.eval.pairwise_judge
        if judge is None:
            return pairwise_matches(self.sampler(self.model_dir(name)), self.tok, self.dist, self.cfg, name=name,
                                    work=work, opponents=opponents, judge=f"{name} (self)")
        judge_tok = load_tokenizer(judge)
        self.phase.tok = judge_tok
        return pairwise_matches(self.phase.get(Path(judge)), judge_tok, self.dist, self.cfg, name=name, work=work,
                                opponents=opponents, judge=Path(judge).name)

    def run(self) -> None:
        cfg = self.cfg
        self.prepare()
        need_baseline = cfg.eval.sft_baseline or cfg.data.source == "oasst" or cfg.data.eft_own_samples > 0
        if need_baseline:
            self.train_sft("sft_baseline", with_eft=False)
        if cfg.data.source == "oasst" or cfg.data.eft_own_samples:
            self.build_eft()
        if cfg.eval.sft_baseline:
            self.evaluate("sft_baseline")
        # the user's data (data.source jsonl | hf) may have no EFT rows: M1 is then SFT on IFT only
        self.train_sft("M1", with_eft=cfg.data.source in ("world", "oasst") or cfg.data.eft_path is not None)
        self.evaluate("M1")
        for t in range(1, cfg.run.iterations + 1):
            self.iteration(t)
            self.evaluate(f"M{t + 1}")
        self.release_sampler()
        if self.dist.is_main:
            from loop.report import write_report

            write_report(self.run_dir, cfg)
        barrier()


def check_world_size(cfg: LoopConfig, world_size: int) -> None:
    """Before any stage works: each training section runs on this many ranks (the trainer lowers a
    micro_batch that does not divide; a global_batch that cannot be split is an error here, not
    after M0 and SFT have run); the tensor-parallel groups tile the world."""
    tp = cfg.model.tensor_parallel
    if world_size % tp:
        raise ConfigError(f"loop config: model.tensor_parallel={tp} does not divide the world size {world_size}")
    for section in ("sft", "dpo"):
        try:
            getattr(cfg, section).for_world(world_size).validate(world_size)
        except ConfigError as e:
            raise ConfigError(f"loop config: {section}.{str(e).removeprefix('train config: ')}") from None


def parse_args(argv):
    from loop.config_help import help_text

    ap = argparse.ArgumentParser(description="Self-rewarding loop: M0 -> M_{T+1}, resumable.", epilog=help_text(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO)})")
    ap.add_argument("--run-dir", default=None, help="run directory (overrides run.run_dir)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --run-dir, skipping done stages")
    ap.add_argument("--force-config", action="store_true", help="resume even though the config changed")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. dpo.lr=1e-6 run.iterations=3")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        if args.run_dir:
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=args.run_dir))
        check_world_size(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        check_sinks(cfg.run.log_to)
        preflight(cfg, Path(cfg.run.run_dir), resume=args.resume)  # before anything is written
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed()
    seed_everything(cfg.run.seed, dist.rank)
    run_dir = Path(cfg.run.run_dir)
    error = None
    if dist.is_main:
        try:
            manifest = M.open_run(run_dir, cfg, resume=args.resume, force_config=args.force_config)
        except M.ManifestError as e:
            error = str(e)
    error = broadcast_object(error, dist)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metrics = MetricsSink(run_dir, cfg.run.log_to, config=cfg.to_dict()) if dist.is_main else None
    try:
        Loop(cfg, dist, run_dir, metrics=metrics).run()
    except (RecordError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, say: what was written is consistent (loop/records.py)
        print(f"error: {e}; the run directory holds every complete record: free the space, then rerun with "
              "--resume", file=sys.stderr)
        return 1
    finally:
        if metrics is not None:
            metrics.close()
    if dist.is_main:
        M.mark_finished(run_dir, manifest, time.time() - t0)
        log(dist, f"run finished in {time.time() - t0:.1f} s: {run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
