"""TrainConfig: the typed description of one SFT or DPO stage, checked before any work starts.

TrainConfig holds what every stage shares (schedule, batching, engine); the loss has its own section:
DPOConfig is a TrainConfig plus `objective` (DPOObjectiveConfig: beta, loss_type, label_smoothing,
nll_weight), read by engine/objectives.py. SFT's loss has nothing to set. The DeepSpeed JSON is derived
from TrainConfig (engine/ds_config.py), never hand-edited; a user JSON may override keys on top. Paper
defaults (Yuan et al. 2024): SFT lr 5.5e-6 -> 1.1e-6 cosine, DPO 1e-6 -> 1e-7, global batch 16, dropout 0.1.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import ConfigError

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
DTYPES = ("auto", "bf16", "fp32")
BACKENDS = ("auto", "deepspeed", "torch")
# Keys that left TrainConfig: where each went (None: removed). Configs that still set one get a
# one-line error naming the new key instead of "unknown key".
MOVED_KEYS = {"beta": "objective.beta", "loss_type": "objective.loss_type",
              "label_smoothing": "objective.label_smoothing", "nll_weight": "objective.nll_weight",
              "fused_objective": None}


def moved_key_message(section: str, key: str) -> str | None:
    """The one-line error for a key of MOVED_KEYS set in loop config `section` ("sft", "dpo"; "" for a
    TrainConfig built in Python), else None."""
    if key not in MOVED_KEYS:
        return None
    if MOVED_KEYS[key] is None:
        where = f"{section}." if section else ""
        return f"{where}{key} was removed: the fused sequence_objective is the only loss path"
    if section == "":
        return f"{key} moved to DPOConfig.{MOVED_KEYS[key]} (engine.config.DPOConfig.extend(cfg, {key}=...))"
    if section == "dpo":
        return f"dpo.{key} moved to dpo.{MOVED_KEYS[key]}"
    return f"{section}.{key} moved to dpo.{MOVED_KEYS[key]} (only the DPO stage has this objective)"


class TrainConfigError(ConfigError):
    """A training config that cannot run; the message is one line naming the key."""


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 5.5e-6  # peak learning rate
    min_lr: float = 1.1e-6  # floor of the cosine decay
    warmup_steps: int = 0  # linear warmup to lr over this many optimizer steps
    epochs: int = 1  # passes over the data
    max_steps: int = 0  # 0 = run the epochs; otherwise stop (and end the schedule) here
    global_batch: int = 16  # sequences (SFT) or pairs (DPO) per optimizer step, all ranks together
    micro_batch: int = 4  # per rank per forward; gradient accumulation makes up the rest
    grad_clip: float = 1.0  # 0 = off
    weight_decay: float = 0.0  # AdamW decoupled weight decay (matrices only, not norm gains)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta1, beta2)
    adam_eps: float = 1e-8  # AdamW epsilon
    zero_stage: int = 3  # DeepSpeed ZeRO stage 0-3 (3: parameters, gradients and optimizer state sharded)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state (and step) on the CPU
    # ZeRO-3 keeps params below this many elements whole on every rank. 0 shards everything (the
    # honest memory split; DeepSpeed's 1e5 default trades memory for fewer all-gathers on big models).
    param_persistence_threshold: int = 0
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    dropout: float = 0.1  # overrides the model config's residual dropout for training
    seed: int = 0  # data order and dropout (per rank)
    checkpoint_every: int = 100  # optimizer steps between resumable checkpoints; 0 = none
    keep_checkpoints: bool = False  # keep out_dir.ckpt after a successful export
    log_every: int = 10  # optimizer steps between log lines (and host syncs of the losses)
    # data
    max_seq_len: int = 0  # 0 = the model's max_seq_len; longer examples are cut on the right
    pad_to_multiple: int = 0  # 0 = auto: 8 on CUDA (tensor-core shapes), 1 on CPU
    length_grouped: bool = True  # batch examples of similar length together (less padding)
    ref_micro_batch: int = 0  # batch of the reference log-prob pass; 0 = 2 x micro_batch
    # engine
    backend: str = "auto"  # auto: DeepSpeed when several ranks (or offload), plain torch in one process
    ds_config_override: str | None = None  # path to a DeepSpeed JSON merged over the derived config
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (memory for time)
    kernel_impl: str = "auto"  # kernels impl: auto | torch | triton
    compile: bool = False  # torch.compile each decoder layer (both backends; pays off on GPU)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names and (message := moved_key_message("", key)):
                raise TrainConfigError(f"train config: {message}")
        unknown = set(d) - names
        if unknown:
            raise TrainConfigError(f"train config: unknown key(s) {sorted(unknown)}")
        d = dict(d)
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)

    def for_world(self, world_size: int) -> "TrainConfig":
        """This config on `world_size` ranks: micro_batch lowered to the largest size that divides
        global_batch / world_size, so a config that runs on one rank runs on N with the same global
        batch (the gradient is the same sum over the same examples, in other micro-batches)."""
        if world_size < 1 or self.global_batch <= 0 or self.micro_batch <= 0:
            return self
        if self.global_batch % self.micro_batch:
            return self  # does not run on one rank either: validate() names the key
        if self.global_batch % world_size:
            raise TrainConfigError(f"train config: global_batch={self.global_batch} cannot be split over "
                                   f"{world_size} ranks (it must be a multiple of the world size)")
        per_rank = self.global_batch // world_size
        micro = max(m for m in range(1, min(self.micro_batch, per_rank) + 1) if per_rank % m == 0)
        return self if micro == self.micro_batch else dataclasses.replace(self, micro_batch=micro)

    def grad_accum(self, world_size: int) -> int:
        return self.global_batch // (self.micro_batch * world_size)

    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Raise TrainConfigError (one line, naming the key) for a config that cannot run."""
        def bad(key, why):
            raise TrainConfigError(f"train config: {key}={getattr(self, key)!r} {why}")

        for key in ("global_batch", "micro_batch", "epochs"):
            if getattr(self, key) <= 0:
                bad(key, "must be positive")
        for key in ("max_steps", "warmup_steps", "checkpoint_every", "max_seq_len", "ref_micro_batch",
                    "pad_to_multiple", "param_persistence_threshold", "grad_clip", "weight_decay",
                    "min_lr"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.log_every <= 0:
            bad("log_every", "must be positive")
        if self.global_batch % (self.micro_batch * world_size):
            bad("global_batch", f"is not divisible by micro_batch x world_size = {self.micro_batch} x {world_size}")
        if not self.lr > 0:
            bad("lr", "must be positive")
        if self.min_lr > self.lr:
            bad("min_lr", f"exceeds lr={self.lr}")
        if self.dtype not in DTYPES:
            bad("dtype", f"is unknown (known: {', '.join(DTYPES)})")
        if self.backend not in BACKENDS:
            bad("backend", f"is unknown (known: {', '.join(BACKENDS)})")
        if self.kernel_impl not in ("auto", "torch", "triton"):
            bad("kernel_impl", "is unknown (known: auto, torch, triton)")
        if self.zero_stage not in (0, 1, 2, 3):
            bad("zero_stage", "must be 0, 1, 2 or 3")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            bad("adam_betas", "must be two numbers in [0, 1)")
        if self.ds_config_override is not None:
            path = Path(self.ds_config_override)
            if not path.is_file():
                bad("ds_config_override", "is not a file")
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise TrainConfigError(f"{path}:{e.lineno}: ds_config_override is not valid JSON: {e.msg}") from None
        return self


@dataclass(frozen=True)
class DPOObjectiveConfig:
    beta: float = 0.1  # DPO: strength of the KL anchor to the reference model
    loss_type: str = "sigmoid"  # DPO loss: sigmoid (the paper) | ipo | hinge | robust
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped preference labels
    nll_weight: float = 0.0  # RPO: + nll_weight * mean per-token NLL of the chosen response

    def replace(self, **changes) -> "DPOObjectiveConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "DPOObjectiveConfig":
        """Raise TrainConfigError (one line, naming objective.<key>) for an objective that cannot run."""
        def bad(key, why):
            raise TrainConfigError(f"train config: objective.{key}={getattr(self, key)!r} {why}")

        if self.loss_type not in LOSS_TYPES:
            bad("loss_type", f"is unknown (known: {', '.join(LOSS_TYPES)})")
        if not self.beta > 0:
            bad("beta", "must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            bad("label_smoothing", "must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type in ("ipo", "hinge"):
            bad("label_smoothing", f"applies only to loss_type sigmoid or robust, not {self.loss_type!r}")
        if self.nll_weight < 0:
            bad("nll_weight", "must be >= 0")
        return self


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """A DPO stage: the shared training keys plus the objective's own section."""
    objective: DPOObjectiveConfig = field(default_factory=DPOObjectiveConfig)  # the DPO loss (dpo.objective.*)

    @classmethod
    def from_dict(cls, d: dict) -> "DPOConfig":
        d = dict(d)
        objective = d.pop("objective", {})
        if isinstance(objective, DPOObjectiveConfig):
            objective = dataclasses.asdict(objective)
        names = {f.name for f in dataclasses.fields(DPOObjectiveConfig)}
        unknown = set(objective) - names
        if unknown:
            raise TrainConfigError(f"train config: unknown key(s) {sorted(f'objective.{k}' for k in unknown)}")
        base = TrainConfig.from_dict(d)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig)},
                   objective=DPOObjectiveConfig(**objective))

    @classmethod
    def extend(cls, cfg: TrainConfig, **objective) -> "DPOConfig":
        """cfg's training keys with a DPO objective (DPOObjectiveConfig fields; unset ones keep defaults)."""
        shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
        base = cfg.objective if isinstance(cfg, DPOConfig) else DPOObjectiveConfig()
        return cls(**shared, objective=base.replace(**objective))

    def validate(self, world_size: int = 1) -> "DPOConfig":
        super().validate(world_size)
        self.objective.validate()
        return self


def sft_config(**overrides) -> TrainConfig:
    """The paper's SFT stage (M0 -> M1 on IFT+EFT)."""
    return TrainConfig(**{"lr": 5.5e-6, "min_lr": 1.1e-6, **overrides})


def dpo_config(**overrides) -> DPOConfig:
    """The paper's DPO stage (Mt -> Mt+1 on self-judged pairs): sigmoid loss, beta 0.1."""
    return DPOConfig(**{"lr": 1e-6, "min_lr": 1e-7, **overrides})
