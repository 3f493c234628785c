"""The end-to-end generate() benchmark's eager ACT (the authors' computation, as a benchmark-only method) computes
what attnpatch's ACT computes: same sinks, same prompt logits, same running statistic and greedy continuation
through the KV cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_generate  # noqa: E402

import attnpatch  # noqa: E402

from tiny_models import planted_llama  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return planted_llama(torch.float32, positions=256, **bench_generate.SMOKE_MODEL)


def test_eager_act_matches_attnpatch_act_on_the_prompt(model):
    ids = bench_generate.prompt(64, torch.device("cpu"))
    report = bench_generate.check_variants(model, ids)
    assert report["act_layers"] == bench_generate.SMOKE_MODEL["layers"] - 3  # layers 2..L-2
    assert report["act_hidden_sink_found_in_layers"] == report["act_layers"]
    assert report["act_vs_unpatched_max_abs"] > 1e-3, "ACT must change the logits of this model"
    for variant in ("act_torch_path", "act_eager"):
        assert report[f"{variant}_sinks_equal_act"], variant
        assert report[f"{variant}_vs_act_max_abs"] < 1e-4, variant


def test_eager_act_decodes_like_attnpatch_act(model):
    ids = bench_generate.prompt(40, torch.device("cpu"), seed=1)
    gen = dict(max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    runs = {}
    for method in ("act", bench_generate.EagerACT.name):
        with attnpatch.patched(model, method) as patch:
            out = bench_generate.generate_fn(model, ids, 6)()
            stats = patch.method.column_stats()
            runs[method] = out, torch.stack([s.float() for s in patch.method.last_sinks.values()])
            runs[method] += (torch.stack([stats[n].colsum for n in sorted(stats)]),)
            runs[method] += (torch.stack([stats[n].count.expand_as(stats[n].colsum) for n in sorted(stats)]),)
            logits = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **gen
            ).logits
            runs[method] += (torch.stack(logits),)
    ref, eager = runs["act"], runs[bench_generate.EagerACT.name]
    (ref_tokens, ref_sinks, ref_colsum, ref_count, ref_logits) = ref
    (tokens, sinks, colsum, count, logits) = eager
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(sinks, ref_sinks)
    assert colsum.shape == ref_colsum.shape == (3, 1, 4, ids.shape[1] + 5)  # 3 layers; the keys of the last step
    assert torch.equal(count, ref_count)
    assert (colsum - ref_colsum).abs().max().item() < 1e-4
    assert (logits - ref_logits).abs().max().item() < 1e-4


def test_eager_act_refuses_batches(model):
    ids = bench_generate.prompt(16, torch.device("cpu")).repeat(2, 1)
    with attnpatch.patched(model, bench_generate.EagerACT.name), pytest.raises(NotImplementedError, match="batch 1"):
        model(ids)
