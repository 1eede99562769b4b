"""The sampler's parts behind its public API: the two paged attention backends (torch vs the Triton
interpreter vs a dense float64 reference), Scheduler.postprocess's stop conditions, and the KV cache sizing
(its arithmetic, and the runner's warm-up step measured by a fake memory probe), also under torchrun with
tensor parallelism on 2 ranks (this file is then the rank script: see _tp_rank)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.sampler import Sampler, SamplingParams
from engine.sampler.attention import TorchPagedAttention, TritonPagedAttention, select_backend
from engine.sampler.block_manager import BlockManager
from engine.sampler.kv_sizing import HOST_CAP, HostMemory, kv_bytes_per_block, num_kv_blocks
from engine.sampler.runner import ModelRunner
from engine.sampler.scheduler import Scheduler
from engine.sampler.sequence import Sequence, SequenceStatus
from model.config import LlamaConfig, preset
from model.llama import Llama

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=64,
             eos_token_id=None, tie_embeddings=False)


def tiny_model(dtype=torch.float64, **over) -> Llama:
    # A larger init std than training's keeps logits peaked, so greedy ties cannot hide differences.
    cfg = preset("tiny", **{**MODEL, **over})
    return Llama(cfg).init_weights(std=0.15, generator=torch.Generator().manual_seed(0)).to(dtype).eval()


@torch.no_grad()
def naive_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def make_seq(seq_id, tokens, max_len=None, stop_ids=(), **params) -> Sequence:
    p = SamplingParams(**params)
    return Sequence(seq_id, seq_id, 0, tokens, p, max_len or len(tokens) + p.max_new_tokens, frozenset(stop_ids), 0)


# --- backends: torch vs Triton (interpreter) vs dense float64 -------------------------------------
def dense_reference(q, keys, values, positions):
    """q [n, Hq, D] at absolute positions; keys/values [L, Hkv, D] of the whole sequence so far."""
    Hq, Hkv = q.shape[1], keys.shape[1]
    k = keys.double().repeat_interleave(Hq // Hkv, dim=1)
    v = values.double().repeat_interleave(Hq // Hkv, dim=1)
    out = []
    for i, p in enumerate(positions):
        w = torch.einsum("hd,lhd->hl", q[i].double(), k[:p + 1]) / q.shape[-1] ** 0.5
        out.append(torch.einsum("hl,lhd->hd", w.softmax(-1), v[:p + 1]))
    return torch.stack(out)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs the interpreter")
def test_backends_agree_with_each_other_and_dense_attention():
    """Mixed steps of prefill chunks (two sharing a prefix block) and decodes over several steps, one of them
    repeating the same decode batch (the torch backend's carried "dense" K/V path)."""
    cfg = LlamaConfig(**{**MODEL, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "dim": 32})
    Hq, Hkv, D, bs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 4
    num_blocks = 24
    backends = [cls(cfg, num_blocks, bs, torch.float32, torch.device("cpu"))
                for cls in (TorchPagedAttention, TritonPagedAttention)]
    g = torch.Generator().manual_seed(0)
    lengths = {0: 11, 1: 13, 2: 6}
    seqs = {i: make_seq(i, [0] * n, max_new_tokens=8) for i, n in lengths.items()}
    seqs[0].block_table = [0, 1, 2, 3, 4]
    seqs[1].block_table = [0, 5, 6, 7, 8]  # a prefix-cache hit on block 0: positions 0-3 are sequence 0's
    seqs[1].num_computed = 4
    seqs[2].block_table = [9, 10, 11, 12]
    full_k = {i: torch.zeros(0, Hkv, D) for i in seqs}
    full_v = {i: torch.zeros(0, Hkv, D) for i in seqs}
    # (decode sequence ids, [(prefill id, tokens)]) per step; every position runs exactly once. Step 2's
    # chunks fall in two length groups; steps 4-5 repeat one decode batch (carried K/V: build, then step).
    steps = [([], [(0, 7), (2, 6)]), ([], [(0, 4), (1, 9)]), ([0, 2], [(1, 4)]), ([0, 2, 1], []), ([0, 2, 1], []),
             ([2], [])]
    for number, (decode_ids, chunks) in enumerate(steps):
        if number == 1:
            full_k[1], full_v[1] = full_k[0][:4].clone(), full_v[0][:4].clone()
        decode = [seqs[i] for i in decode_ids]
        prefill = [(seqs[i], n) for i, n in chunks]
        rows = [(i, 1) for i in decode_ids] + chunks
        T = sum(n for _, n in rows)
        q = torch.randn(1, T, Hq, D, generator=g)
        k = torch.randn(1, T, Hkv, D, generator=g)
        v = torch.randn(1, T, Hkv, D, generator=g)
        expected, row = [], 0
        for i, n in rows:
            start = seqs[i].num_computed
            full_k[i] = torch.cat([full_k[i], k[0, row:row + n]])
            full_v[i] = torch.cat([full_v[i], v[0, row:row + n]])
            expected.append(dense_reference(q[0, row:row + n], full_k[i], full_v[i], range(start, start + n)))
            row += n
        expected = torch.cat(expected)
        modes = []
        for backend in backends:
            backend.prepare(decode, prefill)
            modes.append(getattr(backend.layout, "dense_mode", None))
            out = backend(0, q, k, v)[0]
            backend.finish()
            assert out.shape == (T, Hq, D)
            torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5, msg=backend.name)
        assert modes[0] == [None, None, "build", "build", "step", "build"][number]
        for i, n in rows:
            seqs[i].num_computed += n
    assert backends[0].dense_prev[:2] == ([2], [10])  # the carried decode batch of the last step


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs the interpreter")
def test_sampler_greedy_is_the_same_on_both_backends():
    model = tiny_model(torch.float32)
    prompts = [[3, 9, 4], [7] * 9, list(range(1, 18))]
    want = [naive_greedy(model, p, 3) for p in prompts]
    for impl in ("torch", "triton"):
        s = Sampler(model, kv_memory=40 * kv_bytes_per_block(model.config, 4, torch.float32), block_size=4,
                    attention_impl=impl, max_batched_tokens=12)
        assert s.runner.backend_cls.name == impl
        out = s.generate(prompts, SamplingParams(temperature=0, max_new_tokens=3))
        assert [c.token_ids for c in out] == want, impl
        assert s.runner.backend.k_caches[0].shape[0 if impl == "triton" else 1] == s.block_manager.num_blocks + 1


