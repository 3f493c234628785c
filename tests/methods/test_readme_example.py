"""The README's "Adding a method" example, executed as written: it registers, patches tiny models and passes the
method contract that every registered method inherits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import attnpatch
from attnpatch.methods import METHODS

from contract import check_bad_option, check_neutral_and_remove, check_refused_model, check_unknown_option
from tiny_models import family_inputs, family_model, family_output

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def temperature():
    section = README.read_text().split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "readme_temperature"}
    exec(compile(code, "README.md: Adding a method", "exec", dont_inherit=True), namespace)
    try:
        yield METHODS["temperature"]
    finally:
        METHODS.pop("temperature", None)


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_the_example_passes_the_contract(temperature, base):
    for family in ("llama", "gemma3"):
        check_neutral_and_remove("temperature", family, base)
    check_refused_model("temperature", "volo")
    for option in temperature.config_class.__dataclass_fields__:
        check_bad_option("temperature", option)
    check_unknown_option("temperature")


def test_the_example_changes_attention(temperature):
    model = family_model("llama")
    inputs = family_inputs("llama")
    reference = family_output(model, inputs)
    with attnpatch.patched(model, "temperature", t=3.0, layers=[1, 2]) as patch:
        hotter = family_output(model, inputs)
        assert "temperature" in patch.describe()
    assert (hotter - reference).abs().max() > 1e-3
    torch.testing.assert_close(family_output(model, inputs), reference, rtol=0, atol=0)
