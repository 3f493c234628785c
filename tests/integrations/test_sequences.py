"""Per-sequence state follows the sequence (its KV cache): interleaved conversations, shared prefix caches, deep copies
of caches and of models, pickling, threads and assisted decoding each give what the sequence gets alone."""

from __future__ import annotations

import copy
import pickle
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import DynamicCache

import attnpatch
from attnpatch.integrations.cache_names import CACHE_ARGUMENT, output_cache

from tiny_models import IMAGE_TOKEN, SINK_TOKEN, SINK_TOKEN_2, llava_prompt, planted_sink_model, tiny_llava

ACT = dict(beta=0.4, threshold=0.1, heads="all")
S, S2 = SINK_TOKEN, SINK_TOKEN_2


def conversations(seed: int, count: int = 6) -> list[list[list[int]]]:
    """`count` conversations of 1-3 turns of 1-9 tokens, each starting with a sink token and holding hidden ones."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        turns = []
        for t in range(rng.randint(1, 3)):
            turn = [rng.choice([S2, *range(10, 60)]) for _ in range(rng.randint(1, 9))]
            turns.append(([S] if t == 0 else []) + turn)
        out.append(turns)
    return out


def run_turn(model, tokens: list[int], cache: DynamicCache) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]), **{CACHE_ARGUMENT: cache}, use_cache=True).logits[0]


def alone(model, turns: list[list[int]], prefix: list[int] | None = None) -> list[torch.Tensor]:
    cache = DynamicCache()
    if prefix is not None:
        run_turn(model, prefix, cache)
    return [run_turn(model, turn, cache) for turn in turns]


def interleaved(model, convs, order_seed: int, prefix: list[int]) -> dict[int, list[torch.Tensor]]:
    """Every conversation advanced one turn at a time in a random order; odd ones continue a deep copy of a shared
    prefix cache."""
    shared = DynamicCache()
    run_turn(model, prefix, shared)
    caches = {i: copy.deepcopy(shared) if i % 2 else DynamicCache() for i in range(len(convs))}
    pending = [i for i, turns in enumerate(convs) for _ in turns]
    random.Random(order_seed).shuffle(pending)
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(convs))}
    for i in pending:
        results[i].append(run_turn(model, convs[i][len(results[i])], caches[i]))
    return results


@pytest.fixture(scope="module")
def model():
    return planted_sink_model()


def test_interleaved_conversations_and_shared_prefixes_equal_each_alone(model):
    convs = conversations(0)
    prefix = [S, 11, S2, 12, 13]
    with attnpatch.patched(model, "act", **ACT):
        expected = {i: alone(model, turns, prefix if i % 2 else None) for i, turns in enumerate(convs)}
        got = interleaved(model, convs, order_seed=1, prefix=prefix)
        got_again = interleaved(model, convs, order_seed=2, prefix=prefix)
    with torch.no_grad():
        plain = {i: alone(model, turns, prefix if i % 2 else None) for i, turns in enumerate(convs)}
    change = max((a - b).abs().max() for i in plain for a, b in zip(expected[i], plain[i], strict=True))
    assert change > 1e-2, "ACT must change these conversations, or the comparison proves nothing"
    for i in expected:
        for a, b, c in zip(expected[i], got[i], got_again[i], strict=True):
            assert torch.equal(a, b) and torch.equal(a, c), i


def test_the_same_length_and_last_token_do_not_mix_two_conversations(model):
    """Two conversations with equal lengths and last tokens: continuing X after Y ran uses X's own statistic."""
    x, y = [S, 11, 12, S2, 13, 14, 15, 16], [S, S2, S2, 21, 22, 23, 24, 16]
    with attnpatch.patched(model, "act", **ACT):
        cx, cy = DynamicCache(), DynamicCache()
        run_turn(model, x, cx)
        run_turn(model, y, cy)
        mixed = run_turn(model, [17], cx)
        cx_alone = DynamicCache()
        run_turn(model, x, cx_alone)
        own = run_turn(model, [17], cx_alone)
    assert torch.equal(mixed, own)


