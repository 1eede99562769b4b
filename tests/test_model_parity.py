"""Our Llama against transformers.LlamaForCausalLM with the same weights (fp32, max abs diff < 1e-4)."""
import pytest
import torch

from model.config import LlamaConfig, RopeScaling
from model.llama import Llama

transformers = pytest.importorskip("transformers")

TOL = 1e-4

CONFIGS = {
    "mha_untied": LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=96,
                              max_seq_len=128),
    "gqa_tied": LlamaConfig(vocab_size=101, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=80,
                            max_seq_len=128, tie_embeddings=True, norm_eps=1e-6),
    "gqa_llama3_rope": LlamaConfig(vocab_size=89, dim=96, n_layers=3, n_heads=6, n_kv_heads=3, ffn_dim=128,
                                   rope_theta=500000.0, max_seq_len=256,
                                   rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                            original_max_position_embeddings=16)),
    "mqa_head_dim": LlamaConfig(vocab_size=64, dim=48, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=64,
                                head_dim=16, rope_theta=100000.0, max_seq_len=64, tie_embeddings=True),
}


def hf_config(c: LlamaConfig):
    """The transformers config for c, written out by hand (independent of model/hf_format.py)."""
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings)
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        rope_parameters=rope, attn_implementation="eager",
    )


def random_model(c: LlamaConfig, seed: int = 0) -> Llama:
    g = torch.Generator().manual_seed(seed)
    model = Llama(c).init_weights(std=0.1, generator=g)
    with torch.no_grad():  # norms away from 1 so a mixed-up norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def hf_twin(model: Llama):
    """A transformers LlamaForCausalLM holding model's weights (names differ only by 'model.')."""
    hf = transformers.LlamaForCausalLM(hf_config(model.config)).eval()
    assert hf.model.rotary_emb.rope_type == ("default" if model.config.rope_scaling is None else "llama3")
    state = {("model." + k): v for k, v in model.state_dict().items()}
    if model.lm_head is not None:
        state["lm_head.weight"] = state.pop("model.lm_head.weight")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if model.config.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def max_diff_on_real_tokens(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    c = CONFIGS[name]
    model = random_model(c, seed=len(name))
    hf = hf_twin(model)
    g = torch.Generator().manual_seed(1)
    for T in (1, 7, 33):  # odd lengths, and past original_max_position_embeddings for llama3
        ids = torch.randint(0, c.vocab_size, (2, T), generator=g)
        with torch.no_grad():
            ours, theirs = model(ids), hf(ids).logits
        assert ours.shape == theirs.shape == (2, T, c.vocab_size)
        assert (ours - theirs).abs().max().item() < TOL, (name, T)
    # Hidden states are what the fused log-prob kernel consumes: the same final-norm output.
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
        assert torch.allclose(hidden @ model.output_weight.T, ours, atol=1e-5)


@pytest.mark.parametrize("name", ["gqa_tied", "gqa_llama3_rope"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(name, side):
    c = CONFIGS[name]
    model = random_model(c, seed=3)
    hf = hf_twin(model)
    g = torch.Generator().manual_seed(2)
    lengths = [19, 5, 12]
    T = max(lengths)
    ids = torch.randint(0, c.vocab_size, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, T - n:] = 1
        else:
            mask[i, :n] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, positions=positions, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        assert max_diff_on_real_tokens(ours, theirs, mask) < TOL
        # Each padded row equals that sequence run alone.
        for i, n in enumerate(lengths):
            real = ids[i][mask[i].bool()][None]
            alone = model(real)[0]
            assert (ours[i][mask[i].bool()] - alone).abs().max().item() < TOL
