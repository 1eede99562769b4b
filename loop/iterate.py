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
from model.config import ConfigError  # noqa: E402

from loop import manifest as M  # noqa: E402
from loop.config import LoopConfig, load_config  # noqa: E402
from loop.generation import _broadcast  # noqa: E402
from loop.judge import PAPER_TEMPLATE, load_template  # noqa: E402
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
    def stage(self, *parts: str) -> StageDir:
        sink = self.stage_metrics(*parts)
        return StageDir(self.run_dir.joinpath(*parts), self.dist, on_finish=sink.summary if sink else None)

    def stage_metrics(self, *parts: str) -> StageMetrics | None:
        return self.metrics.stage("/".join(parts)) if self.metrics is not None else None

    def model_dir(self, name: str) -> Path:
        m0 = StageDir(self.run_dir / "m0", self.dist)
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
        st = self.stage("seed")
        if not st.done:
            work = st.begin()
            summary = {}
            if self.dist.is_main:
                if self.world is not None:
                    paths = self.world.build_seed(work)
                else:
                    from loop.data.oasst import convert, read_export, write_seed

                    d = cfg.data
                    paths = write_seed(convert(read_export(d.oasst_path), ift_size=d.ift_size,
                                               eft_prompts=d.eft_prompts, eval_size=d.eval_prompts,
                                               seed=cfg.run.seed), work)
                summary = {name: sum(1 for _ in open(p, encoding="utf-8")) for name, p in paths.items()}
            st.finish(summary)
        m0 = self.stage("m0")
        if not m0.done:
            m0.begin()
            if cfg.model.init == "world":
                cache = Path(cfg.data.world_cache_dir)
                if self.dist.is_main:  # pretraining M0 is cached by config hash: rank 0 builds, others reuse
                    self.world.build_m0(cache, log=lambda m: log(self.dist, m), metrics=self.stage_metrics("m0"))
                barrier()
                ckpt, tok_path = self.world.build_m0(cache, log=lambda m: None)
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

    def seed_path(self, name: str) -> Path:
        if name in ("eft_train", "eft_eval") and self.cfg.data.source == "oasst":
            return self.run_dir / "eft" / f"{name}.jsonl"
        if name == "eft_train" and self.cfg.data.eft_own_samples:
            return self.run_dir / "eft" / "eft_train.jsonl"
        return self.run_dir / "seed" / f"{name}.jsonl"

    def judge_template(self) -> str:
        t = self.cfg.judge.template
        path = PAPER_TEMPLATE if t == "paper" else self.world.judge_template_path if t == "world" else Path(t)
        return load_template(path)

    # --- SFT, EFT builder -------------------------------------------------------------------
    def train_sft(self, name: str, with_eft: bool) -> None:
        from loop.stage_train import run_sft

        st = self.stage("sft", name)
        if st.done:
            return
        st.begin()
        self.release_sampler()
        eft = self.seed_path("eft_train") if with_eft else None
        summary, weights = run_sft(self.tok, self.dist, self.cfg, init_dir=self.model_dir("M0"),
                                   ift_path=self.seed_path("ift"), eft_path=eft, judge_template=self.judge_template(),
                                   out_dir=self.model_dir(name), handoff=self.phase.request(),
                                   sink=self.stage_metrics("sft", name))
        st.finish(summary)
        self.phase.handed(self.model_dir(name), weights)

    def build_eft(self) -> None:
        """OASST only: the SFT baseline judges the ranked candidates; agreeing judgments become EFT data."""
        from loop.eft import select_eft
        from loop.records import read_jsonl, write_jsonl
        from loop.stage_aift import judge_records

        st = self.stage("eft")
        if st.done:
            return
        work = st.begin()
        cands = read_jsonl(self.run_dir / "seed" / "eft_candidates.jsonl", ("id", "group_id", "prompt", "response", "rank"))
        jc = self.cfg.judge
        judgments = judge_records(self.sampler(self.model_dir("sft_baseline")), self.tok, self.dist, self.cfg,
                                  template=self.judge_template(), items=cands, out_path=work / "judgments.jsonl",
                                  k=1, temperature=jc.temperature, top_p=jc.top_p, stage="eft: judge candidates")
        summary = {}
        if self.dist.is_main:
            by_id = {j["target_id"]: {"judgment": j["text"], "score": j["score"]} for j in judgments}
            train, evals, summary = select_eft(cands, by_id, eval_fraction=self.cfg.data.eft_eval_fraction,
                                               seed=self.cfg.run.seed, cap_ratio=self.cfg.data.eft_cap_ratio)
            write_jsonl(work / "eft_train.jsonl", train)
            write_jsonl(work / "eft_eval.jsonl", evals)
        st.finish(summary)

    def build_eft_own(self) -> None:
        """World: the SFT baseline answers the EFT-train instructions; the grader labels its answers."""
        from loop.world.eft_own import own_eft_records

        st = self.stage("eft")
        if st.done:
            return
        work = st.begin()
        summary = own_eft_records(self.sampler(self.model_dir("sft_baseline")), self.tok, self.dist, self.cfg,
                                  seed_eft=self.run_dir / "seed" / "eft_train.jsonl", grade=self.world.grade,
                                  work=work)
        st.finish(summary)

    # --- one AIFT iteration -----------------------------------------------------------------
    def iteration(self, t: int) -> None:
        from loop import stage_aift as A

        cfg, it = self.cfg, f"iter_{t}"
        current = self.model_dir(f"M{t}")
        gen_model = {"current": current, "M0": self.model_dir("M0")}.get(cfg.prompts.model) or Path(cfg.prompts.model)
        s1, s2, s3, s4 = (self.stage(it, n) for n in ("1_prompts", "2_responses", "3_judgments", "4_pairs"))
        earlier = [self.run_dir / f"iter_{k}" / "1_prompts" / "prompts.jsonl" for k in range(1, t)]
        is_valid = self.world.is_valid_prompt if (self.world is not None and cfg.prompts.world_filter) else None
        if not s1.done:
            work = s1.begin()
            s1.finish(A.gen_prompts(self.sampler(gen_model), self.tok, self.dist, cfg, ift_path=self.seed_path("ift"),
                                    earlier_prompt_paths=earlier, work=work, iteration=t, is_valid=is_valid))
        prompts_path = s1.final / "prompts.jsonl"
        if not s2.done:
            work = s2.begin()
            s2.finish(A.gen_responses(self.sampler(current), self.tok, self.dist, cfg, prompts_path=prompts_path,
                                      work=work, iteration=t))
        if not s3.done:
            work = s3.begin()
            s3.finish(A.judge_responses(self.sampler(current), self.tok, self.dist, cfg,
                                        template=self.judge_template(), prompts_path=prompts_path,
                                        responses_path=s2.final / "responses.jsonl", work=work, iteration=t))
        if not s4.done:
            work = s4.begin()
            summary = A.make_pairs(cfg, prompts_path=prompts_path, responses_path=s2.final / "responses.jsonl",
                                   scores_path=s3.final / "scores.jsonl", work=work) if self.dist.is_main else {}
            s4.finish(summary)
        self.train_dpo(t, s4.final / "pairs.jsonl")

    def train_dpo(self, t: int, pairs_path: Path) -> None:
        from loop.records import read_jsonl
        from loop.stage_train import run_dpo, run_ref_logprobs

        it, current, nxt = f"iter_{t}", self.model_dir(f"M{t}"), self.model_dir(f"M{t + 1}")
        s5, s6 = self.stage(it, "5_ref_logprobs"), self.stage(it, "6_dpo")
        if not s5.done:
            work = s5.begin()
            self.release_sampler()
            s5.finish(run_ref_logprobs(self.tok, self.dist, self.cfg, init_dir=current, pairs_path=pairs_path,
                                       work=work))
        if s6.done:
            return
        s6.begin()
        self.release_sampler()
        n_pairs = len(read_jsonl(s5.final / "pairs.jsonl", ("id",)))
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
        summary, weights = run_dpo(self.tok, self.dist, self.cfg, init_dir=current,
                                   pairs_path=s5.final / "pairs.jsonl", out_dir=nxt, handoff=self.phase.request(),
                                   sink=self.stage_metrics(it, "6_dpo"))
        s6.finish(summary)
        self.phase.handed(nxt, weights)

    # --- evaluation ---------------------------------------------------------------------------
    def evaluate(self, name: str) -> None:
        from loop.stage_eval import eval_model

        st = self.stage("eval", name)
        if st.done or not self.cfg.eval.enabled:
            return
        work = st.begin()
        ec = self.cfg.eval
        eft_eval = self.seed_path("eft_eval")
        # The world's grader only knows the world's tasks: a user's prompt set gets no ground truth.
        grader = self.world.grade if (self.world is not None and ec.prompts_path is None) else None
        prompts = Path(ec.prompts_path) if ec.prompts_path else self.seed_path("eval_prompts")
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
        opponents = {o: self.run_dir / "eval" / o / "generations.jsonl" for o in ("sft_baseline", prev)
                     if o not in (None, name) and StageDir(self.run_dir / "eval" / o, self.dist).done}
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
        if cfg.data.source == "oasst":
            self.build_eft()
        elif cfg.data.eft_own_samples:
            self.build_eft_own()
        if cfg.eval.sft_baseline:
            self.evaluate("sft_baseline")
        self.train_sft("M1", with_eft=True)
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
    error = _broadcast(error, dist)
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
