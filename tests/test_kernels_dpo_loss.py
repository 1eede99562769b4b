"""dpo_loss, both impls, against the textbook formulas (autograd in float64) and TRL's metric names."""
import pytest
import torch
import torch.nn.functional as F

from kernels import LOSS_TYPES, dpo_loss
from kernels.dpo_loss import _dpo_kernel
from kernels.impl import is_interpreted

DEVICE = "cuda" if torch.cuda.is_available() and not is_interpreted(_dpo_kernel) else "cpu"
IMPLS = ("torch", "triton")


def textbook(pc, pr, rc, rr, beta, loss_type, eps):
    m = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * m) - eps * F.logsigmoid(-beta * m)
    elif loss_type == "ipo":
        losses = (m - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * m)
    else:  # robust (Chowdhury et al. 2024, as in TRL)
        losses = (-(1 - eps) * F.logsigmoid(beta * m) + eps * F.logsigmoid(-beta * m)) / (1 - 2 * eps)
    return losses.mean()


def make_logps(batch, seed, scale=20.0):
    gen = torch.Generator().manual_seed(seed)
    return [(-scale * torch.rand(batch, generator=gen, dtype=torch.float64)).to(DEVICE) for _ in range(4)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0),
                                           ("robust", 0.2)])
def test_loss_and_grads_match_textbook(impl, loss_type, eps):
    beta = 0.3
    ref_inputs = [x.requires_grad_() for x in make_logps(37, seed=1)]
    ref_loss = textbook(*ref_inputs, beta, loss_type, eps)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs)
    inputs = [x.detach().float().requires_grad_() for x in ref_inputs]
    loss, metrics = dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=eps, impl=impl)
    grads = torch.autograd.grad(loss, inputs)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    for got, ref in zip(grads, ref_grads):
        assert (got.double() - ref).abs().max() <= 1e-5 * max(ref.abs().max().item(), 1e-3)

    pc, pr, rc, rr = (x.detach() for x in ref_inputs)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    expected = {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                "rewards/margins": (chosen - rejected).mean().item(),
                "rewards/accuracies": (chosen > rejected).double().mean().item()}
    assert set(metrics) == set(expected) and all(isinstance(v, float) for v in metrics.values())
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_extreme_margins_stay_finite(impl, loss_type):
    # |beta * m| ~ 1e3: logsigmoid/sigmoid must not overflow in either direction.
    pc = torch.tensor([0.0, -1e4, -5.0], device=DEVICE, requires_grad=True)
    pr = torch.tensor([-1e4, 0.0, -5.0], device=DEVICE, requires_grad=True)
    ref = torch.zeros(3, device=DEVICE)
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    loss, _ = dpo_loss(pc, pr, ref, ref, beta=0.1, loss_type=loss_type, label_smoothing=eps, impl=impl)
    grads = torch.autograd.grad(loss, (pc, pr))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    ref_loss = textbook(pc.detach().double(), pr.detach().double(), ref.double(), ref.double(), 0.1, loss_type, eps)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


def test_torch_impl_gradcheck_float64():
    inputs = [x.requires_grad_() for x in make_logps(6, seed=2, scale=3.0)]
    for loss_type, eps in [("sigmoid", 0.1), ("ipo", 0.0), ("robust", 0.2)]:
        assert torch.autograd.gradcheck(
            lambda *xs: dpo_loss(*xs, beta=0.5, loss_type=loss_type, label_smoothing=eps, impl="torch")[0], inputs)


def test_impls_agree_in_bf16_inputs():
    inputs = [x.to(torch.bfloat16).requires_grad_() for x in make_logps(16, seed=3)]
    results = [dpo_loss(*inputs, impl=impl) for impl in IMPLS]
    assert results[0][0].item() == pytest.approx(results[1][0].item(), rel=1e-6)
    grads = [torch.autograd.grad(loss, inputs) for loss, _ in results]
    assert all(g.dtype == torch.bfloat16 for g in grads[0] + grads[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_bad_arguments_are_one_line_errors():
    x = make_logps(4, seed=4)
    with pytest.raises(ValueError, match="dpo_loss.py: loss_type"):
        dpo_loss(*x, loss_type="kto", impl="torch")
    with pytest.raises(ValueError, match="dpo_loss.py: beta"):
        dpo_loss(*x, beta=0.0, impl="torch")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*x, label_smoothing=0.5, impl="torch")
    with pytest.raises(ValueError, match="label_smoothing only applies"):
        dpo_loss(*x, loss_type="ipo", label_smoothing=0.1, impl="torch")
    with pytest.raises(ValueError, match="share one non-empty"):
        dpo_loss(x[0], x[1][:3], x[2], x[3], impl="torch")