def test_two_threads_on_one_model_equal_each_alone(model):
    convs = conversations(3, count=8)
    with attnpatch.patched(model, "act", **ACT):
        expected = [alone(model, turns) for turns in convs]
        with ThreadPoolExecutor(max_workers=2) as pool:
            got = list(pool.map(lambda turns: alone(model, turns), convs))
    for a_turns, b_turns in zip(expected, got, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(a_turns, b_turns, strict=True))


def test_a_copied_cache_carries_a_copy_of_its_state(model):
    with attnpatch.patched(model, "act", **ACT) as patch:
        cache = DynamicCache()
        run_turn(model, [S, 11, S2, 12], cache)
        twin = copy.deepcopy(cache)
        first = run_turn(model, [13, 14], cache)
        again = run_turn(model, [13, 14], twin)
        state, twin_state = (c.__dict__["_attnpatch_states"][patch.key] for c in (cache, twin))
        assert state is not twin_state and state.length == twin_state.length == 6
    assert torch.equal(first, again)


def test_a_call_without_a_cache_keeps_no_state(model):
    ids = torch.tensor([[S, 11, S2, 12, 13]])
    with attnpatch.patched(model, "act", **ACT), torch.no_grad():
        a = model(ids, use_cache=False).logits
        cache = DynamicCache()
        model(torch.tensor([[S, 30, 31]]), **{CACHE_ARGUMENT: cache}, use_cache=True)
        b = model(ids, use_cache=False).logits
        out = model(ids, use_cache=True)
    assert torch.equal(a, b)
    assert "_attnpatch_states" in output_cache(out).__dict__  # a cache the model made carries the state


def test_deep_copy_of_a_patched_model_is_patched_independently(model):
    ids = torch.tensor([[S, 11, S2, 12, 13, 14]])
    with attnpatch.patched(model, "act", **ACT) as patch:
        with torch.no_grad():
            original = model(ids).logits
        twin = copy.deepcopy(model)
        twin_patch = attnpatch.get_patch(twin)
        assert twin_patch is not None and twin_patch is not patch and twin_patch.model is twin
        with torch.no_grad():
            assert torch.equal(twin(ids).logits, original)
            cache = DynamicCache()
            twin(ids, **{CACHE_ARGUMENT: cache}, use_cache=True)  # the twin's forwards leave the original alone
            assert torch.equal(model(ids).logits, original)
        twin_patch.remove()
        assert attnpatch.get_patch(model) is patch and model.config._attn_implementation == "attnpatch_sdpa"
        with torch.no_grad():
            assert torch.equal(model(ids).logits, original)
            plain = model.__class__  # the twin is back to its own attention
            assert twin.config._attn_implementation == "sdpa" and isinstance(twin, plain)


def test_pickled_patched_model_loads_patched(model):
    ids = torch.tensor([[S, 11, S2, 12, 13, 14]])
    with attnpatch.patched(model, "act", **ACT):
        with torch.no_grad():
            original = model(ids).logits
        restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, original)
        patch = attnpatch.get_patch(restored)
        patch.remove()
        unpatched = model(ids).logits
        assert torch.equal(restored(ids).logits, unpatched)


GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


ASSISTED = {
    "prompt_lookup": lambda: {"prompt_lookup_num_tokens": 4},
    "assistant": lambda: {"assistant_model": planted_sink_model()},
}
PROMPT = [S, 11, 12, 13, S2, 14, 11, 12, 13, S2, 14, 11, 12]  # repeats: prompt lookup finds candidates at once


def prefilled(model, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :-1], **{CACHE_ARGUMENT: cache}, use_cache=True)
    return cache


