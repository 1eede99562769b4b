"""WorldConfig: sizes of the seed data, the tiny model and its pretraining budget (typed, checked)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from model.config import PRESETS, ConfigError

from .tasks import DEFAULT_FAMILIES, FAMILIES

# d128, 4 layers: small enough to pretrain in ~1-2 minutes on 2 cores and learn this world.
DEFAULT_MODEL_OVERRIDES = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 384,
                           "max_seq_len": 512}


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    # seed data (counts of instructions; EFT counts are groups of `eft_group_size` ranked responses)
    n_ift: int = 1000
    n_eft_train: int = 300
    n_eft_eval: int = 60
    n_eval_prompts: int = 200
    eft_group_size: int = 4
    # task families of this world (loop/world/families FAMILIES); seed data, corpus and the prompt filter use
    # only these
    families: tuple = DEFAULT_FAMILIES
    # model and tokenizer
    model_preset: str = "tiny"
    model_overrides: dict = field(default_factory=lambda: dict(DEFAULT_MODEL_OVERRIDES))
    tokenizer_vocab_size: int = 768
    chat_template: str = "llama2"
    # M0 pretraining (plain next-token loss on the world's corpus; steps, not seconds, so it is reproducible)
    corpus_docs: int = 12000
    # share of the corpus that is number lists written twice (corpus.py CorpusMix.copy: in-context copying)
    corpus_copy_share: float = 0.0
    # share that is single review checks, true or false half the time each (CorpusMix.checks: the verdict step)
    corpus_check_share: float = 0.0
    # share that is lookup drills of the families that have them (CorpusMix.lookups; pick_labeled, pick_missing)
    corpus_lookup_share: float = 0.0
    # False: no task-with-answer documents (CorpusMix.qa = 0), so the families' answers come from SFT alone while
    # their checks are still read in reviews, check documents and drills (a pretrained verifier, not a generator)
    corpus_answers: bool = True
    pretrain_steps: int = 800
    pretrain_batch: int = 16
    pretrain_seq_len: int = 256
    pretrain_lr: float = 3e-3
    pretrain_min_lr: float = 3e-4
    pretrain_warmup: int = 30
    pretrain_weight_decay: float = 0.01
    init_std: float = 0.02

    def __post_init__(self):
        for key in ("n_ift", "n_eft_train", "n_eft_eval", "n_eval_prompts", "corpus_docs", "pretrain_steps",
                    "pretrain_batch", "pretrain_seq_len", "tokenizer_vocab_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"world config: {key}={value!r} must be a positive integer")
        if isinstance(self.families, str) or not isinstance(self.families, (list, tuple)) or not self.families:
            raise ConfigError(f"world config: families={self.families!r} must be a non-empty list of family names")
        object.__setattr__(self, "families", tuple(self.families))  # YAML gives a list; the hash sees a list
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or len(set(self.families)) != len(self.families):
            raise ConfigError(f"world config: families={list(self.families)} has unknown or repeated names "
                              f"(known: {', '.join(FAMILIES)})")
        if self.eft_group_size < 2:
            raise ConfigError(f"world config: eft_group_size={self.eft_group_size} must be >= 2 (a ranking)")
        if self.model_preset not in PRESETS:
            raise ConfigError(f"world config: model_preset={self.model_preset!r} is not a preset "
                              f"(known: {', '.join(PRESETS)})")
        if not 256 <= self.tokenizer_vocab_size <= 32000:
            raise ConfigError(f"world config: tokenizer_vocab_size={self.tokenizer_vocab_size} must be in [256, 32000]")
        if self.chat_template not in ("llama2", "llama3", "chatml"):
            raise ConfigError(f"world config: chat_template={self.chat_template!r} must be llama2|llama3|chatml")
        for key in ("corpus_copy_share", "corpus_check_share", "corpus_lookup_share"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"world config: {key}={getattr(self, key)} must be in [0, 1)")
        if self.corpus_copy_share + self.corpus_check_share + self.corpus_lookup_share >= 1.0:
            raise ConfigError("world config: corpus_copy_share + corpus_check_share + corpus_lookup_share must be < 1 "
                              "(the task documents need a share)")
        if not isinstance(self.corpus_answers, bool):
            raise ConfigError(f"world config: corpus_answers={self.corpus_answers!r} must be true or false")
        for key in ("pretrain_lr", "pretrain_min_lr", "init_std"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"world config: {key}={getattr(self, key)} must be positive")
        self.model_config()  # bad overrides fail here, naming the key

    def model_config(self):
        from model.config import preset

        overrides = dict(self.model_overrides)
        overrides["vocab_size"] = self.tokenizer_vocab_size
        if self.pretrain_seq_len > overrides.get("max_seq_len", PRESETS[self.model_preset].max_seq_len):
            raise ConfigError(f"world config: pretrain_seq_len={self.pretrain_seq_len} exceeds the model's max_seq_len")
        try:
            return preset(self.model_preset, bos_token_id=1, eos_token_id=2, **overrides)
        except TypeError as e:
            raise ConfigError(f"world config: model_overrides: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"world config: unknown key(s) {sorted(unknown)}")
        return cls(**d)
