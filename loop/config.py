"""LoopConfig: the typed, validated description of one self-rewarding run (M0 -> M_{T+1}).

Loaded from a YAML file (presets in configs/) plus `section.key=value` overrides from the command
line; unknown keys, wrong types and impossible values are one-line errors naming the key.
The sft section is engine.config.TrainConfig, dpo is DPOConfig (TrainConfig + its objective section,
dpo.objective.*), the data.world section goes to loop.world's WorldConfig unchanged (validated when the world is built).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.errors import ConfigError
from common.merge import deep_merge
from engine.config import DPOConfig, TrainConfig, dpo_config, moved_key_message, sft_config
from engine.metrics_log import SINKS


class LoopConfigError(ConfigError):
    """A loop config that cannot run; one line naming the key."""


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0  # seeds the data split, sampling and training of the whole run
    iterations: int = 2  # AIFT iterations: M1 -> M2 -> M3 is 2
    run_dir: str = "runs/cpu_default"  # where every artifact of the run goes (--run-dir overrides)
    chunk_size: int = 512  # prompts per generate() call; a killed stage resumes at chunk granularity
    # Metrics sinks: RUN_DIR/metrics.jsonl is always written; add tensorboard (RUN_DIR/tensorboard) and/or
    # wandb (honours WANDB_MODE=offline, WANDB_PROJECT). Not part of the config hash: it shapes no result.
    log_to: tuple[str, ...] = ("jsonl",)
    # Nodes (of 8 GPUs) this config is planned for: bench/memory_plan.py checks it fits them; torchrun's
    # --nnodes sets the real world. Not part of the config hash: the global batch, not the world, shapes results.
    nodes: int = 1


@dataclass(frozen=True)
class ModelConfig:
    init: str = "world"  # M0: "world" (the embedded world pretrains it) or an HF/Meta/.gguf checkpoint path
    tokenizer: str | None = None  # None: the tokenizer stored with the checkpoint
    chat_template: str | None = None  # llama2 | llama3 | chatml (built in); None: the checkpoint's Jinja, else llama2
    dtype: str | None = None  # sampler dtype; None = the sampler's default
    kv_memory: float = 0.3  # sampler KV cache: a fraction (0, 1] of free device memory, or bytes (> 1)
    max_num_seqs: int = 256  # sequences the sampler decodes at once
    max_batched_tokens: int = 4096  # tokens per sampler forward (prefill chunks and decodes together)
    # ranks per tensor-parallel sampler group (1, 2, 4, 8), consecutive ranks inside a node; the world is
    # split into world_size / tensor_parallel data-parallel groups of them
    tensor_parallel: int = 1


@dataclass(frozen=True)
class DataConfig:
    # "world" (embedded CPU world) | "oasst" (oasst1 export at oasst_path) | "jsonl" (JSONL files) | "hf" (datasets
    # save_to_disk directories or .parquet files); jsonl and hf read ift_path, eft_path, eft_eval_path, eval_path
    source: str = "world"
    oasst_path: str | None = None  # the oasst1 export, for source = "oasst"
    ift_path: str | None = None  # jsonl/hf: IFT rows (messages, or prompt/completion); required for those sources
    eft_path: str | None = None  # jsonl/hf: EFT rows (README "Your own data"); None: M1 is SFT on IFT only
    # jsonl/hf: held-out EFT rows, the judge's reward metrics; None: eft_eval_fraction of eft_path's groups
    eft_eval_path: str | None = None
    eval_path: str | None = None  # jsonl/hf: eval prompts (messages or prompt); None needs eval.prompts_path
    ift_size: int = 3200  # OASST: instruction-following (IFT) seed examples
    eft_prompts: int = 1000  # OASST prompts with several ranked responses sent to the EFT builder
    eval_prompts: int = 256  # OASST: held-out prompts for evaluation
    eft_eval_fraction: float = 0.25  # OASST, jsonl/hf without eft_eval_path: EFT groups held out to measure the judge
    eft_cap_ratio: float = 1.0  # OASST: most common EFT score capped at this x the second most common's count
    world: dict = field(default_factory=dict)  # WorldConfig fields, for source = "world"
    world_cache_dir: str = ".cache/world"  # pretrained world M0s, keyed by world config hash (shared by runs)
    # World only: per EFT-train instruction, this many responses sampled from the SFT baseline and labelled
    # by the world's grader (the human stand-in) join the EFT training data, so the judge learns the model's
    # own kinds of errors, not only synthetic corruptions. 0 = synthetic EFT only. Eval EFT stays synthetic.
    eft_own_samples: int = 0
    # World only: held-out eval prompts. None: the seed's n_eval_prompts (200, standard error ~3.4 points at
    # 65%); a larger number adds prompts drawn from a stream of their own outside every seed split, so the
    # world config, and with it the M0 recipe, stays as it is (loop/world World.eval_prompts).
    world_eval_prompts: int | None = None


@dataclass(frozen=True)
class PromptGenConfig:
    num_prompts: int = 1000  # new prompts wanted per iteration (the paper does not say how many)
    attempts_factor: float = 2.0  # generations tried = num_prompts x this; the filter keeps the first good ones
    # "current" (M_t, the paper's appendix variant), "M0" (the fixed base model: the paper used a fixed
    # pretrained/chat model for this step) or a checkpoint path
    model: str = "current"
    world_filter: bool = True  # also require the world's is_valid_prompt (data.source = world)
    chat: bool = True  # wrap the few-shot prompt in the chat template (False: raw continuation, base models)
    template: str = "self_instruct.txt"  # file in loop/templates or a path
    shots_ift: int = 6  # few-shot examples drawn from the IFT seed data per prompt-generation request
    shots_generated: int = 2  # few-shot examples drawn from earlier iterations' generated prompts
    temperature: float = 0.6  # sampling temperature of prompt generation
    top_p: float = 0.9  # nucleus sampling of prompt generation
    max_new_tokens: int = 128  # token budget of one generated prompt
    rouge_threshold: float = 0.7  # drop a new prompt whose ROUGE-L with a kept one reaches this
    min_words: int = 3  # drop shorter generated prompts
    max_words: int = 150  # drop longer generated prompts
    # Drop generated prompts with one of these words (self-instruct's list: what a text model cannot do).
    banned_keywords: tuple[str, ...] = ("image", "images", "graph", "graphs", "picture", "pictures", "file",
                                        "files", "map", "maps", "draw", "plot", "go to", "video", "audio",
                                        "flowchart", "diagram")


@dataclass(frozen=True)
class ResponseConfig:
    n: int = 4  # candidate responses sampled per prompt (the paper: 4)
    temperature: float = 0.7  # sampling temperature of the candidate responses
    top_p: float = 0.9  # nucleus sampling of the candidate responses
    max_new_tokens: int = 512  # token budget of one response


@dataclass(frozen=True)
class JudgeConfig:
    template: str = "paper"  # "paper" (Figure 2), "world" (the world's own), or a file path
    # "sampled": parse "Score: n" (the paper); "expected": E[score token] (loop/expected_score.py); "vote":
    # 5 x the share of the prompt's responses giving the same answer, no LLM judge (loop/vote.py, ScPO)
    mode: str = "sampled"
    k: int = 3  # sampled judgments per response, averaged
    temperature: float = 0.7  # sampling temperature of the judgments
    top_p: float = 0.9  # nucleus sampling of the judgments
    max_new_tokens: int = 256  # below ~150 the justification eats the budget before "Score:"


@dataclass(frozen=True)
class MetaConfig:
    # Meta-Rewarding (loop/meta_judge.py): the model also compares pairs of its own judgments of a response
    # (stage 3m_meta_judge), and DPO trains on judge pairs beside the actor pairs. Off: the paper's loop.
    enabled: bool = False
    # Share of DPO's pairs that are judge pairs (at most; fewer when fewer are built). The Meta-Rewarding
    # paper states none that this project holds; 0.15 is NeMo-Aligner's example (meta_judge_pcnt).
    judge_share: float = 0.15
    # Upper bound on judge_share: NeMo-Aligner saw a share above ~15% push the judge to always answer 5.
    max_judge_share: float = 0.15
    # meta-judge prompt: a file in loop/templates, a path, or "world" (loop/world/meta_template.txt: short
    # enough for the world model's 512-token context, which the paper's rubric-carrying prompt is not)
    template: str = "meta_judge.txt"
    temperature: float = 0.7  # sampling temperature of the meta-judgments
    top_p: float = 0.9  # nucleus sampling of the meta-judgments
    max_new_tokens: int = 256  # token budget of one meta-judgment (reasoning, then "Winner: Judgement A|B")
    max_comparisons: int = 3  # pairs of judgments compared per response (each in both orders); K=3 has 3
    # Meta-judge examples added to M1's SFT, built from the EFT groups (meta_judge.sft_records): a response,
    # its EFT judgment and another response's judgment of a different score, in a random order; the target
    # is the EFT judgment, then its letter. 0 = none, as in the paper, whose seed model (Llama-3-8B-Instruct)
    # follows the meta prompt zero-shot; a model that never saw one (the world's) parses no verdict without.
    sft_examples: int = 0

    def __post_init__(self):
        def bad(key, why):
            raise LoopConfigError(f"loop config: meta.{key} {why}")

        if not 0.0 < self.max_judge_share < 1.0:
            bad("max_judge_share", "must be in (0, 1)")
        if not 0.0 <= self.judge_share <= self.max_judge_share:
            bad("judge_share", f"= {self.judge_share} must be in [0, meta.max_judge_share={self.max_judge_share}] "
                "(a larger share pushes the judge toward always 5; raise meta.max_judge_share to allow it)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if self.max_new_tokens <= 0:
            bad("max_new_tokens", "must be positive")
        if self.max_comparisons <= 0:
            bad("max_comparisons", "must be positive")
        if not isinstance(self.sft_examples, int) or isinstance(self.sft_examples, bool) or self.sft_examples < 0:
            bad("sft_examples", f"= {self.sft_examples!r} must be an integer >= 0")


@dataclass(frozen=True)
class PairsConfig:
    min_scored: int = 2  # responses with a valid mean score needed to form a pair
    min_gap: float = 0.0  # drop pairs whose chosen - rejected score gap is <= this (0 = only exact ties)
    length_control: bool = False  # chosen = the shortest response within length_margin of the top score
    length_margin: float = 0.0  # score margin of length_control
    # pair distinct response texts, each scored by the mean over the samples that wrote it (loop/pairs.py);
    # false: the paper's rule, chosen and rejected are samples and may be the same text
    distinct_texts: bool = False


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = True  # evaluate each model (false: train only)
    sft_baseline: bool = True  # train the IFT-only baseline and compare against it
    max_new_tokens: int = 512  # token budget of one eval response
    temperature: float = 0.0  # eval generations: greedy by default
    top_p: float = 1.0  # nucleus sampling of eval generations (with temperature > 0)
    reward_metrics: bool = True  # Table 4 metrics of each model as judge on eft_eval
    judge_k: int = 1  # judgments per EFT-eval example for the reward metrics
    judge_temperature: float = 0.0  # sampling temperature of the reward-metric judgments (0 = greedy)
    # Self-pair accuracy (loop/self_pairs.py): on this many held-out prompts the model samples responses and
    # judges them as AIFT stages 2-3 do, and the grader says whether the judge orders them right. Needs a
    # grader (data.source = world); 0 = off.
    self_pairs: int = 100
    # Head to head without a grader (the paper's GPT-4 evaluation): a pairwise judge compares each model's
    # answers with the SFT baseline's and the previous model's, in both presentation orders.
    pairwise: bool = True
    pairwise_judge: str | None = None  # judge checkpoint (HF/Meta dir or .gguf); None: the model being evaluated
    pairwise_template: str = "pairwise_judge.txt"  # file in loop/templates or a path
    # The user's prompt set (JSONL {"id"?, "prompt" | "instruction", "dataset"?}, e.g. AlpacaEval's) in place
    # of the held-out eval prompts; eval/<model>/alpaca_eval.json is written for it. None: held-out prompts.
    prompts_path: str | None = None


@dataclass(frozen=True)
class SelectConfig:
    # Checkpoint selection (the paper): DPO also exports a candidate every select.every steps, and
    # M(t+1) is the candidate whose answers on held-out validation prompts win most often against M(t)'s,
    # judged pairwise in both orders (eval.pairwise_template) by eval.pairwise_judge or, when none is
    # given, by M(t): one fixed judge for every candidate. Off: M(t+1) is the last step's weights.
    enabled: bool = False
    every: int = 0  # DPO steps between candidates; 0: dpo.checkpoint_every (the last step is always one)
    prompts: int = 32  # validation prompts; the world draws fresh ones (none in the seed splits)
    prompts_path: str | None = None  # JSONL {"id"?, "prompt"}: the validation set (needed unless data.source = world)
    max_new_tokens: int = 0  # token budget of a validation answer; 0: eval.max_new_tokens


@dataclass(frozen=True)
class LoopConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompts: PromptGenConfig = field(default_factory=PromptGenConfig)
    responses: ResponseConfig = field(default_factory=ResponseConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    sft: TrainConfig = field(default_factory=sft_config)
    dpo: DPOConfig = field(default_factory=dpo_config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    select: SelectConfig = field(default_factory=SelectConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of everything that shapes the results (not where the run directory lives)."""
        d = self.to_dict()
        d["run"].pop("run_dir")
        d["run"].pop("log_to")  # where metrics go changes no artifact: a resume may add or drop a logger
        d["run"].pop("nodes")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def validate(self) -> "LoopConfig":
        def bad(key, why):
            raise LoopConfigError(f"loop config: {key} {why}")

        if self.run.iterations < 0:
            bad("run.iterations", "must be >= 0")
        if self.run.chunk_size <= 0:
            bad("run.chunk_size", "must be positive")
        if self.run.nodes < 1:
            bad("run.nodes", "must be >= 1")
        if self.model.tensor_parallel not in (1, 2, 4, 8):
            bad("model.tensor_parallel", f"= {self.model.tensor_parallel}: must be 1, 2, 4 or 8")
        if self.model.tensor_parallel > 1 and self.judge.mode == "expected":
            # the expected score is one forward of rank 0's model; a tensor-parallel shard needs its group
            bad("judge.mode", "= 'expected' is not supported with model.tensor_parallel > 1 (use sampled)")
        for name in self.run.log_to:
            if name not in SINKS:
                bad("run.log_to", f"has {name!r}: unknown (known: {', '.join(SINKS)})")
        if self.data.source not in ("world", "oasst", "jsonl", "hf"):
            bad("data.source", f"is {self.data.source!r}: unknown (known: world, oasst, jsonl, hf)")
        if self.data.source == "oasst" and not self.data.oasst_path:
            bad("data.oasst_path", "is required when data.source = oasst")
        if self.data.source != "world" and self.model.init == "world":
            bad("model.init", f"must be a checkpoint path when data.source = {self.data.source}")
        user_paths = ("ift_path", "eft_path", "eft_eval_path", "eval_path")
        if self.data.source in ("jsonl", "hf"):
            if not self.data.ift_path:
                bad("data.ift_path", f"is required when data.source = {self.data.source}")
            if self.data.eft_eval_path and not self.data.eft_path:
                bad("data.eft_eval_path", "needs data.eft_path (the EFT training rows)")
            if self.eval.enabled and not self.data.eval_path and self.eval.prompts_path is None:
                bad("data.eval_path", f"is required when data.source = {self.data.source} and eval.enabled "
                    "(or set eval.prompts_path)")
        else:
            for name in user_paths:  # silently unused, a user would think their data went in
                if getattr(self.data, name) is not None:
                    bad(f"data.{name}", f"is only read when data.source = jsonl or hf (it is {self.data.source})")
        if not 0.0 <= self.data.eft_eval_fraction < 1.0:
            bad("data.eft_eval_fraction", "must be in [0, 1)")
        wep = self.data.world_eval_prompts
        if wep is not None and (not isinstance(wep, int) or isinstance(wep, bool) or wep <= 0):
            bad("data.world_eval_prompts", f"= {wep!r} must be a positive integer or null")
        if wep is not None and self.data.source != "world":
            bad("data.world_eval_prompts", "needs data.source = world (other sources bring their eval prompts)")
        if self.data.eft_own_samples < 0:
            bad("data.eft_own_samples", "must be >= 0")
        if self.data.eft_own_samples and self.data.source != "world":
            bad("data.eft_own_samples", "needs data.source = world (its grader labels the samples)")
        for key in ("prompts.num_prompts", "responses.n", "judge.k", "prompts.max_new_tokens",
                    "responses.max_new_tokens", "judge.max_new_tokens", "eval.max_new_tokens", "eval.judge_k"):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) <= 0:
                bad(key, "must be positive")
        if self.eval.self_pairs < 0:
            bad("eval.self_pairs", "must be >= 0 (0 = off)")
        if self.prompts.attempts_factor < 1.0:
            bad("prompts.attempts_factor", "must be >= 1")
        if self.responses.n < 2:
            bad("responses.n", "must be >= 2 (a pair needs two responses)")
        for key in ("prompts.top_p", "responses.top_p", "judge.top_p", "eval.top_p"):
            section, name = key.split(".")
            if not 0.0 < getattr(getattr(self, section), name) <= 1.0:
                bad(key, "must be in (0, 1]")
        if self.judge.template not in ("paper", "world") and not Path(self.judge.template).is_file():
            bad("judge.template", f"is {self.judge.template!r}: not 'paper', 'world' or a file")
        if self.judge.mode not in ("sampled", "expected", "vote"):
            bad("judge.mode", f"is {self.judge.mode!r}: unknown (known: sampled, expected, vote)")
        if self.judge.mode == "vote" and self.meta.enabled:
            bad("meta.enabled", "needs an LLM judge to meta-judge (judge.mode sampled or expected, not vote)")
        if self.judge.template == "world" and self.data.source != "world":
            bad("judge.template", "= 'world' needs data.source = world")
        if self.meta.enabled and self.meta.template == "world" and self.data.source != "world":
            bad("meta.template", "= 'world' needs data.source = world")
        if self.eval.pairwise_judge is not None and not Path(self.eval.pairwise_judge).exists():
            bad("eval.pairwise_judge", f"is {self.eval.pairwise_judge!r}: no such checkpoint")
        if not ((Path(__file__).resolve().parent / "templates" / self.eval.pairwise_template).is_file()
                or Path(self.eval.pairwise_template).is_file()):
            bad("eval.pairwise_template", f"is {self.eval.pairwise_template!r}: not a file in loop/templates or a path")
        if self.eval.prompts_path is not None and not Path(self.eval.prompts_path).is_file():
            bad("eval.prompts_path", f"is {self.eval.prompts_path!r}: no such file")
        if self.select.enabled:
            if self.select.prompts_path is None and self.data.source != "world":
                bad("select.prompts_path", "is required when select.enabled and data.source is not world")
            if self.select.prompts_path is not None and not Path(self.select.prompts_path).is_file():
                bad("select.prompts_path", f"is {self.select.prompts_path!r}: no such file")
            if self.select.every < 0:
                bad("select.every", "must be >= 0")
            if self.select.prompts <= 0:
                bad("select.prompts", "must be positive")
            if self.select.max_new_tokens < 0:
                bad("select.max_new_tokens", "must be >= 0")
        if not 0.0 <= self.prompts.rouge_threshold <= 1.0:
            bad("prompts.rouge_threshold", "must be in [0, 1]")
        if self.pairs.min_scored < 2:
            bad("pairs.min_scored", "must be >= 2")
        for section in ("sft", "dpo"):
            try:
                getattr(self, section).validate(world_size=1)
            except ConfigError as e:
                raise LoopConfigError(f"loop config: {section}.{str(e).removeprefix('train config: ')}") from None
        return self


