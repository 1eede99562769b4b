"""linear_logprobs and sequence_logprobs, both impls, against a float64 naive oracle.

Device-agnostic: with TRITON_INTERPRET=0 on a CUDA machine everything runs on cuda with compiled
kernels; otherwise on CPU with the Triton interpreter (sizes kept small for it).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import linear_logprobs, sequence_logprobs
from kernels.impl import is_interpreted
from kernels.linear_logprobs import _lse_fwd_kernel, prepare_targets
from kernels.linear_logprobs_ref import linear_logprobs_naive, linear_logprobs_torch

DEVICE = "cuda" if torch.cuda.is_available() and not is_interpreted(_lse_fwd_kernel) else "cpu"
IMPLS = ("torch", "triton")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(got, ref):
    scale = ref.abs().max().clamp(min=1e-30)
    return ((got.double() - ref).abs().max() / scale).item()


def make_inputs(n, h, v, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    upstream = torch.randn(n, generator=gen, dtype=torch.float64).to(DEVICE)
    return hidden, weight, targets, upstream


def oracle(hidden, weight, targets, mask, upstream, ignore_index=-100):
    """float64 naive log_softmax-gather on the same (rounded) inputs: values and grads."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    safe, valid = prepare_targets(targets, weight.shape[0], mask, ignore_index)
    logp = linear_logprobs_naive(h64, w64, safe, valid)
    grad_h, grad_w = torch.autograd.grad(logp, (h64, w64), upstream)
    return logp, grad_h, grad_w


