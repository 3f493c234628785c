"""The Foresight adapter on tiny random models: a causal LM on serialised observations and a LLaVA with several frames
per sequence (batches, loss masks, a few LoRA steps lowering the loss, generate and parse, save/load in safetensors,
detach, and ACT / VAR applied to the fine-tuned model)."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.adapters.foresight import (
    CharTokenizer,
    ForesightAdapter,
    ForesightConfig,
    Question,
    Scene,
    answer,
    collate,
    encode,
    parse_response,
    question_task,
    target_vocabulary,
    track_task,
)

from tiny_models import IMAGE_TOKEN, IMAGE_TOKENS, SINK_DIMS, tiny_llava, tiny_model

A = [(0.1, 0.1, 0.2, 0.2), (0.2, 0.1, 0.3, 0.2), (0.3, 0.1, 0.4, 0.2)]
B = [(0.85, 0.85, 0.95, 0.95), (0.9, 0.9, 1.0, 1.0), None]
TOK = CharTokenizer()
EVERY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # LoRA capacity for a few steps


@pytest.fixture
def scene() -> Scene:
    return Scene({1: A, 2: B}, observed=2, names={1: "red", 2: "green"})


def text_batch(scene: Scene, with_target: bool = True, side: str = "right") -> dict[str, torch.Tensor]:
    leave = Question("leave", (), answer(scene, "leave"))
    tasks = [track_task(scene, 1), question_task(scene, leave, "fit")]
    return collate([encode(t, TOK, with_target=with_target) for t in tasks], TOK.pad_token_id, side=side)


def image_batch(scene: Scene, with_target: bool = True, side: str = "right") -> dict[str, torch.Tensor]:
    meet = Question("meet", (1, 2), answer(scene, "meet", (1, 2)))
    tasks = [track_task(scene, 2, mode="images"), question_task(scene, meet, "answer", mode="images")]
    rows = [
        encode(t, TOK, with_target=with_target, image_token_id=IMAGE_TOKEN, tokens_per_image=IMAGE_TOKENS)
        for t in tasks
    ]
    return collate(rows, TOK.pad_token_id, side=side)


def plain_loss(model, batch) -> torch.Tensor:
    """The model's own LM loss on the same labels (full vocabulary)."""
    return model(**batch).loss


def train(adapter: ForesightAdapter, batch, steps: int = 6, lr: float = 2e-2) -> list[float]:
    torch.manual_seed(0)
    return adapter.fit(iter([batch] * steps), steps=steps, lr=lr)


def test_text_mode_loss_training_generate_and_restricted_vocabulary(scene):
    model = tiny_model("llama")
    batch = text_batch(scene)
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    fs = ForesightAdapter(model, lora_r=4, lora_targets=EVERY)
    assert fs.model.peft_config and attnpatch.get_patch(model).method.name == "adapter"
    with torch.no_grad():  # LoRA starts at zero: the adapter's loss is the model's own loss
        torch.testing.assert_close(fs.loss(batch), plain_loss(model, batch), rtol=1e-5, atol=1e-5)
    losses = train(fs, batch)
    assert losses[-1] < losses[0] - 0.15, losses
    vocab = sorted(set(batch["labels"][batch["labels"] != -100].tolist()))
    fs.restrict_vocabulary(vocab)
    restricted = fs.loss(batch)  # a softmax over fewer tokens: lower loss
    fs.restrict_vocabulary(None)
    assert restricted < fs.loss(batch)
    prompts = text_batch(scene, with_target=False, side="left")
    texts = fs.generate(prompts, TOK, max_new_tokens=12)
    assert len(texts) == 2 and all(set(TOK.encode(t)) <= set(vocab) for t in texts)
    for text in texts:
        parse_response(text)  # whatever came out, it parses or is missing
    fs.detach()
    assert attnpatch.get_patch(model) is None
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(after, reference)  # patch and LoRA layers gone: bit-identical


def test_restricted_vocabulary_refuses_targets_outside_it(scene):
    fs = ForesightAdapter(tiny_model("llama"), lora_r=2)
    fs.restrict_vocabulary([TOK.eos_token_id, 20, 21])
    with pytest.raises(ValueError, match="outside the restricted vocabulary"):
        fs.loss(text_batch(scene))
    with pytest.raises(ValueError, match=r"vocabulary ids must be a non-empty set in \[0, 64\)"):
        fs.restrict_vocabulary([3, 64])
    fs.detach()