@pytest.mark.parametrize("mode", list(ASSISTED))
def test_assisted_decoding_gives_the_greedy_tokens(model, mode):
    """Candidates verified several rows at a time, rejected ones cropped from the cache: the tokens greedy decoding
    gives one token at a time with the same patch, continuing the same prompt cache (and ACT changes them here)."""
    ids = torch.tensor([PROMPT])
    with attnpatch.patched(model, "act", beta=0.0, threshold=0.05, heads="all"), torch.no_grad():
        cache = prefilled(model, ids)
        greedy = model.generate(ids, **{CACHE_ARGUMENT: copy.deepcopy(cache)}, **GREEDY)
        assisted = model.generate(ids, **{CACHE_ARGUMENT: copy.deepcopy(cache)}, **GREEDY, **ASSISTED[mode]())
    with torch.no_grad():
        plain = model.generate(ids, **{CACHE_ARGUMENT: prefilled(model, ids)}, **GREEDY)
    assert torch.equal(assisted, greedy)
    assert not torch.equal(greedy, plain), "ACT must change the greedy text here, or the check proves nothing"


@pytest.mark.parametrize("mode", list(ASSISTED))
def test_assisted_decoding_of_a_bare_prompt_names_the_way_out(model, mode):
    """From an empty cache, assisted decoding verifies its first candidates in the prompt's own forward: ACT says so
    and how to run it instead of returning other tokens than greedy decoding."""
    with attnpatch.patched(model, "act", **ACT), torch.no_grad():
        with pytest.raises(
            RuntimeError, match=rf"assisted decoding .* same forward as the prompt.*{CACHE_ARGUMENT}=cache"
        ):
            model.generate(torch.tensor([PROMPT]), **GREEDY, **ASSISTED[mode]())


def test_cropping_before_the_latest_forward_names_what_to_do(model):
    with attnpatch.patched(model, "act", **ACT):
        cache = DynamicCache()
        run_turn(model, [S, 11, S2, 12, 13, 14], cache)
        run_turn(model, [15, 16], cache)
        cache.crop(-5)
        with pytest.raises(RuntimeError, match="cut back to 3 tokens, before the latest forward"):
            run_turn(model, [17], cache)


def test_a_cache_filled_without_the_patch_is_refused(model):
    cache = DynamicCache()
    run_turn(model, [S, 11, S2, 12], cache)
    with attnpatch.patched(model, "act", **ACT), pytest.raises(RuntimeError, match="this patch did not see"):
        run_turn(model, [13], cache)


def test_var_state_follows_each_sequence():
    """VAR on the tiny LLaVA: two conversations interleaved, one continuing a copied prompt cache, each equal to
    running alone; an image token id generated after the prompt is text, not an image key."""
    llava = tiny_llava()
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([llava_prompt([11, 12], [20, 21])])

    def start(cache):
        with torch.no_grad():
            return llava(input_ids=prompt, pixel_values=pixels, **{CACHE_ARGUMENT: cache}, use_cache=True).logits[0]

    def step(cache, token):
        with torch.no_grad():
            return llava(input_ids=torch.tensor([[token]]), **{CACHE_ARGUMENT: cache}, use_cache=True).logits[0]

    with attnpatch.patched(llava, "var", sink_dims=[3, 517]) as patch:
        solo = DynamicCache()
        start(solo)
        expected = [step(solo, t) for t in (30, 31, IMAGE_TOKEN)]
        first, second = DynamicCache(), None
        start(first)
        second = copy.deepcopy(first)
        got_first = [step(first, 30)]
        got_second = [step(second, 30)]
        got_first.append(step(first, 31))
        got_second += [step(second, 31), step(second, IMAGE_TOKEN)]
        got_first.append(step(first, IMAGE_TOKEN))
        state = second.__dict__["_attnpatch_states"][patch.key]
        assert not state.image[0, -1] and state.image[0].sum() == prompt.eq(IMAGE_TOKEN).sum()
    for a, b, c in zip(expected, got_first, got_second, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