def test_backend_selection():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_backend("auto", cpu) is TorchPagedAttention
    assert select_backend("auto", cuda) is TritonPagedAttention
    assert select_backend("torch", cuda) is TorchPagedAttention
    assert not TorchPagedAttention.supports_cuda_graphs and TritonPagedAttention.supports_cuda_graphs
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        select_backend("flash", cpu)


# --- Scheduler.postprocess --------------------------------------------------------------------
def scheduler(num_blocks=16, decode=None) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4), max_num_seqs=8, max_batched_tokens=64, decode=decode)


def step(sched: Scheduler, token_of) -> list[Sequence]:
    """One scheduled step: every sequence with nothing left to compute samples token_of(seq)."""
    scheduled = sched.schedule()
    sampling = [seq for seq, n in scheduled if seq.num_computed + n == len(seq.token_ids)]
    return sched.postprocess(scheduled, sampling, [token_of(seq) for seq in sampling],
                             [-0.5] * len(sampling))


def test_postprocess_stop_token_eos_and_request_stop_ids():
    sched = scheduler()
    eos, stop = make_seq(0, [1, 2, 3], stop_ids={2, 50}, max_new_tokens=10, logprobs=True), \
        make_seq(1, [4, 5], stop_ids={2, 50}, max_new_tokens=10)
    other = make_seq(2, [6, 7, 8, 9, 10], stop_ids={2, 50}, max_new_tokens=10)
    for seq in (eos, stop, other):
        sched.add(seq)
    finished = step(sched, lambda s: 7)  # the prompt step: nobody stops on 7
    assert finished == [] and [s.num_computed for s in (eos, stop, other)] == [3, 2, 5]
    assert eos.generated_ids == [7] and eos.logprobs == [-0.5] and stop.logprobs is None
    finished = step(sched, lambda s: {0: 2, 1: 50, 2: 9}[s.seq_id])
    assert finished == [eos, stop]
    assert [s.finish_reason for s in finished] == ["stop", "stop"] and eos.status is SequenceStatus.FINISHED
    assert eos.generated_ids == [7, 2] and stop.generated_ids == [7, 50]  # the stop token is kept
    assert sched.running == [other] and other.finish_reason is None and other.generated_ids == [7, 9]
    assert eos.block_table == [] and stop.block_table == []


