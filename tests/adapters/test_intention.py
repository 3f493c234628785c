"""Intention conditioning (AAD-LLM style): where prepare() inserts the intention token (left and right padding), the
zero key bias as identity and a positive one pulling attention to the segment, cached generation against full
recomputation, save/load, detach, LoRA training on a task that needs the intention, and clear errors."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.adapters.intention import IntentionConditioner, IntentionConfig

from tiny_models import left_padded_batch, tiny_model


@pytest.fixture
def llama():
    return tiny_model("llama")  # 4 layers, 4 query heads sharing 2 kv heads, hidden 64, vocab 64


def padded(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows (7 and 4 real tokens), padded with id 0 on `side`."""
    rows = [[1, 11, 12, 13, 14, 15, 16], [1, 21, 22, 23]]
    if side == "left":
        return left_padded_batch(rows)
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def segments_for(ids: torch.Tensor) -> torch.Tensor:
    """Marks tokens 12-13 and 22-23 (the "selected source") wherever they sit."""
    return torch.isin(ids, torch.tensor([12, 13, 22, 23])).long()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("insert_after", [0, 1])
def test_prepare_inserts_the_token_before_the_first_real_token(llama, side, insert_after):
    ids, mask = padded(side)
    cond = IntentionConditioner(llama, num_intentions=3, insert_after=insert_after)
    intention = torch.tensor([2, 0])
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = cond.prepare(ids, mask, intention, labels=labels)
        tokens = llama.get_input_embeddings()(ids)
    embeds, new_mask, new_labels = out["inputs_embeds"], out["attention_mask"], out["labels"]
    assert embeds.shape == (2, 8, 64) and new_mask.shape == new_labels.shape == (2, 8)
    for b in range(2):
        at = int(mask[b].argmax()) + insert_after  # first real token, plus the tokens kept before the intention
        assert torch.equal(embeds[b, at], cond.embeddings[intention[b]].detach())
        assert torch.equal(embeds[b, :at], tokens[b, :at]) and torch.equal(embeds[b, at + 1 :], tokens[b, at:])
        assert new_labels[b, at] == -100
        assert torch.equal(new_labels[b, :at], labels[b, :at]) and torch.equal(new_labels[b, at + 1 :], labels[b, at:])
        assert new_mask[b, at] == 1
        assert torch.equal(new_mask[b, :at], mask[b, :at]) and torch.equal(new_mask[b, at + 1 :], mask[b, at:])
        assert int(new_mask[b].sum()) == int(mask[b].sum()) + 1
    # position ids count real tokens, as generate() computes them
    real = new_mask.bool()
    assert torch.equal(out["position_ids"][real], torch.cat([torch.arange(8), torch.arange(5)]))
    cond.detach()


def test_left_padding_gives_the_logits_of_the_unpadded_row(llama):
    ids, mask = padded("left")
    cond = IntentionConditioner(llama)
    intention = torch.tensor([1, 1])
    with torch.no_grad():
        batched = cond(llama, ids, mask, intention).logits
        alone = cond(llama, ids[1:, 3:], None, intention[1:]).logits
    torch.testing.assert_close(batched[1, 3:], alone[0], rtol=1e-4, atol=1e-4)
    cond.detach()


def test_no_bias_routes_nothing_and_detach_restores_bits(llama):
    ids, mask = padded("right")
    with torch.no_grad():
        before = llama(input_ids=ids, attention_mask=mask).logits
    cond = IntentionConditioner(llama)
    assert cond.method.adapter_layers == [] and dict(cond.head_bias) == {}
    with torch.no_grad():
        assert torch.equal(llama(input_ids=ids, attention_mask=mask).logits, before)
    cond.detach()
    cond = IntentionConditioner(llama, bias_layers=[1, 3])
    with torch.no_grad():
        for weight in cond.head_bias.values():
            weight.fill_(2.0)
        cond(llama, ids, mask, torch.tensor([0, 1]), segments_for(ids))
    cond.detach()
    assert attnpatch.get_patch(llama) is None
    with torch.no_grad():
        assert torch.equal(llama(input_ids=ids, attention_mask=mask).logits, before)


