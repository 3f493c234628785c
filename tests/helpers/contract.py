"""The method contract as functions (tests/methods/test_contract.py runs them on every registered method): neutral
options change nothing, remove() restores every bit, a refused apply leaves the model untouched, a bad option names
itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnpatch
from attnpatch.methods import METHODS

from tiny_models import family_bases, family_inputs, family_model, family_output


class NotAnOption:
    """A value no option accepts."""

    def __repr__(self) -> str:
        return "<not an option>"


def snapshot(model: nn.Module) -> dict:
    """Everything a patch may change on a model: attention implementations, hooks, instance attributes, weights."""
    config = getattr(model, "config", None)
    configs = [config, *(getattr(config, k, None) for k in getattr(config, "sub_configs", {}))]
    return {
        "implementations": [getattr(c, "_attn_implementation", None) for c in configs if c is not None],
        "hooks": [
            (name, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__)
            for name, m in model.named_modules()
        ],
        "bindings": sorted(name for name, m in model.named_modules() for k in m.__dict__ if k.startswith("_attnpatch")),
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "patch": attnpatch.get_patch(model),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["patch"] is None
    assert {k: v for k, v in after.items() if k != "weights"} == {k: v for k, v in before.items() if k != "weights"}
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(after["weights"][k], before["weights"][k]) for k in before["weights"])


def check_neutral_and_remove(method: str, family: str, base: str) -> None:
    """Neutral options change no output (<= 1e-5 in fp32); remove() restores the outputs and the model bit for bit."""
    model = family_model(family, base)
    inputs = family_inputs(family)
    reference = family_output(model, inputs)
    before = snapshot(model)  # after a first forward: transformers adds some hooks of its own on the first one
    patch = attnpatch.apply(model, method, **METHODS[method].neutral_options)
    assert attnpatch.get_patch(model) is patch and snapshot(model)["bindings"], "apply bound nothing to the model"
    patched = family_output(model, inputs)
    patch.remove()
    restored = family_output(model, inputs)
    assert (patched - reference).abs().max() <= 1e-5
    torch.testing.assert_close(restored, reference, rtol=0, atol=0)
    assert_untouched(model, before)


def check_refused_model(method: str, family: str) -> None:
    """Applying `method` to a model of a family it does not support raises, naming the model, and changes nothing."""
    model = family_model(family)
    inputs = family_inputs(family)
    reference = family_output(model, inputs)
    before = snapshot(model)
    with pytest.raises((TypeError, ValueError)) as refused:
        attnpatch.apply(model, method, **METHODS[method].neutral_options)
    assert type(model).__name__ in str(refused.value) or "image token" in str(refused.value)
    assert_untouched(model, before)
    torch.testing.assert_close(family_output(model, inputs), reference, rtol=0, atol=0)


def check_bad_option(method: str, option: str) -> None:
    """A value no option accepts is refused with the option's name; nothing half-patched is left behind."""
    family = METHODS[method].families[0]
    model = family_model(family, family_bases(family)[0])
    before = snapshot(model)
    options = {**METHODS[method].neutral_options, option: NotAnOption()}
    with pytest.raises((TypeError, ValueError), match=option):
        attnpatch.apply(model, method, **options)
    assert_untouched(model, before)
    with attnpatch.patched(model, method, **METHODS[method].neutral_options):
        pass
    assert_untouched(model, before)


def check_unknown_option(method: str) -> None:
    family = METHODS[method].families[0]
    model = family_model(family, family_bases(family)[0])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bta'\].*valid options"):
        attnpatch.apply(model, method, bta=0.5)
    assert_untouched(model, before)
