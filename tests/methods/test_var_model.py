"""VAR on a tiny random LLaVA (CLIP vision tower + Llama text model) with planted sink activations."""

from __future__ import annotations

import copy

import pytest
import torch

from attnpatch import apply, available_methods
from attnpatch.kernels import backend

from devices import TRITON_DEVICE, on_triton_device
from tiny_models import (
    BOS,
    IMAGE_TOKEN,
    IMAGE_TOKENS,
    SINK_DIMS,
    left_padded_batch,
    llava_prompt,
    tiny_llava,
    tiny_model,
)

VAR = dict(sink_dims=list(SINK_DIMS))
NO_NEW_SPECIAL = dict(suppress_tokens=[BOS, IMAGE_TOKEN, 0])  # generated tokens stay ordinary text


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def batch():
    ids, mask = left_padded_batch([llava_prompt([11, 12], [20, 21, 22, 23]), llava_prompt([13], [24, 25])])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, steps=5):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0, **NO_NEW_SPECIAL)


def test_var_is_registered():
    assert "var" in available_methods()


def test_sinks_selection_and_only_text_after_the_image_changes(llava, batch):
    before = logits(llava, batch)
    with apply(llava, "var", **VAR) as patch:
        after = logits(llava, batch)
        assert patch.selected_layers == {2, 3}  # 2..L-2 of a 5-layer model
        method = patch.method
        sinks = method.sinks[2]
        # row 0: no padding, BOS at 0, image from 3 (visual sink at 3 + 5); row 1: 3 pads
        assert sinks[0].nonzero().flatten().tolist() == [0, 8]
        assert sinks[1].nonzero().flatten().tolist() == [3, 10]
        assert all(s.any() for s in method.last_selected.values())
    first_text = [3 + IMAGE_TOKENS, 3 + 2 + IMAGE_TOKENS]
    for row, start in enumerate(first_text):
        torch.testing.assert_close(after[row, :start], before[row, :start], atol=1e-5, rtol=0)
        assert (after[row, start:] - before[row, start:]).abs().max() > 1e-3
    assert torch.equal(logits(llava, batch), before)  # remove() restores the model exactly


def test_keep_fraction_one_is_identity_in_generate(llava, batch):
    want_logits, want_tokens = logits(llava, batch), greedy(llava, batch)
    with apply(llava, "var", keep_fraction=1.0, **VAR) as patch:
        torch.testing.assert_close(logits(llava, batch), want_logits, atol=1e-5, rtol=0)
        assert torch.equal(greedy(llava, batch), want_tokens)
        assert any(s.any() for s in patch.method.last_selected.values())  # the rule ran, it just moved nothing


def test_vision_tower_is_untouched(llava, batch):
    seen = []
    hook = llava.model.vision_tower.register_forward_hook(lambda _m, _a, out: seen.append(out.last_hidden_state))
    try:
        logits(llava, batch)
        with apply(llava, "var", **VAR):
            assert llava.config.vision_config._attn_implementation == "sdpa"
            assert llava.config.text_config._attn_implementation.startswith("attnpatch_")
            logits(llava, batch)
    finally:
        hook.remove()
    assert torch.equal(seen[0], seen[1])


def test_padded_batch_equals_each_row_alone(llava, batch):
    with apply(llava, "var", **VAR):
        together = logits(llava, batch)
        for row in range(2):
            real = batch["attention_mask"][row].bool()
            alone = dict(
                input_ids=batch["input_ids"][row : row + 1, real],
                attention_mask=batch["attention_mask"][row : row + 1, real],
                pixel_values=batch["pixel_values"][row : row + 1],
            )
            torch.testing.assert_close(logits(llava, alone)[0], together[row, real], atol=1e-4, rtol=0)


