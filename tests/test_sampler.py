"""The Sampler end to end on tiny random models (CPU): exactness against a no-cache reference and
transformers, seeded sampling, stops, edge cases and block accounting."""
import os

import pytest
import torch

from engine.sampler import Completion, Sampler, SamplingParams, generate_distributed
from engine.sampler.runner import kv_bytes_per_block
from model.config import preset
from model.llama import Llama

BLOCK = 4


def tiny_model(dtype=torch.float64, **over):
    kw = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=96, max_seq_len=128,
              eos_token_id=None, tie_embeddings=False)
    kw.update(over)
    cfg = preset("tiny", **kw)
    # A larger init std than training's keeps logits peaked, so greedy ties cannot hide differences.
    return Llama(cfg).init_weights(std=0.15, generator=torch.Generator().manual_seed(0)).to(dtype).eval()


def blocks_bytes(model, n):
    return n * kv_bytes_per_block(model.config, BLOCK, next(model.parameters()).dtype)


def prompts_of(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def naive_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def hf_model(model):
    transformers = pytest.importorskip("transformers")
    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).to(next(model.parameters()).dtype).eval()
    sd = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if c.tie_embeddings else set())
    if c.tie_embeddings:
        hf.tie_weights()
    return hf


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model):
    prompts = prompts_of([1, 3, 9, 17, 30], model.config.vocab_size)
    return prompts, [naive_greedy(model, p, 12) for p in prompts]


def test_naive_reference_matches_transformers_generate(model, reference):
    hf = hf_model(model)
    prompts, expected = reference
    for p, e in zip(prompts, expected):
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert out[0, len(p):].tolist() == e


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("num_blocks", [200, 12])
def test_greedy_matches_no_cache_reference(model, reference, caching, num_blocks):
    prompts, expected = reference
    s = Sampler(model, kv_memory=blocks_bytes(model, num_blocks), block_size=BLOCK, max_batched_tokens=16,
                enable_prefix_caching=caching)
    out = s.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    assert [c.token_ids for c in out] == expected
    assert all(c.finish_reason == "length" for c in out)
    assert (s.stats["preemptions"] > 0) == (num_blocks == 12)
    assert s.block_manager.all_released()
    # Run again on the warm cache: hits must not change the result.
    again = s.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    assert [c.token_ids for c in again] == expected
    assert (s.stats["prefix_hit_rate"] > 0) == caching
    assert s.block_manager.all_released()


def test_shared_prefix_prompts_hit_the_cache_and_stay_exact(model):
    rubric = prompts_of([37], model.config.vocab_size, seed=5)[0]
    prompts = [rubric + tail for tail in prompts_of([2, 5, 9, 1], model.config.vocab_size, seed=6)]
    s = Sampler(model, kv_memory=blocks_bytes(model, 100), block_size=BLOCK, max_batched_tokens=64)
    out = s.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6, n=2))
    for i, p in enumerate(prompts):
        want = naive_greedy(model, p, 6)
        assert out[2 * i].token_ids == want and out[2 * i + 1].token_ids == want
    assert s.stats["prefix_hit_rate"] > 0.7


def test_seeded_sampling_is_reproducible_and_independent_of_batch(model):
    vocab = model.config.vocab_size
    target = prompts_of([11], vocab, seed=3)[0]
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, max_new_tokens=15, n=4, seed=1234)
    s = Sampler(model, kv_memory=blocks_bytes(model, 300), block_size=BLOCK, max_batched_tokens=32)
    alone = s.generate([target], params)
    assert [c.sample_index for c in alone] == [0, 1, 2, 3]
    assert s.generate([target], params) == alone
    assert len({tuple(c.token_ids) for c in alone}) > 1  # each sample has its own stream
    others = prompts_of([4, 25, 7], vocab, seed=4)
    mixed = s.generate(others[:2] + [target] + others[2:],
                       [SamplingParams(temperature=0.7, max_new_tokens=9, n=3, seed=9)] * 2 + [params]
                       + [SamplingParams(temperature=0, max_new_tokens=5)])
    assert [c.prompt_index for c in mixed] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3]
    assert [c.token_ids for c in mixed[6:10]] == [c.token_ids for c in alone]
    tight = Sampler(model, kv_memory=blocks_bytes(model, 10), block_size=BLOCK, max_batched_tokens=8)
    assert tight.generate([target], params) == alone  # preemption does not consume random draws
    assert tight.stats["preemptions"] > 0
    other_seed = s.generate([target], SamplingParams(**{**params.__dict__, "seed": 99}))
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in alone]