def test_zero_bias_is_identity_and_positive_bias_pulls_attention_to_the_segment(llama):
    ids, mask = padded("left")
    segments = segments_for(ids)
    intention = torch.tensor([0, 1])
    plain = IntentionConditioner(llama)
    with torch.no_grad():
        expected = plain(llama, ids, mask, intention).logits
    embeddings = plain.embeddings.detach().clone()
    plain.detach()

    cond = IntentionConditioner(llama, bias_layers=[1, 2])
    with torch.no_grad():
        cond.embeddings.copy_(embeddings)
    assert cond.head_bias["1"].shape == (4,) and not cond.head_bias["1"].any()
    cond.method.add_probe("last", layer=2, head=1, query=-1)
    with torch.no_grad():
        zero = cond(llama, ids, mask, intention, segments).logits
    assert "last" in cond.method.probe_values  # the bias layers ran the biased kernel
    torch.testing.assert_close(zero, expected, rtol=1e-5, atol=1e-5)
    on_segment = torch.cat([torch.zeros(2, 1, dtype=torch.long), segments], 1).bool()  # after insertion (left pad)
    mass_zero = (cond.method.probe_values["last"] * on_segment).sum(1)
    with torch.no_grad():
        cond.head_bias["2"].fill_(3.0)
        biased = cond(llama, ids, mask, intention, segments).logits
    mass_biased = (cond.method.probe_values["last"] * on_segment).sum(1)
    assert (mass_biased > mass_zero + 0.1).all(), (mass_zero, mass_biased)
    assert (biased - zero).abs().max() > 1e-3
    # the bias is cleared after each call: a later forward without segments runs unbiased
    assert cond.method.key_segments is None
    with torch.no_grad():
        cond.head_bias["2"].zero_()
        torch.testing.assert_close(cond(llama, ids, mask, intention).logits, expected, rtol=1e-5, atol=1e-5)
    cond.detach()


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window layers (window 5) with a cache
def test_cached_generation_equals_full_recomputation_with_a_bias(family):
    model = tiny_model(family)
    model.generation_config.eos_token_id = None  # always generate `steps` tokens
    cond = IntentionConditioner(model, bias_layers=[0, 1, 3])
    with torch.no_grad():
        for i, weight in enumerate(cond.head_bias.values()):
            weight.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]) * (i + 1))
    ids, mask = left_padded_batch([[1, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [1, 31, 32, 33, 34, 35, 36, 37]])
    segments = torch.zeros_like(ids)
    segments[0, 3:6] = 1
    segments[1, 6:9] = 1
    intention = torch.tensor([1, 0])
    steps = 8
    cached = cond.generate(model, ids, mask, intention, segments, max_new_tokens=steps, do_sample=False)
    assert cached.shape == (2, steps)  # only the new tokens
    uncached = cond.generate(model, ids, mask, intention, segments, max_new_tokens=steps, use_cache=False)
    assert torch.equal(cached, uncached)
    # greedy by hand: the whole sequence re-run through forward() each step (new tokens outside the segment)
    cur, cur_mask, cur_segments, tokens = ids, mask, segments, []
    with torch.no_grad():
        for _ in range(steps):
            nxt = cond(model, cur, cur_mask, intention, cur_segments).logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            cur = torch.cat([cur, nxt], 1)
            cur_mask = torch.cat([cur_mask, torch.ones_like(nxt)], 1)
            cur_segments = torch.cat([cur_segments, torch.zeros_like(nxt)], 1)
    assert torch.equal(cached, torch.cat(tokens, 1))
    with torch.no_grad():
        for weight in cond.head_bias.values():
            weight.zero_()
    unbiased = cond.generate(model, ids, mask, intention, segments, max_new_tokens=steps, do_sample=False)
    assert not torch.equal(unbiased, cached)  # the bias did act during decoding
    cond.detach()


def test_save_load_round_trip(llama, tmp_path):
    ids, mask = padded("left")
    segments, intention = segments_for(ids), torch.tensor([1, 0])
    cond = IntentionConditioner(llama, num_intentions=3, bias_layers=[2], insert_after=1)
    with torch.no_grad():
        cond.head_bias["2"].copy_(torch.tensor([1.0, -2.0, 0.5, 2.0]))
        expected = cond(llama, ids, mask, intention, segments).logits
    cond.save(tmp_path)
    assert (tmp_path / "attnpatch_adapter.safetensors").is_file()
    cond.detach()
    loaded = IntentionConditioner.load(tmp_path, llama)
    assert loaded.config == cond.config and loaded.config.bias_layers == (2,)
    assert torch.equal(loaded.embeddings, cond.embeddings) and torch.equal(loaded.head_bias["2"], cond.head_bias["2"])
    with torch.no_grad():
        assert torch.equal(loaded(llama, ids, mask, intention, segments).logits, expected)
    loaded.detach()


def test_lora_learns_a_task_that_needs_the_intention():
    """[BOS, a, b, SEP] -> a under intention 0, b under intention 1; LoRA on q/v plus the conditioner."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        tiny_model("llama"), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    cond = IntentionConditioner(model, bias_layers=[1, 2])
    gen = torch.Generator().manual_seed(0)
    n = 64
    first, second = torch.randint(10, 18, (n,), generator=gen), torch.randint(18, 26, (n,), generator=gen)
    intention = torch.randint(0, 2, (n,), generator=gen)
    answer = torch.where(intention == 0, first, second)
    ids = torch.stack([torch.full((n,), 1), first, second, torch.full((n,), 3), answer], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 4] = answer
    segments = torch.zeros_like(ids)
    segments[torch.arange(n), 1 + intention] = 1
    flipped = torch.zeros_like(ids)
    flipped[torch.arange(n), 2 - intention] = 1

    params = [p for p in model.parameters() if p.requires_grad] + list(cond.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-2)
    model.train()
    losses = []
    for step in range(60):
        loss = cond.loss(model, ids, None, intention, labels, segments=segments)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for name, param in cond.named_parameters():
                assert param.grad is not None and param.grad.abs().sum() > 0, name
            lora = [p for name, p in model.named_parameters() if "lora" in name]
            assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.5, losses
    with torch.no_grad():
        right = cond.loss(model, ids, None, intention, labels, segments=segments)
        wrong = cond.loss(model, ids, None, 1 - intention, labels, segments=flipped)
    assert wrong > right + 0.3, (right.item(), wrong.item())  # the answer follows the intention index
    cond.detach()


def test_config_errors():
    with pytest.raises(ValueError, match="num_intentions must be an integer >= 1"):
        IntentionConfig(num_intentions=0)
    with pytest.raises(ValueError, match="bias_layers must be a list of layer indices"):
        IntentionConfig(bias_layers="1")
    with pytest.raises(ValueError, match="bias_layers must hold layer indices >= 0"):
        IntentionConfig(bias_layers=[1, -2])
    with pytest.raises(ValueError, match="bias_layers has repeated layers"):
        IntentionConfig(bias_layers=[1, 1])
    with pytest.raises(ValueError, match="insert_after must be an integer >= 0"):
        IntentionConfig(insert_after=-1)
    assert IntentionConfig(bias_layers=[3, 1]).bias_layers == (1, 3)


def test_model_errors(llama, monkeypatch):
    with pytest.raises(ValueError, match="bias_layers: layer 4 is out of range; the model has layers 0..3"):
        IntentionConditioner(llama, bias_layers=[1, 4])
    assert attnpatch.get_patch(llama) is None  # nothing was patched
    with pytest.raises(TypeError, match="needs the transformers model"):
        IntentionConditioner(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="pass either config= or keyword options"):
        IntentionConditioner(llama, IntentionConfig(), num_intentions=3)
    monkeypatch.setattr(llama, "get_input_embeddings", lambda: None)
    with pytest.raises(TypeError, match="LlamaForCausalLM has no input token embeddings"):
        IntentionConditioner(llama)
    assert attnpatch.get_patch(llama) is None


def test_input_errors(llama):
    ids, mask = padded("left")
    cond = IntentionConditioner(llama, bias_layers=[0])
    good = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"intention indices must lie in \[0, 2\), got \[0, 2\]"):
        cond.prepare(ids, mask, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"intention must be a \[batch\] = \[2\] tensor"):
        cond.prepare(ids, mask, torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match=r"intention must be a \[batch\] = \[2\] tensor"):
        cond.prepare(ids, mask, torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="intention must hold integers"):
        cond.prepare(ids, mask, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="intention must be a LongTensor"):
        cond.prepare(ids, mask, 1)
    with pytest.raises(ValueError, match=r"segments has shape \(2, 6\) but input_ids \(2, 7\)"):
        cond.prepare(ids, mask, good, segments=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="input_ids must be \\[batch, length\\]"):
        cond.prepare(ids[0], mask[0], good[:1])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        cond.prepare(ids, mask[:, 1:], good)
    holes = mask.clone()
    holes[0, 4] = 0
    with pytest.raises(ValueError, match="one run of real tokens"):
        cond.prepare(ids, holes, good)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] of attention_mask have fewer than 1 real token"):
        cond.prepare(ids, empty, good)
    with pytest.raises(ValueError, match="labels has shape"):
        cond.prepare(ids, mask, good, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="loss\\(\\) needs labels"):
        cond.loss(llama, ids, mask, good, None)
    with pytest.raises(TypeError, match="generate\\(\\) sets position_ids itself"):
        cond.generate(llama, ids, mask, good, position_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="not the model this IntentionConditioner was applied to"):
        cond(tiny_model("llama", seed=1), ids, mask, good)
    assert cond.method.key_segments is None  # no failed call left a bias behind
    cond.detach()
    with pytest.raises(RuntimeError, match="was detached"):
        cond.prepare(ids, mask, good, segments=segments_for(ids))