def test_postprocess_max_new_tokens_and_context_window():
    sched = scheduler()
    short = make_seq(0, [1, 2, 3], max_new_tokens=2)
    window = make_seq(1, [4, 5, 6, 7], max_len=6, max_new_tokens=100)  # Sampler: min(prompt + new, max_seq_len)
    for seq in (short, window):
        sched.add(seq)
    assert step(sched, lambda s: 9) == []
    assert step(sched, lambda s: 9) == [short, window]
    assert [s.finish_reason for s in (short, window)] == ["length", "length"]
    assert len(short.generated_ids) == 2 and len(window.token_ids) == 6
    assert not sched.has_work() and sched.block_manager.all_released()


def test_postprocess_stop_string_spans_tokens_through_the_decoder():
    letters = "abcdefghij"
    sched = scheduler(decode=lambda ids: "".join(letters[i % 10] for i in ids))
    seq = make_seq(0, [9, 9], stop=("cd",), max_new_tokens=10)
    sched.add(seq)
    tokens = iter([0, 2, 3, 4])
    finished = []
    while not finished:
        finished = step(sched, lambda s: next(tokens))
    assert seq.generated_ids == [0, 2, 3] and seq.finish_reason == "stop" and seq.stopped_by_string


def test_postprocess_advances_chunked_prefill_without_sampling():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=4, max_batched_tokens=5)
    seq = make_seq(0, list(range(1, 13)), max_new_tokens=3)
    sched.add(seq)
    assert step(sched, lambda s: 1) == [] and seq.num_computed == 5 and seq.generated_ids == []
    assert step(sched, lambda s: 1) == [] and seq.num_computed == 10 and seq.generated_ids == []
    assert step(sched, lambda s: 1) == [] and seq.num_computed == 12 and seq.generated_ids == [1]


def test_sampler_stops_at_the_context_window():
    model = tiny_model(max_seq_len=24)
    s = Sampler(model, kv_memory=64 * kv_bytes_per_block(model.config, 4, torch.float64), block_size=4)
    prompt = list(range(1, 21))
    out = s.generate([prompt], SamplingParams(temperature=0, max_new_tokens=50))[0]
    assert out.finish_reason == "length" and out.token_ids == naive_greedy(model, prompt, 4)


# --- KV cache sizing ----------------------------------------------------------------------------
def test_kv_block_arithmetic():
    assert num_kv_blocks(10_000, per_block=1000, max_useful=50) == 10  # bytes stay bytes
    assert num_kv_blocks(10_000.0, per_block=1000, max_useful=50) == 10
    assert num_kv_blocks(0.5, per_block=1000, max_useful=50, free_bytes=30_000, activation_bytes=9_000) == 10
    assert num_kv_blocks(0.5, per_block=1000, max_useful=50, free_bytes=30_000, activation_bytes=9_000,
                         cap=4_500) == 4
    assert num_kv_blocks(1.0, per_block=1000, max_useful=7, free_bytes=10**9) == 7  # never more than useful
    with pytest.raises(ValueError, match="holds no KV block"):
        num_kv_blocks(0.9, per_block=1000, max_useful=50, free_bytes=5_000, activation_bytes=6_000)
    for bad in (0.0, -3, 1, True, "1G"):
        with pytest.raises(ValueError, match="must be bytes"):
            num_kv_blocks(bad, per_block=1000, max_useful=50, free_bytes=10**9)


class FakeProbe:
    """A device that reports fixed numbers; records when the warm-up measured."""
    profiles = True
    cap = None

    def __init__(self, free: int, peak: int):
        self.free_bytes, self.peak_bytes, self.events = free, peak, []

    def start(self):
        self.events.append("start")

    def peak(self):
        self.events.append("peak")
        return self.peak_bytes

    def free(self):
        self.events.append("free")
        return self.free_bytes


class RecordingRunner(ModelRunner):
    steps: list

    def _eager(self, decode, prefill):
        self.steps = getattr(self, "steps", [])
        self.steps.append(([len(s.token_ids) for s in decode],
                           [(s.num_computed, n, len(s.token_ids)) for s, n in prefill]))
        return super()._eager(decode, prefill)