def test_save_load_round_trip_in_safetensors(scene, tmp_path):
    model = tiny_model("llama")
    batch = text_batch(scene)
    fs = ForesightAdapter(model, lora_r=4, lora_layers=(1, 3))
    train(fs, batch, steps=3)
    fs.restrict_vocabulary(target_vocabulary([encode(track_task(scene, 1), TOK)]) + list(range(8, 62)))
    with torch.no_grad():
        expected = fs.loss(batch)
    fs.save(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["attnpatch_adapter.json", "attnpatch_adapter.safetensors"]
    assert fs.lora_state() and all("lora_" in k for k in fs.lora_state())
    assert all(".layers.1." in k or ".layers.3." in k for k in fs.lora_state())
    fs.detach()
    loaded = ForesightAdapter.load(tmp_path, model)
    assert loaded.config == fs.config and torch.equal(loaded.vocabulary, fs.vocabulary)
    with torch.no_grad():
        assert torch.equal(loaded.loss(batch), expected)
    loaded.detach()
    other = tiny_model("llama")
    with pytest.raises(ValueError, match="do not match"):
        ForesightAdapter.load(tmp_path, other, lora_layers=(0,))
    assert attnpatch.get_patch(other) is None
    (tmp_path / "attnpatch_adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no"):
        ForesightAdapter.load(tmp_path, model)


def test_act_applies_to_the_fine_tuned_model(scene):
    model = tiny_model("llama")
    batch = text_batch(scene)
    fs = ForesightAdapter(model, lora_r=4)
    train(fs, batch, steps=3)
    tuned = fs.detach(keep_lora=True)  # the patch goes, LoRA stays
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        before = tuned(**inputs).logits
        with attnpatch.apply(tuned, "act", beta=1.0, heads="all"):  # neutral ACT: the same logits
            torch.testing.assert_close(tuned(**inputs).logits, before, rtol=1e-5, atol=1e-5)
        with attnpatch.apply(tuned, "act", beta=0.0, threshold=0.0, heads="all"):
            assert (tuned(**inputs).logits - before).abs().max() > 1e-4
        assert torch.equal(tuned(**inputs).logits, before)
        merged = tuned.merge_and_unload()
        with attnpatch.apply(merged, "act", beta=1.0, heads="all"):
            torch.testing.assert_close(merged(**inputs).logits, before, rtol=1e-4, atol=1e-4)


def test_llava_several_frames_per_sequence_train_generate_save_and_var(scene, tmp_path):
    model = tiny_llava(num_layers=3)
    batch = image_batch(scene)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)  # two frames per row
    assert int((batch["input_ids"] == IMAGE_TOKEN).sum()) == 4 * IMAGE_TOKENS
    assert not ((batch["input_ids"] == IMAGE_TOKEN) & (batch["labels"] != -100)).any()
    fs = ForesightAdapter(model, lora_r=4, lora_targets=EVERY)
    with torch.no_grad():
        torch.testing.assert_close(fs.loss(batch), plain_loss(model, batch), rtol=1e-4, atol=1e-4)
    losses = train(fs, batch, steps=6, lr=3e-3)
    assert losses[-1] < losses[0] - 0.15, losses
    prompts = image_batch(scene, with_target=False, side="left")
    texts = fs.generate(prompts, TOK, max_new_tokens=8, suppress_tokens=[IMAGE_TOKEN])
    responses = [parse_response(t) for t in texts]
    assert len(responses) == 2
    with torch.no_grad():
        expected = fs.loss(batch)
    fs.save(tmp_path)
    fs.detach()
    loaded = ForesightAdapter.load(tmp_path, model)
    with torch.no_grad():
        assert torch.equal(loaded.loss(batch), expected)
    tuned = loaded.detach(keep_lora=True)
    inputs = {k: v for k, v in prompts.items() if k != "labels"}
    with torch.no_grad():
        before = tuned(**inputs).logits
        with attnpatch.apply(tuned, "var", sink_dims=list(SINK_DIMS), layers=[1]):
            assert tuned(**inputs).logits.shape == before.shape
        with attnpatch.apply(tuned, "var", keep_fraction=1.0, sink_dims=list(SINK_DIMS), layers=[1]):
            torch.testing.assert_close(tuned(**inputs).logits, before, rtol=1e-4, atol=1e-4)


def test_config_and_model_errors():
    with pytest.raises(ValueError, match="lora_r must be an integer >= 1"):
        ForesightConfig(lora_r=0)
    with pytest.raises(ValueError, match="lora_targets must be a list of module names"):
        ForesightConfig(lora_targets="q_proj")
    with pytest.raises(TypeError, match="needs the transformers model"):
        ForesightAdapter(torch.nn.Linear(2, 2))
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="pass either config= or keyword options"):
        ForesightAdapter(model, ForesightConfig(), lora_r=2)
    fs = ForesightAdapter(model, lora_r=2)
    with pytest.raises(ValueError, match="no target tokens"):
        fs.loss({"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.full((1, 4), -100)})
    fs.detach()
    with pytest.raises(RuntimeError, match="was detached"):
        fs.method  # noqa: B018
