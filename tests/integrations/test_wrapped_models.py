"""Models inside wrappers: a PEFT PeftModel is patched through to its base model (LoRA keeps working, remove()
restores), a torch.compile'd module is refused with what to do, and a patched model compiles (its patched layers
run outside the graphs) or, with fullgraph=True, fails naming what cannot be captured."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch import UnsupportedModelError

from tiny_models import left_padded_batch, tiny_model

PROMPTS = [[1, 5, 9, 13, 17, 21, 25, 29], [2, 6, 10, 14, 18]]


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits * mask[..., None]


def test_peft_model_is_patched_through_to_its_base_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ids, mask = left_padded_batch(PROMPTS)
    reference = logits(model, ids, mask)
    with model.disable_adapter():
        without_lora = logits(model, ids, mask)
    assert (reference - without_lora).abs().max() > 1e-3  # the LoRA weights matter
    with attnpatch.patched(model, "act", beta=1.0, heads="all") as patch:
        assert attnpatch.get_patch(model) is patch and attnpatch.get_patch(model.get_base_model()) is patch
        assert (logits(model, ids, mask) - reference).abs().max() <= 1e-5  # LoRA still acts under the patch
        with pytest.raises(RuntimeError, match="already patched"):
            attnpatch.apply(model.get_base_model(), "act")
    with attnpatch.patched(model, "act", beta=0.0, threshold=0.05, heads="all"):
        calibrated = logits(model, ids, mask)
    assert (calibrated - reference).abs().max() > 1e-3
    assert attnpatch.get_patch(model) is None
    torch.testing.assert_close(logits(model, ids, mask), reference, rtol=0, atol=0)


def test_compiled_module_is_refused_with_what_to_do():
    model = tiny_model("llama")
    compiled = torch.compile(model)
    with pytest.raises(UnsupportedModelError, match=r"torch.compile'd LlamaForCausalLM.*Apply first, then compile"):
        attnpatch.apply(compiled, "act")
    assert attnpatch.get_patch(compiled) is None and model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_a_patched_model_compiles_and_fullgraph_names_what_breaks():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(PROMPTS)
    with attnpatch.patched(model, "act", beta=0.4, threshold=0.05, heads={1: "all", 2: [0, 3]}):
        eager = logits(model, ids, mask)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        assert (logits(compiled, ids, mask) - eager).abs().max() <= 1e-5
        assert (logits(compiled, ids, mask) - eager).abs().max() <= 1e-5  # the second call reuses the graphs
        torch._dynamo.reset()
        with pytest.raises(Exception, match="outside torch.compile graphs.*compile without fullgraph=True"):
            logits(torch.compile(model, fullgraph=True), ids, mask)
    torch._dynamo.reset()