def test_top_k_1_and_tiny_top_p_are_greedy(model, reference):
    prompts, expected = reference
    s = Sampler(model, kv_memory=blocks_bytes(model, 200), block_size=BLOCK)
    for p in (SamplingParams(top_k=1, max_new_tokens=12, seed=0), SamplingParams(top_p=1e-6, max_new_tokens=12)):
        assert [c.token_ids for c in s.generate(prompts, p)] == expected


def test_logprobs_match_model(model, reference):
    prompts, expected = reference
    s = Sampler(model, kv_memory=blocks_bytes(model, 200), block_size=BLOCK)
    out = s.generate(prompts[2:4], SamplingParams(temperature=0.8, max_new_tokens=5, seed=7, logprobs=True))
    for p, c in zip(prompts[2:4], out):
        ids = p + c.token_ids
        with torch.no_grad():
            lp = model(torch.tensor([ids]))[0].log_softmax(-1)
        want = [float(lp[len(p) - 1 + i, t]) for i, t in enumerate(c.token_ids)]
        assert c.logprobs == pytest.approx(want, abs=1e-9)


def test_stop_token_ids_end_generation_and_eos_is_default(model, reference):
    prompts, expected = reference
    stop_tok = expected[3][4]
    first = expected[3].index(stop_tok)
    s = Sampler(model, kv_memory=blocks_bytes(model, 200), block_size=BLOCK)
    c = s.generate([prompts[3]], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(stop_tok,)))[0]
    assert c.token_ids == expected[3][:first + 1] and c.finish_reason == "stop"
    eos_model = tiny_model(eos_token_id=stop_tok)
    c = Sampler(eos_model, kv_memory=blocks_bytes(eos_model, 200), block_size=BLOCK).generate(
        [prompts[3]], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert c.token_ids == expected[3][:first + 1] and c.finish_reason == "stop"


class PieceTokenizer:
    """Token i decodes to a piece of 1-3 letters: stop strings can straddle token boundaries."""

    def __init__(self, vocab):
        self.pieces = ["".join("abcdefghij"[(i * 7 + k) % 10] for k in range(1 + i % 3)) for i in range(vocab)]
        self.stop_ids = ()

    def encode(self, text, bos=True, eos=False):
        return [1 + (ord(ch) % 50) for ch in text] or [1]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_stop_string_spanning_token_boundaries(model, reference):
    prompts, expected = reference
    tok = PieceTokenizer(model.config.vocab_size)
    s = Sampler(model, tokenizer=tok, kv_memory=blocks_bytes(model, 200), block_size=BLOCK)
    full = s.generate([prompts[4]], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert full.text == tok.decode(expected[4])
    # A stop string that starts inside token 5's piece and ends inside a later token's piece.
    start = len(tok.decode(expected[4][:5])) - 1
    stop = full.text[start:start + 3]
    assert len(stop) == 3 and full.text.find(stop) == start
    c = s.generate([prompts[4]], SamplingParams(temperature=0, max_new_tokens=12, stop=(stop,)))[0]
    assert c.finish_reason == "stop" and c.text == full.text[:start]
    n = len(c.token_ids)
    assert c.token_ids == expected[4][:n] and stop in tok.decode(c.token_ids)
    assert stop not in tok.decode(c.token_ids[:-1])  # ended on the token that completed the stop string
    assert s.block_manager.all_released()


def test_string_prompts_need_a_tokenizer(model):
    s = Sampler(model, kv_memory=blocks_bytes(model, 50), block_size=BLOCK)
    with pytest.raises(ValueError, match="no tokenizer"):
        s.generate(["hello"], SamplingParams(max_new_tokens=2))
    s = Sampler(model, tokenizer=PieceTokenizer(model.config.vocab_size), kv_memory=blocks_bytes(model, 50),
                block_size=BLOCK)
    c = s.generate(["hello"], SamplingParams(temperature=0, max_new_tokens=3))[0]
    assert c.token_ids == naive_greedy(model, PieceTokenizer(96).encode("hello"), 3)


def test_max_new_tokens_zero_and_one(model, reference):
    prompts, expected = reference
    s = Sampler(model, kv_memory=blocks_bytes(model, 50), block_size=BLOCK)
    out = s.generate(prompts[:2], [SamplingParams(max_new_tokens=0, n=2), SamplingParams(temperature=0, max_new_tokens=1)])
    assert out[0] == Completion(0, 0, [], "", "length", None) and out[1].sample_index == 1
    assert out[2].token_ids == expected[1][:1] and out[2].finish_reason == "length"
    assert s.block_manager.all_released()


def test_context_window_limits_generation(model):
    p = prompts_of([model.config.max_seq_len - 3], model.config.vocab_size)[0]
    s = Sampler(model, kv_memory=blocks_bytes(model, 100), block_size=BLOCK, max_batched_tokens=64)
    c = s.generate([p], SamplingParams(temperature=0, max_new_tokens=10))[0]
    assert len(c.token_ids) == 3 and c.finish_reason == "length"


def test_bad_requests_fail_with_clear_errors(model):
    s = Sampler(model, kv_memory=blocks_bytes(model, 8), block_size=BLOCK)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        s.generate([[1, 2], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="context window"):
        s.generate([[1] * model.config.max_seq_len], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="outside vocab_size"):
        s.generate([[1, 10_000]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="raise kv_memory"):
        s.generate([[1] * 30], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert s.block_manager.all_released()


def test_float32_model_and_distributed_fallback(reference):
    m32 = tiny_model(torch.float32, n_kv_heads=1, tie_embeddings=True)
    prompts, _ = reference
    want = [naive_greedy(m32, p, 8) for p in prompts]
    s = Sampler(m32, kv_memory=blocks_bytes(m32, 64), block_size=BLOCK, max_batched_tokens=16)
    out = generate_distributed(s, prompts, SamplingParams(temperature=0, max_new_tokens=8))
    assert [c.token_ids for c in out] == want
    assert [c.prompt_index for c in out] == list(range(len(prompts)))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_triton_decode_path_matches_reference(device, reference):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs the interpreter")
    m32 = tiny_model(torch.float32)
    prompts, _ = reference
    prompts = prompts[1:4] if device == "cpu" else prompts  # the CPU run goes through the interpreter
    new = 4 if device == "cpu" else 12
    want = [naive_greedy(m32, p, new) for p in prompts]
    m32 = m32.to(device)
    s = Sampler(m32, kv_memory=blocks_bytes(m32, 64), block_size=BLOCK, attention_impl="triton")
    out = s.generate(prompts, SamplingParams(temperature=0, max_new_tokens=new))
    assert [c.token_ids for c in out] == want


def _distributed_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = tiny_model(torch.float32)
        prompts = prompts_of([1, 3, 9, 17, 30], m.config.vocab_size)
        s = Sampler(m, kv_memory=blocks_bytes(m, 64), block_size=BLOCK)
        params = [SamplingParams(temperature=0, max_new_tokens=4, n=1 + i % 2) for i in range(len(prompts))]
        out = generate_distributed(s, prompts, params)
        if rank == 0:
            torch.save([(c.prompt_index, c.sample_index, c.token_ids) for c in out], out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_generate_distributed_two_ranks_keeps_prompt_order(tmp_path):
    import torch.multiprocessing as mp

    out_file = tmp_path / "out.pt"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    got = torch.load(out_file, weights_only=True)
    m = tiny_model(torch.float32)
    prompts = prompts_of([1, 3, 9, 17, 30], m.config.vocab_size)
    want = [(i, j, naive_greedy(m, p, 4)) for i, p in enumerate(prompts) for j in range(1 + i % 2)]
    assert [tuple(g) for g in got] == want


def test_weight_update_invalidates_prefix_cache():
    m = tiny_model()
    prompts = prompts_of([21, 22], m.config.vocab_size, seed=8)
    s = Sampler(m, kv_memory=blocks_bytes(m, 100), block_size=BLOCK)
    params = SamplingParams(temperature=0, max_new_tokens=5)
    s.generate(prompts, params)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)  # an optimizer step: same storage, new values
    out = s.generate(prompts, params)
    assert s.stats["prefix_hit_rate"] == 0.0
    assert [c.token_ids for c in out] == [naive_greedy(m, p, 5) for p in prompts]
