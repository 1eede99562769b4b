from setuptools import setup

setup(
    name="selfreward",
    version="0.1.0",
    description="Self-Rewarding Language Models: a performance-engineered training engine",
    packages=["common", "model", "kernels", "engine", "engine.sampler", "loop", "loop.world", "loop.data", "bench"],
    package_data={"loop": ["templates/*.txt"], "loop.world": ["*.txt", "m0s/*/*"]},
    python_requires=">=3.10",
    # torch is deliberately not pinned here: GPU users bring their own build.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "gguf",
        "deepspeed>=0.16",
        "scipy",
        "matplotlib",
        "tqdm",
        "pyyaml",
        "jinja2",  # a checkpoint's own chat_template is rendered as transformers does
    ],
    extras_require={
        # transformers 5.25 depends on the PyPI package `kernels`, whose import name is this project's kernels/:
        # transformers then imports ours and fails at import. The tests compare against HF up to 5.24.
        "dev": ["pytest", "pytest-timeout", "transformers<5.25", "accelerate", "hypothesis", "tensorboard", "wandb", "datasets"],
        "log": ["tensorboard", "wandb"],  # run.log_to: [tensorboard, wandb]
        "data": ["datasets"],  # data.source: hf (save_to_disk directories, parquet)
        "gpu": ["flash-attn"],
    },
)