def check_against_oracle(hidden, weight, targets, mask, upstream, impl, ignore_index=-100):
    logp = linear_logprobs(hidden, weight, targets, mask=mask, ignore_index=ignore_index, impl=impl)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    grad_h, grad_w = torch.autograd.grad(logp, (hidden, weight), upstream.float())
    ref, ref_h, ref_w = oracle(hidden, weight, targets, mask, upstream, ignore_index)
    tol = TOL[hidden.dtype]
    assert torch.isfinite(logp).all() and torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    assert rel_err(logp, ref) < tol, rel_err(logp, ref)
    assert rel_err(grad_h, ref_h) < tol, rel_err(grad_h, ref_h)
    assert rel_err(grad_w, ref_w) < tol, rel_err(grad_w, ref_w)
    return logp, grad_h, grad_w


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_with_mask_odd_sizes(impl, dtype):
    # N odd, V not a multiple of any vocab tile, H not a multiple of the K tile.
    hidden, weight, targets, upstream = make_inputs(37, 48, 100, dtype)
    mask = torch.rand(37, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.3
    logp, grad_h, _ = check_against_oracle(hidden, weight, targets, mask, upstream, impl)
    assert (logp[~mask] == 0).all() and (grad_h[~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_vocab_tiles_and_backward_chunks(impl, dtype):
    # Big enough that the GPU tile sizes (256-wide vocab tiles) also see several tiles and chunks.
    hidden, weight, targets, upstream = make_inputs(131, 72, 1100, dtype, seed=11)
    check_against_oracle(hidden, weight, targets, None, upstream, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_rows_give_exact_zeros(impl):
    hidden, weight, targets, upstream = make_inputs(9, 16, 70, torch.float32)
    mask = torch.zeros(9, dtype=torch.bool, device=DEVICE)
    logp = linear_logprobs(hidden, weight, targets, mask=mask, impl=impl)
    grad_h, grad_w = torch.autograd.grad(logp, (hidden, weight), upstream.float())
    assert (logp == 0).all() and (grad_h == 0).all() and (grad_w == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token_and_ignore_index(impl):
    hidden, weight, targets, upstream = make_inputs(1, 24, 33, torch.float32)
    check_against_oracle(hidden, weight, targets, None, upstream, impl)
    hidden, weight, targets, upstream = make_inputs(6, 24, 33, torch.float32, seed=3)
    targets[[1, 4]] = -100
    logp, _, _ = check_against_oracle(hidden, weight, targets, None, upstream, impl)
    assert logp[1] == 0 and logp[4] == 0 and (logp[[0, 2, 3, 5]] < 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits_do_not_overflow(impl):
    hidden, weight, targets, upstream = make_inputs(11, 16, 90, torch.float32, scale=4e3)
    everything = torch.ones_like(targets, dtype=torch.bool)
    ref, ref_h, ref_w = oracle(hidden, weight, targets, None, upstream)
    assert ref.abs().max() > 1e3  # the test really reaches the |logit| ~ 1e4 regime
    logp = linear_logprobs(hidden, weight, targets, impl=impl)
    grad_h, grad_w = torch.autograd.grad(logp, (hidden, weight), upstream.float())
    assert rel_err(logp, ref) < 1e-5
    # At |logit| ~ 1e4 an fp32 logit carries ~1e-3 absolute error, so softmax (and its gradient) cannot
    # reach 1e-5 in any fp32 implementation: require "no worse than naive fp32" instead.
    naive_h, naive_w = torch.autograd.grad(
        linear_logprobs_naive(hidden, weight, targets, everything, dtype=torch.float32), (hidden, weight),
        upstream.float())
    assert rel_err(grad_h, ref_h) <= max(1e-5, 2 * rel_err(naive_h, ref_h))
    assert rel_err(grad_w, ref_w) <= max(1e-5, 2 * rel_err(naive_w, ref_w))


def test_out_of_vocab_target_is_a_one_line_error():
    hidden, weight, targets, _ = make_inputs(4, 8, 10, torch.float32)
    targets[2] = 10
    with pytest.raises(ValueError, match="linear_logprobs.py: target id 10 at position 2"):
        linear_logprobs(hidden, weight, targets, impl="torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_logprobs(hidden, weight, targets, impl="cuda")


def test_torch_impl_gradcheck_float64_across_chunks():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=gen, device="cpu").requires_grad_()
    weight = torch.randn(11, 5, dtype=torch.float64, generator=gen).requires_grad_()
    targets = torch.randint(0, 11, (7,), generator=gen)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda h, w: linear_logprobs_torch(h, w, targets, valid, chunk_rows=3),
                                    (hidden, weight))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any torch op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # uint8 tensors are the interpreter's byte views of whole storages, not our buffers.
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                self.largest = max(self.largest, t.numel())
        return out


# On cuda the vocab tiles are 256 wide, so the triton case needs a wider vocab to split into chunks.
@pytest.mark.parametrize("impl,shape", [("torch", (8192, 4, 4096)),
                                        ("triton", (64, 8, 4096 if DEVICE == "cuda" else 512))])
def test_never_materializes_full_logits(impl, shape):
    n, h, v = shape
    hidden, weight, targets, upstream = make_inputs(n, h, v, torch.float32)
    with _LargestTensor() as probe:
        logp = linear_logprobs(hidden, weight, targets, impl=impl)
        torch.autograd.grad(logp, (hidden, weight), upstream.float())
    assert probe.largest <= n * v // 4, (probe.largest, n * v)


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs_padded_and_packed_agree_with_oracle(impl):
    batch, length, dim, vocab = 3, 7, 16, 45
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(batch, length, dim, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / 4).to(DEVICE).requires_grad_()
    targets = torch.randint(0, vocab, (batch, length), generator=gen).to(DEVICE)
    mask = (torch.rand(batch, length, generator=gen) > 0.4).to(DEVICE)
    mask[2] = False  # a sequence with no response tokens: sum 0, count 0, mean 0
    padded = sequence_logprobs(hidden, weight, targets, mask, impl=impl)
    token_ref = linear_logprobs_naive(hidden.reshape(-1, dim).double(), weight.double(), targets.reshape(-1),
                                     mask.reshape(-1))
    sum_ref = token_ref.view(batch, length).sum(1)
    count_ref = mask.sum(1).double()
    assert rel_err(padded.sum, sum_ref) < 1e-5
    assert torch.equal(padded.count, count_ref.float())
    assert rel_err(padded.mean, sum_ref / count_ref.clamp(min=1)) < 1e-5
    assert padded.sum[2] == 0 and padded.mean[2] == 0

    # Same tokens packed in another order (sequence b keeps seq_id b) with a -1 gap at the end.
    order = [2, 0, 1]
    seq_ids = torch.cat([torch.full((length,), i, device=DEVICE) for i in order] + [torch.full((2,), -1, device=DEVICE)])
    packed = sequence_logprobs(torch.cat([hidden[i] for i in order] + [hidden[0, :2]]), weight,
                               torch.cat([targets[i] for i in order] + [targets[0, :2]]),
                               torch.cat([mask[i] for i in order] + [mask[0, :2]]),
                               seq_ids=seq_ids, num_seqs=3, impl=impl)
    assert torch.allclose(packed.sum, padded.sum, atol=1e-5)
    assert torch.equal(packed.count, padded.count)

    grad_h, = torch.autograd.grad(padded.sum.sum() + padded.mean.sum(), hidden)
    assert (grad_h[~mask] == 0).all() and grad_h[mask].abs().sum() > 0


def test_sequence_logprobs_rejects_bad_shapes():
    with pytest.raises(ValueError, match="sequence_logprobs.py: padded mode"):
        sequence_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), impl="torch")
    with pytest.raises(ValueError, match="num_seqs"):
        sequence_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long),
                          seq_ids=torch.zeros(4, dtype=torch.long), impl="torch")