def _coerce(key: str, value, tp):
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        last = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except LoopConfigError as e:
                last = e
        raise last
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise LoopConfigError(f"loop config: {key}={value!r} must be a list")
        args = typing.get_args(tp)
        item = args[0]
        return tuple(_coerce(f"{key}[{i}]", v, args[i] if args[-1] is not Ellipsis else item) for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise LoopConfigError(f"loop config: {key}={value!r} must be a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise LoopConfigError(f"loop config: {key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LoopConfigError(f"loop config: {key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LoopConfigError(f"loop config: {key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise LoopConfigError(f"loop config: {key}={value!r} must be a string")
        return value
    raise LoopConfigError(f"loop config: {key} has unsupported type {tp}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise LoopConfigError(f"loop config: {prefix or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    moved = [m for key in unknown if prefix in ("sft.", "dpo.") and (m := moved_key_message(prefix[:-1], key))]
    if moved:
        raise LoopConfigError(f"loop config: {moved[0]}")
    if unknown:
        raise LoopConfigError(f"loop config: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if prefix == "" and name in ("sft", "dpo"):
                value = deep_merge(getattr(LoopConfig(), name).to_dict(), value or {})  # dpo.objective: key by key
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise LoopConfigError(f"loop config: override {key}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise LoopConfigError(f"loop config: override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _derive_seeds(tree: dict) -> dict:
    """run.seed is the one seed a user sets: sft.seed, dpo.seed and (world data) data.world.seed follow it
    unless set on their own. Filled into the tree, so the config hash and the manifest show them."""
    run = tree.get("run")
    seed = run.get("seed", RunConfig.seed) if isinstance(run, dict) else RunConfig.seed
    out = dict(tree)
    for section in ("sft", "dpo"):
        value = out.get(section)
        if value is None or isinstance(value, dict):
            out[section] = {"seed": seed, **(value or {})}
    data = out.get("data")
    data = dict(data) if isinstance(data, dict) else ({} if data is None else data)
    if isinstance(data, dict) and data.get("source", DataConfig.source) == "world":
        world = data.get("world")
        if world is None or isinstance(world, dict):
            data["world"] = {"seed": seed, **(world or {})}
        out["data"] = data
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> LoopConfig:
    """YAML file (or defaults when None) + key=value overrides -> validated LoopConfig."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise LoopConfigError(f"loop config: file {path} not found") from None
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
            raise LoopConfigError(f"{path}:{line}: invalid YAML") from None
    tree = deep_merge(tree, parse_overrides(list(overrides)))
    return _build(LoopConfig, _derive_seeds(tree), "").validate()


def config_from_dict(d: dict) -> LoopConfig:
    return _build(LoopConfig, _derive_seeds(d), "").validate()
