"""KV-cache decoding and chunked prefill keep ACT's running column statistic right."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.integrations.cache_names import CACHE_ARGUMENT, output_cache

from tiny_models import SINK_TOKEN, SINK_TOKEN_2, planted_sink_model

ACT = dict(beta=0.4, threshold=0.1, heads="all")


@pytest.mark.parametrize(("family", "impl"), [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_cached_generation_equals_full_rerun(family, impl, sink_prompts):
    """Each generated step's logits equal those of re-running the whole sequence with ACT (no cache); qwen2 has
    sliding-window layers whose cache keeps only the last keys."""
    model = planted_sink_model(impl, family)
    ids, mask = sink_prompts
    steps = 6
    gen = dict(
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        suppress_tokens=[SINK_TOKEN, SINK_TOKEN_2],
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        plain = model.generate(ids, **gen)
        with attnpatch.patched(model, "act", **ACT) as patch:
            out = model.generate(ids, **gen)
            hidden_sinks = {layer: s.any(-1) for layer, s in patch.method.last_sinks.items()}
            if family == "qwen2":  # the sliding layers' cache held only the window, not the whole sequence
                total = out.sequences.shape[1] - 1
                assert patch.method.last_sinks[0].shape[-1] == 10 < total
                assert patch.method.column_stats()[0].colsum.shape[-1] == total
            for t in range(steps):
                length = ids.shape[1] + t
                seq = out.sequences[:, :length]
                seq_mask = torch.cat([mask, torch.ones(2, t, dtype=mask.dtype)], dim=1)
                rerun = model(seq, attention_mask=seq_mask).logits[:, -1]
                assert (out.logits[t] - rerun).abs().max() <= 1e-4, t
    assert all(s.all() for s in hidden_sinks.values()), "each sequence has a hidden sink in every head"
    changed = max((a - b).abs().max().item() for a, b in zip(out.logits, plain.logits, strict=True))
    assert changed > 1e-2, "ACT must change the logits of this model, or the comparison proves nothing"


def test_chunked_prefill_equals_one_pass(sink_prompts):
    model = planted_sink_model()
    ids, mask = sink_prompts
    with torch.no_grad(), attnpatch.patched(model, "act", **ACT):
        full = model(ids, attention_mask=mask).logits
        first = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        second = model(ids[:, 6:], attention_mask=mask, **{CACHE_ARGUMENT: output_cache(first)}, use_cache=True)
    assert (second.logits - full[:, 6:]).abs().max() <= 1e-4


def test_beam_search_raises_clear_error(sink_prompts):
    model = planted_sink_model()
    ids, mask = sink_prompts
    with attnpatch.patched(model, "act", **ACT), pytest.raises(RuntimeError, match="num_beams=1"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=4, do_sample=False, pad_token_id=0)


def test_sampling_with_several_return_sequences(sink_prompts):
    model = planted_sink_model()
    ids, mask = sink_prompts
    torch.manual_seed(0)
    with attnpatch.patched(model, "act", **ACT):
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=4, do_sample=True, num_return_sequences=2, pad_token_id=0
        )
    assert out.shape == (4, ids.shape[1] + 4)


def test_static_cache_decoding_is_refused(sink_prompts):
    model = planted_sink_model()
    ids, mask = sink_prompts
    with attnpatch.patched(model, "act", **ACT), pytest.raises(NotImplementedError, match="DynamicCache"):
        model.generate(
            ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static"
        )