@pytest.mark.parametrize("max_num_seqs,max_batched_tokens,shape", [
    (4, 32, (4, 8)),  # the token budget over every sequence slot: 4 chunks of 8
    (8, 6, (6, 1)),  # more slots than tokens: one token each, a decode step
    (2, 500, (2, 63)),  # a chunk never runs past the context window (max_seq_len 64: 63 computed positions)
])
def test_warmup_step_sizes_the_cache_from_the_measured_peak(max_num_seqs, max_batched_tokens, shape):
    model = tiny_model()
    per_block = kv_bytes_per_block(model.config, 4, torch.float64)
    probe = FakeProbe(free=100 * per_block, peak=20 * per_block + 7)
    runner = RecordingRunner(model, 0.5, 4, max_num_seqs, max_batched_tokens, memory=probe)
    useful = max_num_seqs * 64 // 4 + 1  # every slot filled to the context window
    assert runner.num_blocks == min((80 * per_block - 7) // 2 // per_block, useful) == min(39, useful)
    assert probe.events == ["start", "peak", "free"]  # measured around one step, free read after it
    assert runner.backend is None  # the warm-up's throwaway cache is gone
    (decode, prefill), = runner.steps
    num_seqs, q = shape
    end = model.config.max_seq_len - 1
    if q == 1:
        assert decode == [end] * num_seqs and prefill == []
    else:
        assert decode == [] and prefill == [(end - q, q, end)] * num_seqs


def test_no_warmup_for_bytes_or_on_the_host():
    model = tiny_model()
    per_block = kv_bytes_per_block(model.config, 4, torch.float64)
    probe = FakeProbe(free=0, peak=0)
    runner = RecordingRunner(model, 12 * per_block, 4, 4, 32, memory=probe)
    assert runner.num_blocks == 12 and probe.events == [] and not hasattr(runner, "steps")

    class Host(HostMemory):
        def free(self):
            return 40 * per_block

    runner = RecordingRunner(model, 0.25, 4, 4, 32, memory=Host())
    assert runner.num_blocks == 10 and not hasattr(runner, "steps")
    assert HostMemory().free() > 0 and HostMemory.cap == HOST_CAP == 2 << 30


def test_warmup_leaves_sampling_unchanged():
    model = tiny_model()
    per_block = kv_bytes_per_block(model.config, 4, torch.float64)
    prompts = [[1, 2, 3], list(range(5, 30))]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, n=2, max_new_tokens=6)
    plain = Sampler(model, kv_memory=39 * per_block, block_size=4, max_num_seqs=4, max_batched_tokens=32)
    warmed = Sampler(model, kv_memory=39 * per_block, block_size=4, max_num_seqs=4, max_batched_tokens=32)
    warmed.runner = RecordingRunner(model, 0.5, 4, 4, 32, memory=FakeProbe(100 * per_block, 20 * per_block + 7))
    assert warmed.runner.num_blocks == plain.block_manager.num_blocks == 39
    assert [c.token_ids for c in warmed.generate(prompts, params)] == \
        [c.token_ids for c in plain.generate(prompts, params)]


# --- tensor parallel on 2 ranks: the warm-up's collectives and the group's agreed block count ----
def _tp_rank(out_dir: Path) -> None:
    import torch.distributed as dist

    import engine.sampler.runner as runner_mod
    from engine.sampler.tensor_parallel import build_groups, build_tp_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    full = tiny_model()
    groups = build_groups(2)
    shard = build_tp_model(full.config, groups, {k: v.clone() for k, v in full.state_dict().items()}.__getitem__,
                           dtype=torch.float64)
    per_block = kv_bytes_per_block(shard.config, 4, torch.float64)
    # Ranks see different free memory: the group must agree on the smaller block count.
    probe = FakeProbe(free=(100 + 40 * rank) * per_block, peak=20 * per_block)
    runner_mod.memory_probe = lambda device: probe
    s = Sampler(shard, kv_memory=0.5, block_size=4, max_num_seqs=4, max_batched_tokens=32)
    prompts = [[1, 2, 3], list(range(5, 30)), [7] * 11]
    out = s.generate(prompts, SamplingParams(temperature=0, max_new_tokens=5))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(dict(
        num_blocks=s.block_manager.num_blocks, events=probe.events, tokens=[c.token_ids for c in out],
        finish=[c.finish_reason for c in out])))
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_tp2_warmup_agrees_on_blocks_and_generates_like_tp1(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    model = tiny_model()
    want = [naive_greedy(model, p, 5) for p in ([1, 2, 3], list(range(5, 30)), [7] * 11)]
    for r in ranks:
        assert r["events"] == ["start", "peak", "free"]
        assert r["num_blocks"] == 40  # rank 0: (100 - 20) * 0.5; rank 1 would have had 60
        assert r["tokens"] == want and r["finish"] == ["length"] * 3


if __name__ == "__main__":
    _tp_rank(Path(sys.argv[1]))
