"""The head_mask method: gates on each head's output slice, identity at 1, equal to weight surgery at 0, per-batch
gates, observe callbacks, remove(), and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

import attnpatch
from attnpatch import UnsupportedModelError

from analysis_fixtures import tiny_vit
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")  # 4 layers, 4 query heads sharing 2 kv heads, head_dim 16


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gates_of_one_are_identity_and_remove_restores_bits(llama, ids):
    before = logits(llama, ids)
    gates = {0: torch.ones(4), 2: torch.ones(3, 4)}  # one per head, and one per (sequence, head)
    with attnpatch.patched(llama, "head_mask", gates=gates) as patch:
        assert torch.equal(logits(llama, ids), before)
        patch.method.set_gates({1: [1.0, 0.0, 1.0, 1.0]})
        assert not torch.allclose(logits(llama, ids), before)
    assert torch.equal(logits(llama, ids), before)


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_zero_gate_equals_zeroing_the_heads_output_projection_columns(family, llama, ids):
    """Gate 0 on head h of layer l == the model with o_proj's input columns of head h set to 0."""
    model = llama if family == "llama" else tiny_vit()
    inputs = {"input_ids": ids} if family == "llama" else {"pixel_values": torch.randn(2, 1, 16, 16)}
    layer, head = 2 if family == "llama" else 1, 1
    d = 16 if family == "llama" else 8
    surgery = copy.deepcopy(model)
    layers = surgery.model.layers if family == "llama" else surgery.vit.layers
    attn = layers[layer].self_attn if family == "llama" else layers[layer].attention
    with torch.no_grad():
        attn.o_proj.weight[:, head * d : (head + 1) * d] = 0.0
        expected = surgery(**inputs).logits
        with attnpatch.patched(model, "head_mask", heads={layer: [head]}):
            got = model(**inputs).logits
        plain = model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the head did matter


def test_per_batch_gates_gate_each_sequence_on_its_own(llama, ids):
    """Row b of a batch with per-row gates == that sequence run alone with its row's gates."""
    gates = torch.ones(3, 4)
    gates[0, 1] = 0.0
    gates[2, 3] = 0.25
    with attnpatch.patched(llama, "head_mask", gates={1: gates}) as patch:
        together = logits(llama, ids)
        for b in range(3):
            patch.method.set_gates({1: gates[b]})
            torch.testing.assert_close(together[b : b + 1], logits(llama, ids[b : b + 1]), rtol=1e-5, atol=1e-5)


def test_heads_shorthand_combines_with_gates(llama, ids):
    with attnpatch.patched(llama, "head_mask", heads={0: [2], 3: "all"}, gates={0: torch.full((4,), 0.5)}) as patch:
        assert torch.equal(patch.method.gates[0], torch.tensor([0.5, 0.5, 0.0, 0.5]))
        assert torch.equal(patch.method.gates[3], torch.zeros(4))
        assert "removed [2]" in patch.describe()


def test_observe_sees_every_layer_without_changing_outputs(llama, ids):
    seen = []
    before = logits(llama, ids)
    with attnpatch.patched(llama, "head_mask", observe=lambda call: seen.append((call.layer, call.query.shape))):
        assert torch.equal(logits(llama, ids), before)
    assert seen == [(layer, (3, 4, 9, 16)) for layer in range(4)]


def test_gate_gradients_flow(llama, ids):
    gate = torch.ones(4, requires_grad=True)
    with attnpatch.patched(llama, "head_mask", gates={1: gate}):
        llama(input_ids=ids).logits.square().mean().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"gates": {4: torch.ones(4)}}, r"layer 4 is out of range; the model has layers 0..3"),
        ({"gates": {-1: torch.ones(4)}}, r"layer -1 is out of range"),
        ({"gates": {0: torch.ones(5)}}, r"gates\[0\] must have shape \[4\] or \[batch, 4\].*got \(5,\)"),
        ({"gates": {0: torch.ones(2, 2, 4)}}, r"must have shape"),
        ({"gates": {0: [1.0, float("nan"), 1.0, 1.0]}}, r"non-finite"),
        ({"heads": {1: [4]}}, r"heads\[1\]: head 4 is out of range; layer 1 has heads 0..3"),
        ({"heads": {9: [0]}}, r"layer 9 is out of range"),
        ({"gates": [1.0]}, r"gates must be a dict"),
        ({"observe": 3}, r"observe must be callable"),
        ({"beta": 0.5}, r"unknown option\(s\) \['beta'\] for method 'head_mask'"),
    ],
)
def test_bad_options_are_refused_before_patching(llama, options, message):
    with pytest.raises(ValueError, match=message):
        attnpatch.apply(llama, "head_mask", **options)
    assert attnpatch.get_patch(llama) is None


def test_per_batch_gates_must_match_the_batch(llama, ids):
    with attnpatch.patched(llama, "head_mask", gates={0: torch.ones(2, 4)}):
        with pytest.raises(ValueError, match=r"gates\[0\] has 2 rows but the batch has 3"):
            logits(llama, ids)


def test_models_without_attention_modules_are_refused():
    with pytest.raises(UnsupportedModelError, match="not a transformers PreTrainedModel"):
        attnpatch.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), "head_mask")
