"""Test environment: must run before torch/triton/deepspeed are imported anywhere."""
import os
import pathlib

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
_cache = pathlib.Path(__file__).resolve().parent.parent / ".cache"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_cache / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~60 s on 2 CPU cores")
    config.addinivalue_line("markers", "multiproc: launches torchrun subprocesses")
