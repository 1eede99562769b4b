"""Which implementation an op runs: the shared meaning of impl="torch"|"triton"|"auto"."""
from __future__ import annotations

import torch

IMPLS = ("torch", "triton", "auto")


def is_interpreted(kernel) -> bool:
    """True when `kernel` was built by the Triton interpreter (TRITON_INTERPRET=1 at import time)."""
    return type(kernel).__name__ == "InterpretedFunction"


def resolve_impl(impl: str, device: torch.device, kernel, where: str) -> str:
    """Map impl to "torch" or "triton"; `where` names the calling op file in error messages."""
    if impl not in IMPLS:
        raise ValueError(f"{where}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and not is_interpreted(kernel) else "torch"
    if impl == "triton" and device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(
            f"{where}: impl='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 set before triton is imported"
        )
    if impl == "triton" and device.type == "cuda" and is_interpreted(kernel):
        raise ValueError(f"{where}: impl='triton' on cuda but TRITON_INTERPRET=1 is set; unset it for real kernels")
    return impl


def check_lm_head_inputs(hidden: torch.Tensor, weight: torch.Tensor, impl: str, where: str) -> None:
    """The dtype rules shared by the lm_head ops, after `impl` is resolved."""
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"{where}: hidden and weight must share one float dtype, got {hidden.dtype} and "
                         f"{weight.dtype}")
    if impl == "triton" and hidden.dtype == torch.float64:
        raise ValueError(f"{where}: impl='triton' takes fp32/bf16/fp16; use impl='torch' for float64")