def test_cached_generate_equals_full_recomputation(llava, batch):
    """Decode steps reuse the prompt's sinks; re-running the whole sequence (new tokens are never sinks here) must
    give the same tokens and the same last-step logits."""
    steps = 4
    with apply(llava, "var", **VAR):
        cached = greedy(llava, batch, steps)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for _ in range(steps):
            out = logits(llava, dict(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]))
            out[..., NO_NEW_SPECIAL["suppress_tokens"]] = float("-inf")
            ids = torch.cat([ids, out[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(cached, ids)


def test_two_images_per_sequence(llava):
    ids, mask = left_padded_batch([llava_prompt([11], [20, 21], images=2), llava_prompt([11], [22])])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # two images, then one
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with apply(llava, "var", **VAR) as patch:
        logits(llava, inputs)
        sinks = patch.method.sinks[2]
        assert sinks[0].nonzero().flatten().tolist() == [0, 2 + 5, 2 + IMAGE_TOKENS + 5]  # one visual sink per image
        rows = patch.method.last_state.rows[0].nonzero().flatten().tolist()
        assert rows == [2 + 2 * IMAGE_TOKENS, 3 + 2 * IMAGE_TOKENS]


@pytest.mark.skipif(backend.triton_version() is None, reason="triton is not installed")
def test_triton_path_generates_the_same_tokens(llava, batch, monkeypatch):
    """Both paths on TRITON_DEVICE (a copy of the shared model: the other tests keep theirs on the CPU)."""
    if not torch.cuda.is_available() and not backend.interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    model, inputs = copy.deepcopy(llava).to(TRITON_DEVICE), on_triton_device(batch)
    with apply(model, "var", **VAR):
        monkeypatch.setenv(backend.ENV_VAR, "torch")
        want, want_logits = greedy(model, inputs, 3), logits(model, inputs)
        monkeypatch.setenv(backend.ENV_VAR, "triton")
        got, got_logits = greedy(model, inputs, 3), logits(model, inputs)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=0)


def test_match_released_code_includes_the_last_layer(llava, batch):
    with apply(llava, "var", match_released_code=True, **VAR) as patch:
        assert patch.selected_layers == {2, 3, 4}
        logits(llava, batch)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(), "calibrate"),
        (dict(sink_dims=[]), "non-empty"),
        (dict(sink_dims=[3, 5000]), "hidden size 1024"),
        (dict(VAR, rho=1.5), "rho"),
        (dict(VAR, keep_fraction=-0.1), "keep_fraction"),
        (dict(VAR, summ="high"), "summ"),
        (dict(VAR, layers=[1, 99]), "out of range"),
        (dict(VAR, tau=-1), "tau"),
    ],
)
def test_bad_options_are_errors(llava, options, message):
    with pytest.raises(ValueError, match=message):
        apply(llava, "var", **options)


def test_text_only_model_is_refused():
    with pytest.raises(TypeError, match="text-only"):
        apply(tiny_model("llama"), "var", sink_dims=[3])


def test_batch_without_image_tokens_and_embeds_input_are_errors(llava, batch):
    with apply(llava, "var", **VAR):
        with pytest.raises(ValueError, match="no image tokens"):
            logits(llava, dict(input_ids=torch.tensor([[BOS, 11, 12, 13]])))
        embeds = llava.get_input_embeddings()(torch.tensor([[BOS, 11, 12]]))
        with pytest.raises(ValueError, match="input_ids"):
            logits(llava, dict(inputs_embeds=embeds))


def test_calibrated_profile_applies(llava, batch, tmp_path):
    """Sink dimensions discovered on text prompts (BOS carries them) drive the patch through a saved profile."""
    import attnpatch

    prompts = [[BOS, 11 + i, 12, 13, 14 + i, 20] for i in range(4)]
    profile = attnpatch.calibrate(llava, None, prompts, method="var")
    assert sorted(profile.options["sink_dims"]) == list(SINK_DIMS) and profile.options["tau"] == 20.0
    profile.save(tmp_path / "var")
    with apply(llava, "var", profile=tmp_path / "var") as patch:
        assert patch.config.sink_dims == SINK_DIMS
        logits(llava, batch)
        assert patch.method.sinks[2][0].nonzero().flatten().tolist() == [0, 8]
