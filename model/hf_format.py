"""Hugging Face Llama checkpoints: config.json <-> LlamaConfig, and safetensors weights (one file, or
shards listed in model.safetensors.index.json), read lazily and written atomically."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.atomic import replace_dir

from .config import LlamaConfig, RopeScaling
from .llama import Llama
from .weight_loading import CheckpointError, CheckpointReader, make_config

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def hf_name(name: str) -> str:
    """Our parameter name -> the LlamaForCausalLM state-dict key."""
    return name if name == "lm_head.weight" else "model." + name


# --- config.json ----------------------------------------------------------------------------------
def config_from_hf(d: dict, file: str | Path) -> LlamaConfig:
    archs = d.get("architectures") or []
    if d.get("model_type") != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        raise CheckpointError(file, f"unsupported architecture model_type={d.get('model_type')!r} "
                              f"architectures={archs} (expected llama / LlamaForCausalLM)")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if d.get(key, want) != want:
            raise CheckpointError(file, f"unsupported {key}={d[key]!r} (this Llama supports {want!r})")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(d.get(key), int):
            raise CheckpointError(file, f"missing or non-integer key {key!r}")
    # transformers >= 5 writes rope_parameters (theta inside); older versions rope_theta + rope_scaling.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    elif rope_type == "default":
        scaling = None
    else:
        raise CheckpointError(file, f"unsupported rope type {rope_type!r} (supported: default, llama3)")
    n_heads = d["num_attention_heads"]
    return make_config(
        file, vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads, ffn_dim=d["intermediate_size"],
        head_dim=d.get("head_dim") or 0, norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        rope_scaling=scaling, max_seq_len=d.get("max_position_embeddings", 2048),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=_first(d.get("bos_token_id")), eos_token_id=_first(d.get("eos_token_id")),
    )


def _first(token_id):
    return token_id[0] if isinstance(token_id, list) and token_id else token_id


def config_to_hf(c: LlamaConfig, dtype: torch.dtype) -> dict:
    """config.json that transformers 4.x (rope_theta/rope_scaling) and 5.x (rope_parameters) both read."""
    scaling = None
    if c.rope_scaling is not None:
        s = c.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    dtype_name = _DTYPE_NAMES.get(dtype, "float32")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta, **(scaling or {})},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "torch_dtype": dtype_name, "dtype": dtype_name, "use_cache": True, "initializer_range": 0.02,
    }


def read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(file, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(file, f"not valid JSON ({e})") from None


# --- weights in ------------------------------------------------------------------------------------
def read_hf(directory: Path) -> CheckpointReader:
    config = config_from_hf(read_json(directory / CONFIG_FILE), directory / CONFIG_FILE)
    index_file = directory / INDEX_FILE
    if index_file.exists():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(index_file, "no 'weight_map' object")
        for shard in dict.fromkeys(weight_map.values()):
            if not (directory / shard).is_file():
                first = next(k for k, v in weight_map.items() if v == shard)
                raise CheckpointError(directory / shard, f"missing shard (listed in {INDEX_FILE}, holds "
                                      f"tensor {first!r})")
        file_for = {k: directory / v for k, v in weight_map.items()}
        default_file = index_file
    elif (directory / SINGLE_FILE).is_file():
        file_for, default_file = None, directory / SINGLE_FILE
    else:
        raise CheckpointError(directory, f"no {SINGLE_FILE} or {INDEX_FILE} (only safetensors are read)")

    handles: dict[Path, object] = {}

    def open_file(file: Path, key: str):
        if file not in handles:
            try:
                handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise CheckpointError(file, f"cannot read the safetensors file holding it ({type(e).__name__}: "
                                      f"{e})", key) from None
        return handles[file]

    def file_of(name: str) -> Path:
        key = hf_name(name)
        return file_for.get(key, default_file) if file_for is not None else default_file

    def fetch(name: str) -> torch.Tensor:
        key, file = hf_name(name), file_of(name)
        if file_for is not None and key not in file_for:
            raise CheckpointError(index_file, "missing tensor (not in weight_map)", key)
        handle = open_file(file, key)
        if key not in handle.keys():
            raise CheckpointError(file, "missing tensor", key)
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(file, f"cannot read tensor ({type(e).__name__}: {e})", key) from None

    return CheckpointReader(config, fetch, lambda n: (str(file_of(n)), hf_name(n)))


# --- weights out -----------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """'2GB' -> 2e9 bytes, '500MiB' -> 500 * 2**20 (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected an int or a string like '2GB' / '500MiB'")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def save_state_dict(state_dict: dict[str, torch.Tensor], config: LlamaConfig, directory: str | Path, *,
                    max_shard_size: int | str = "2GB", tokenizer_dir=None, dtype: torch.dtype | None = None) -> Path:
    """Write an HF Llama checkpoint from our-named tensors (a Llama's state_dict, or gathered ZeRO-3
    weights). Tied configs store only model.embed_tokens.weight. The directory appears complete or
    not at all. tokenizer_dir: a directory (or file) holding tokenizer files, or a Tokenizer to save."""
    directory = Path(directory)
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in Llama(config).named_parameters()}
    for name, shape in expected.items():
        if name not in state_dict:
            raise CheckpointError(directory, "state dict lacks tensor", name)
        if tuple(state_dict[name].shape) != shape:
            raise CheckpointError(directory, f"shape {list(state_dict[name].shape)} but the config expects "
                                  f"{list(shape)}", name)
    extra = sorted(set(state_dict) - set(expected) - {"lm_head.weight", "inv_freq"})
    if extra:
        raise CheckpointError(directory, f"state dict has unexpected tensors {extra[:3]}")
    dtype = dtype or state_dict["embed_tokens.weight"].dtype

    shards: list[list[str]] = [[]]
    limit, filled = parse_size(max_shard_size), 0
    for name in expected:
        nbytes = state_dict[name].numel() * dtype.itemsize
        if shards[-1] and filled + nbytes > limit:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        os.chmod(tmp, 0o755)
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map, total = {}, 0
        for file, shard in zip(names, shards):
            tensors = {hf_name(n): state_dict[n].detach().to("cpu", dtype).contiguous() for n in shard}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({k: file for k in tensors})
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
        if tokenizer_dir is not None:
            _copy_tokenizer(tokenizer_dir, tmp)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _copy_tokenizer(source, target: Path) -> None:
    if hasattr(source, "save"):
        source.save(target)
        return
    source = Path(source)
    files = [source] if source.is_file() else [source / f for f in TOKENIZER_FILES if (source / f).is_file()]
    if not files:
        raise CheckpointError(source, f"no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for f in files:
        shutil.copyfile(f, target / f.name)


