"""Triton paged decode attention (interpreter on CPU, compiled on GPU) vs its torch reference vs float64."""
import math

import pytest
import torch

from kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dense_float64(q, k_cache, v_cache, block_tables, context_lens):
    """Independent definition: materialize each sequence's K/V in order, full softmax in float64."""
    S, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(S, Hq, D, dtype=torch.float64)
    for s in range(S):
        n = int(context_lens[s])
        if n == 0:
            continue
        k = torch.cat([k_cache[int(b)] for b in block_tables[s][: -(-n // bs)]])[:n].double().cpu()
        v = torch.cat([v_cache[int(b)] for b in block_tables[s][: -(-n // bs)]])[:n].double().cpu()
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            w = (k[:, kv] @ q[s, h].double().cpu() / math.sqrt(D)).softmax(0)
            out[s, h] = w @ v[:, kv]
    return out


def make_case(S, Hq, Hkv, D, block_size, context_lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(-(-n // block_size) for n in context_lens))
    num_blocks = S * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    # Scattered, non-contiguous block ids; unused table entries point at a block full of huge values
    # so that reading past the context would show.
    perm = torch.randperm(num_blocks - 1, generator=g)[: S * max_blocks] + 1
    tables = perm.view(S, max_blocks).to(torch.int32)
    k_cache[0] = 1e4
    v_cache[0] = 1e4
    for s, n in enumerate(context_lens):
        tables[s, -(-n // block_size):] = 0
    q = torch.randn(S, Hq, D, generator=g).to(dtype)
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, tables, ctx)]


@pytest.mark.parametrize("Hq,Hkv,D,block_size,lens", [
    (4, 4, 32, 16, [1, 16, 17, 40]),
    (6, 2, 64, 8, [5, 64, 33]),
    (9, 3, 48, 16, [100, 1, 0]),  # non-power-of-2 head dim and group, an empty context
    (8, 1, 16, 4, [7, 13]),
])
def test_triton_matches_reference_and_float64(Hq, Hkv, D, block_size, lens):
    q, kc, vc, bt, ctx = make_case(len(lens), Hq, Hkv, D, block_size, lens, torch.float32)
    want = dense_float64(q, kc, vc, bt, ctx)
    ref = paged_decode_attention_reference(q, kc, vc, bt, ctx)
    tri = paged_decode_attention(q, kc, vc, bt, ctx, impl="triton", block_n=16)
    torch.testing.assert_close(ref.double().cpu(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tri.double().cpu(), want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(tri).all()
    if 0 in lens:
        assert (tri[lens.index(0)] == 0).all()


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 Triton path is exercised on GPU")
def test_triton_bf16_on_gpu():
    lens = [1, 300, 1000, 77] * 8
    q, kc, vc, bt, ctx = make_case(len(lens), 32, 8, 128, 16, lens, torch.bfloat16)
    want = dense_float64(q, kc, vc, bt, ctx)
    tri = paged_decode_attention(q, kc, vc, bt, ctx, impl="triton")
    ref = paged_decode_attention_reference(q, kc, vc, bt, ctx)
    err_tri = (tri.double().cpu() - want).abs().max()
    err_ref = (ref.double().cpu() - want).abs().max()
    assert err_tri <= 2 * err_ref + 1e-3


def test_bad_shapes_are_rejected():
    q, kc, vc, bt, ctx = make_case(2, 4, 2, 16, 4, [3, 5], torch.float32)
    with pytest.raises(ValueError, match="kv"):
        paged_decode_attention(q[:, :3], kc, vc, bt, ctx, impl="triton")
    with pytest.raises(ValueError, match="one row per sequence"):
        paged_decode_attention(q, kc, vc, bt[:1], ctx, impl="torch")
