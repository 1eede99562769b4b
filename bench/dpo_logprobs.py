"""Benchmark: the DPO log-prob path, naive vs ours, forward + backward (and forward only).

The N tokens form 2P sequences of SEQ_LEN tokens (P pairs, chosen then rejected) and fwd+bwd computes
the sigmoid DPO loss of their sequence log-prob sums against fixed reference log-probs, then backward.
Naive is what users write: fp32 logits = F.linear(h, W).float(), log_softmax, gather, sums, loss.
"ours" is kernels.linear_logprobs (impl="triton" on cuda, the chunked torch path on cpu) + the same
sums and loss; "fused" is kernels.sequence_objective (logits once, gradients in forward: 3 matmuls).
Liger-Kernel's fused linear cross-entropy (reduction="sum": the same matmul work, a different scalar)
is a column when importable. The forward-only table (the reference-model pass) is per-token log-probs.
Every ratio is against naive measured in the same run.

Peak memory is the extra memory of one fwd+bwd over the inputs (hidden, weight, targets), grads
included: on cuda torch.cuda.max_memory_allocated() minus the allocation before the call; on cpu the
peak RSS growth of a fresh subprocess doing one fwd+bwd after building its inputs (ru_maxrss minus
the RSS measured just before the call), which counts every allocation, torch's or not.

Usage: python bench/dpo_logprobs.py --device cuda|cpu [--repeats K]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.linear_logprobs import linear_logprobs  # noqa: E402
from kernels.sequence_objective import sequence_objective  # noqa: E402

GPU_SHAPES = [(4096, 2048, 32000), (16384, 4096, 128256)]
CPU_SHAPES = [(1024, 256, 32000), (2048, 512, 32000)]
SEQ_LEN = 256  # tokens per sequence (--seq-len): N / 256 sequences, N / 512 pairs
BETA = 0.1


def dpo_from_tokens(token_logp, ref):
    seq = token_logp.reshape(-1, SEQ_LEN).sum(dim=1)
    pairs = seq.shape[0] // 2
    margin = (seq[:pairs] - ref[:pairs]) - (seq[pairs:] - ref[pairs:])
    return -F.logsigmoid(BETA * margin).mean()


def fused_dpo(hidden, weight, targets, ref, impl):
    rows = hidden.shape[0] // SEQ_LEN
    pairs = rows // 2

    def objective(logp, count, group_rows):
        margin = (logp[0::2] - ref[group_rows[0::2]]) - (logp[1::2] - ref[group_rows[1::2]])
        return -F.logsigmoid(BETA * margin).sum() / pairs

    return sequence_objective(hidden.reshape(rows, SEQ_LEN, -1), weight, targets.reshape(rows, SEQ_LEN), None,
                              objective, [[i, i + pairs] for i in range(pairs)], impl=impl).value


def naive_logprobs(hidden, weight, targets):
    logits = F.linear(hidden, weight).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def liger_fn():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # not installed, or built against another torch/triton
        return None
    return lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="sum")


def methods(device, forward_only=False):
    """name -> fn(hidden, weight, targets, ref): per-token log-probs (forward only) or the DPO loss."""
    impl = "triton" if device == "cuda" else "torch"
    ours = lambda h, w, t: linear_logprobs(h, w, t, impl=impl)  # noqa: E731
    if forward_only:
        return {"naive": lambda h, w, t, ref: naive_logprobs(h, w, t), "ours": lambda h, w, t, ref: ours(h, w, t)}
    out = {"naive": lambda h, w, t, ref: dpo_from_tokens(naive_logprobs(h, w, t), ref),
           "ours": lambda h, w, t, ref: dpo_from_tokens(ours(h, w, t), ref),
           "fused": lambda h, w, t, ref: fused_dpo(h, w, t, ref, impl)}
    liger = liger_fn() if device == "cuda" else None
    if liger is not None:
        out["liger"] = lambda h, w, t, ref: liger(h, w, t)
    return out


def make_inputs(n, h, v, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, device=device, dtype=dtype) / h ** 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    ref = -torch.rand(max(2, n // SEQ_LEN), generator=gen, device=device) * SEQ_LEN * 10
    return hidden, weight, targets, ref


def fwd_bwd(fn, hidden, weight, targets, ref):
    hidden.grad = weight.grad = None
    fn(hidden, weight, targets, ref).backward()


def fwd_only(fn, hidden, weight, targets, ref):
    """The reference-model pass of DPO: no autograd graph at all."""
    with torch.no_grad():
        fn(hidden, weight, targets, ref)


def time_cuda(fn, inputs, repeats, step=fwd_bwd):
    step(fn, *inputs)  # compile / warm up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(fn, *inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def peak_cuda(fn, inputs, step=fwd_bwd):
    inputs[0].grad = inputs[1].grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(fn, *inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_cuda(shapes, repeats, step=fwd_bwd):
    rows = []
    for n, h, v in shapes:
        inputs = make_inputs(n, h, v, torch.bfloat16, "cuda")
        row = {"shape": (n, h, v), "dtype": "bf16"}
        for name, fn in methods("cuda", forward_only=step is fwd_only).items():
            try:
                row[name] = (time_cuda(fn, inputs, repeats, step), peak_cuda(fn, inputs, step))
            except torch.cuda.OutOfMemoryError:
                row[name] = None
            inputs[0].grad = inputs[1].grad = None
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_peak_child(name, n, h, v):
    """Runs in a fresh process: peak RSS growth of one fwd+bwd of `name`."""
    fn = methods("cpu")[name]
    fwd_bwd(fn, *make_inputs(2 * SEQ_LEN, 8, 64, torch.float32, "cpu"))  # page in torch's code paths first
    inputs = make_inputs(n, h, v, torch.float32, "cpu")
    base = _rss_bytes()
    fwd_bwd(fn, *inputs)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent across fork+exec.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak": peak - base}))


def bench_cpu(shapes, repeats):
    rows = []
    for n, h, v in shapes:
        inputs = make_inputs(n, h, v, torch.float32, "cpu")
        row = {"shape": (n, h, v), "dtype": "fp32"}
        fns = methods("cpu")
        times = {name: [] for name in fns}
        for name, fn in fns.items():
            fwd_bwd(fn, *inputs)  # warm up
        for _ in range(repeats):  # interleaved so load from other processes hits both alike
            for name, fn in fns.items():
                start = time.perf_counter()
                fwd_bwd(fn, *inputs)
                times[name].append(time.perf_counter() - start)
        for name in fns:
            child = subprocess.run([sys.executable, __file__, "--peak-child", name, str(n), str(h), str(v),
                                    str(SEQ_LEN)],
                                   capture_output=True, text=True, check=True)
            row[name] = (statistics.median(times[name]), json.loads(child.stdout.strip().splitlines()[-1])["peak"])
        rows.append(row)
    return rows


def print_table(rows, device, what="DPO loss fwd+bwd"):
    others = [name for name in ("ours", "fused", "liger") if any(name in row for row in rows)]
    head = "| N, H, V | dtype | naive ms | naive peak MiB |"
    for name in others:
        head += f" {name} ms | {name} peak MiB | {name} time / naive | {name} peak / naive |"
    print(f"\nlinear_logprobs {what} on {device}, {SEQ_LEN}-token sequences "
          f"({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'})")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        naive = row.get("naive")
        line = f"| {row['shape']} | {row['dtype']} | "
        line += f"{naive[0] * 1e3:.1f} | {naive[1] / 2**20:.0f} |" if naive else "OOM | OOM |"
        for name in others:
            got = row.get(name)
            if not got:
                line += " OOM | OOM | - | - |"
                continue
            line += f" {got[0] * 1e3:.1f} | {got[1] / 2**20:.0f} |"
            line += f" {got[0] / naive[0]:.2f}x | {got[1] / naive[1]:.3f}x |" if naive else " - | - |"
        print(line)


def main():
    global SEQ_LEN
    if len(sys.argv) > 1 and sys.argv[1] == "--peak-child":
        SEQ_LEN = int(sys.argv[6])
        cpu_peak_child(sys.argv[2], *map(int, sys.argv[3:6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per method (default 5 cuda, 3 cpu)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per sequence (N must be a multiple "
                        "of 2 x seq-len)")
    args = parser.parse_args()
    SEQ_LEN = args.seq_len
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench/dpo_logprobs.py: --device cuda but torch sees no GPU")
        print_table(bench_cuda(GPU_SHAPES, args.repeats or 5, fwd_only), "cuda", "forward only, no_grad")
        rows = bench_cuda(GPU_SHAPES, args.repeats or 5)
    else:
        rows = bench_cpu(CPU_SHAPES, args.repeats or 3)
    print_table(rows, args.device)


if __name__ == "__main__":
    main()
