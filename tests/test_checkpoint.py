"""Checkpoints in and out: HF round trips against transformers, sharding, Meta model-parallel shards,
GGUF (permuted q/k, quantized types), and the one-line errors for bad inputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import CheckpointError, load_pretrained, open_checkpoint, save_pretrained, save_state_dict
from model.config import LlamaConfig, RopeScaling
from model.llama import Llama
from model.tokenizer import load_tokenizer
from test_model_parity import CONFIGS, TOL, hf_twin, random_model

transformers = pytest.importorskip("transformers")


def logits(model, seed=0, T=11):
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(ids)
    return ids, out


@pytest.mark.parametrize("name", ["mha_untied", "gqa_llama3_rope", "gqa_tied"])
def test_save_pretrained_loads_in_transformers(tmp_path, name):
    model = random_model(CONFIGS[name], seed=5)
    save_pretrained(model, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == "float32" and cfg["tie_word_embeddings"] == model.config.tie_embeddings
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert hf.model.rotary_emb.rope_type == ("llama3" if model.config.rope_scaling else "default")
    ids, ours = logits(model)
    with torch.no_grad():
        assert (hf(ids).logits - ours).abs().max().item() < TOL
    # No leftovers of the atomic write beside the checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_transformers_checkpoint_loads(tmp_path):
    model = random_model(CONFIGS["gqa_llama3_rope"], seed=6)
    hf_twin(model).save_pretrained(tmp_path / "hf")
    loaded = load_pretrained(tmp_path / "hf")
    assert loaded.config == model.config.replace(norm_eps=model.config.norm_eps, bos_token_id=loaded.config.bos_token_id,
                                                 eos_token_id=loaded.config.eos_token_id)
    assert loaded.source_format == "hf" and loaded.inv_freq.dtype == torch.float32
    ids, ours = logits(model)
    with torch.no_grad():
        assert (loaded(ids) - ours).abs().max().item() < TOL
    half = load_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert half.inv_freq.dtype == torch.float32


def test_sharded_round_trip(tmp_path):
    model = random_model(CONFIGS["gqa_tied"], seed=7)
    save_pretrained(model, tmp_path / "ckpt", max_shard_size="20KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and "lm_head.weight" not in index["weight_map"]  # tied: embedding only
    ids, ours = logits(model)
    with torch.no_grad():
        assert (load_pretrained(tmp_path / "ckpt")(ids) - ours).abs().max().item() == 0.0
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
        assert (hf(ids).logits - ours).abs().max().item() < TOL
    # transformers' own sharded output loads too.
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="20KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert (load_pretrained(tmp_path / "hf_sharded")(ids) - ours).abs().max().item() < TOL


def test_open_checkpoint_fills_an_existing_model(tmp_path):
    """What a ZeRO-3 trainer does: build the model itself, copy each tensor in as it is read."""
    model = random_model(CONFIGS["gqa_llama3_rope"], seed=12)
    save_pretrained(model, tmp_path / "ckpt", max_shard_size="30KB")
    reader = open_checkpoint(tmp_path / "ckpt")
    assert reader.config == model.config and reader.names() == [n for n, _ in model.named_parameters()]
    target = Llama(reader.config)
    with torch.no_grad():
        for name, p in target.named_parameters():
            p.copy_(reader.get(name))
    ids, ours = logits(model)
    with torch.no_grad():
        assert torch.equal(target.eval()(ids), ours)


def test_checkpoint_carries_its_tokenizer(tmp_path):
    fixture = Path(__file__).parent / "fixtures" / "llama2-spm"
    model = random_model(CONFIGS["mha_untied"])
    save_pretrained(model, tmp_path / "from_dir", tokenizer_dir=fixture)
    assert sorted(p.name for p in (tmp_path / "from_dir").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model"]
    tok = load_tokenizer(tmp_path / "from_dir")
    save_pretrained(model, tmp_path / "from_object", tokenizer_dir=tok)
    again = load_tokenizer(tmp_path / "from_object")
    assert again.encode("Hello world") == tok.encode("Hello world") == [1, 15043, 3186]
    assert (tmp_path / "from_object" / "tokenizer_config.json").exists()


def test_save_state_dict_bf16_and_overwrite(tmp_path):
    model = random_model(CONFIGS["mha_untied"], seed=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # as the trainer's gathered export
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("from an older export")
    save_state_dict(state, model.config, target, dtype=torch.bfloat16)
    assert not (target / "stale.txt").exists()
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(target)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, state["lm_head.weight"].bfloat16())


def test_failed_save_leaves_nothing(tmp_path):
    model = random_model(CONFIGS["mha_untied"])
    state = model.state_dict()
    del state["layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        save_state_dict(state, model.config, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- Meta format ----------------------------------------------------------------------------------
def half_to_interleaved(w, n_heads):
    """Meta's q/k row order from HF's (the inverse of what the loader undoes), written independently."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_meta_two_model_parallel_shards(tmp_path, style):
    # Meta's FFN sizing: int(2 * 4 * 64 / 3) = 170 (x1.3 = 221 for llama3) rounded up to multiple_of=32.
    c = LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192 if style == "llama2" else 224,
                    max_seq_len=4096, rope_theta=10000.0 if style == "llama2" else 500000.0,
                    rope_scaling=None if style == "llama2" else RopeScaling())
    model = random_model(c, seed=9)
    sd = model.state_dict()
    meta = {"tok_embeddings.weight": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    names = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
             "gate_proj": "feed_forward.w1", "down_proj": "feed_forward.w2", "up_proj": "feed_forward.w3"}
    for i in range(c.n_layers):
        for ours, theirs in names.items():
            group = "self_attn" if ours.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            w = sd[f"layers.{i}.{group}.{ours}.weight"]
            if ours == "q_proj":
                w = half_to_interleaved(w, c.n_heads)
            elif ours == "k_proj":
                w = half_to_interleaved(w, c.n_kv_heads)
            meta[f"layers.{i}.{theirs}.weight"] = w
        meta[f"layers.{i}.attention_norm.weight"] = sd[f"layers.{i}.input_layernorm.weight"]
        meta[f"layers.{i}.ffn_norm.weight"] = sd[f"layers.{i}.post_attention_layernorm.weight"]
    embed_dim = 1 if style == "llama2" else 0  # Llama 2 splits the embedding dim, Llama 3 the vocabulary
    split = {k: (1 if k.endswith(("wo.weight", "w2.weight")) else embed_dim if k.startswith("tok_") else
                 None if "norm" in k else 0) for k in meta}
    for rank in range(2):
        shard = {k: (v if split[k] is None else v.chunk(2, dim=split[k])[rank]).clone() for k, v in meta.items()}
        shard["rope.freqs"] = torch.zeros(c.head_dim // 2)  # present in Llama 2 files, ignored
        torch.save(shard, tmp_path / f"consolidated.{rank:02d}.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1 if style == "llama2" else 96,
              "multiple_of": 32, "norm_eps": 1e-5}
    if style == "llama3":
        params.update(ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True)
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded = load_pretrained(tmp_path)
    assert loaded.config.ffn_dim == c.ffn_dim and loaded.config.vocab_size == 96
    assert loaded.config.rope_scaling == c.rope_scaling and loaded.source_format == "meta"
    ids, ours = logits(model)
    with torch.no_grad():
        assert (loaded(ids) - ours).abs().max().item() == 0.0


# --- GGUF -----------------------------------------------------------------------------------------
def write_gguf(path, model, qtype="F32", drop=()):
    """A llama.cpp-style GGUF of model: q/k rows interleaved as llama.cpp's converter does."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            key = f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"
        else:
            key = names[name]
        if key in drop:
            continue
        t = t.float().numpy()
        if key.endswith("attn_q.weight"):
            t = half_to_interleaved(torch.from_numpy(t), c.n_heads).numpy()
        elif key.endswith("attn_k.weight"):
            t = half_to_interleaved(torch.from_numpy(t), c.n_kv_heads).numpy()
        if qtype == "F32" or t.ndim == 1:
            w.add_tensor(key, np.ascontiguousarray(t))
        elif qtype == "F16":
            w.add_tensor(key, t.astype(np.float16))
        else:
            q = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(key, quantize(t, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name", ["gqa_tied", "mha_untied"])
def test_gguf_f32_matches(tmp_path, name):
    model = random_model(CONFIGS[name].replace(max_seq_len=128), seed=10)
    loaded = load_pretrained(write_gguf(tmp_path / "m.gguf", model))
    assert loaded.config.tie_embeddings == model.config.tie_embeddings and loaded.source_format == "gguf"
    ids, ours = logits(model)
    with torch.no_grad():
        assert (loaded(ids) - ours).abs().max().item() < 1e-5


# Largest error each format allows, relative to the tensor's largest |w| (about twice half a step).
QUANT_TOL = {"F16": 1e-3, "BF16": 4e-3, "Q8_0": 1 / 127, "Q4_1": 1 / 8, "Q4_0": 1 / 8}


@pytest.mark.parametrize("qtype", list(QUANT_TOL))
def test_gguf_quantized_types(tmp_path, qtype):
    c = LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    model = random_model(c, seed=11)
    loaded = load_pretrained(write_gguf(tmp_path / "m.gguf", model, qtype))
    for (name, ours), theirs in zip(model.named_parameters(), loaded.parameters()):
        err = (ours - theirs).abs().max().item()
        assert err <= QUANT_TOL[qtype] * ours.abs().max().item(), (name, err)
        assert (err > 0) == (ours.ndim == 2), (name, err)  # norms are stored F32, matrices quantized


def test_gguf_q6_k_against_reference_dequantization(tmp_path):
    """Q6_K has no quantizer in the gguf package: write random blocks, compare with the ggml layout."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    rows, cols = 8, 512
    blocks = np.zeros((rows, cols // 256, 210), np.uint8)
    blocks[..., :192] = rng.integers(0, 256, (rows, cols // 256, 192))  # ql[128], qh[64]
    blocks[..., 192:208] = rng.integers(-32, 32, (rows, cols // 256, 16)).astype(np.int8).view(np.uint8)
    blocks[..., 208:210] = np.full((rows, cols // 256, 1), 0.01, np.float16).view(np.uint8)
    ref = np.zeros((rows, cols // 256, 256), np.float32)
    for r in range(rows):
        for b in range(cols // 256):
            ql, qh = blocks[r, b, :128], blocks[r, b, 128:192]
            sc, d = blocks[r, b, 192:208].view(np.int8), float(blocks[r, b, 208:210].view(np.float16)[0])
            for half in range(2):  # ggml's dequantize_row_q6_K, 128 values per half
                for l in range(32):
                    qlh, qhh, y = ql[64 * half:], qh[32 * half:], 128 * half
                    q = [(qlh[l] & 0xF) | (((qhh[l] >> 0) & 3) << 4), (qlh[l + 32] & 0xF) | (((qhh[l] >> 2) & 3) << 4),
                         (qlh[l] >> 4) | (((qhh[l] >> 4) & 3) << 4), (qlh[l + 32] >> 4) | (((qhh[l] >> 6) & 3) << 4)]
                    for j in range(4):
                        ref[r, b, y + l + 32 * j] = d * sc[8 * half + l // 16 + 2 * j] * (int(q[j]) - 32)
    from model.gguf_format import dequantize, open_gguf

    w = gguf.GGUFWriter(str(tmp_path / "q6.gguf"), "llama")
    w.add_tensor("x", blocks.reshape(rows, -1), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = dequantize(open_gguf(tmp_path / "q6.gguf").tensors[0])
    assert got.shape == (rows, cols)
    np.testing.assert_allclose(got.numpy(), ref.reshape(rows, cols), rtol=1e-6, atol=1e-7)


# --- bad inputs: one line naming the file (and tensor) ---------------------------------------------
def assert_one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert str(part) in msg, (part, msg)


def test_truncated_safetensors(tmp_path):
    save_pretrained(random_model(CONFIGS["mha_untied"]), tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "ckpt")
    assert_one_line(e, f, "model.embed_tokens.weight")


def test_truncated_gguf(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", random_model(CONFIGS["mha_untied"]))
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 1000])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(f)
    assert_one_line(e, f)


def test_missing_shard(tmp_path):
    save_pretrained(random_model(CONFIGS["mha_untied"]), tmp_path / "ckpt", max_shard_size="20KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "ckpt" / shard).unlink()
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "ckpt")
    assert_one_line(e, tmp_path / "ckpt" / shard, "missing shard")


def test_heads_not_dividing(tmp_path):
    save_pretrained(random_model(CONFIGS["gqa_tied"]), tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["num_key_value_heads"] = 3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "ckpt")
    assert_one_line(e, cfg_file, "n_kv_heads=3")


def test_unknown_architecture_missing_tensor_and_shape_mismatch(tmp_path):
    model = random_model(CONFIGS["mha_untied"])
    save_pretrained(model, tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / "config.json"
    good = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**good, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "ckpt")
    assert_one_line(e, cfg_file, "MistralForCausalLM")
    cfg_file.write_text(json.dumps({**good, "intermediate_size": 100}))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "ckpt")
    assert_one_line(e, tmp_path / "ckpt" / "model.safetensors", "model.layers.0.mlp.gate_proj.weight", "[96, 64]")
    cfg_file.write_text(json.dumps({**good, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "ckpt")
    assert_one_line(e, tmp_path / "ckpt" / "model.safetensors", "model.layers.2.input_layernorm.weight", "missing")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(write_gguf(tmp_path / "m.gguf", model, drop={"blk.1.attn_k.weight"}))
    assert_one_line(e, tmp_path / "m.gguf", "blk.1.attn_k.weight")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tmp_path / "nowhere")
    assert_one_line(e, tmp_path / "nowhere")
