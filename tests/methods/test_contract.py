"""The contract of every registered method, inherited by registering (`Method.families`, `Method.neutral_options`):
neutral options change no output of a tiny model of each family the method supports, under each base attention;
`remove()` restores the model bit for bit; an `apply` that is refused (a model the method does not support, a bad or
unknown option) raises, names what is wrong and leaves the model untouched; the model can be patched afterwards."""

from __future__ import annotations

import pytest

from attnpatch.methods import METHODS

from contract import check_bad_option, check_neutral_and_remove, check_refused_model, check_unknown_option
from tiny_models import FAMILIES, family_bases

# the package's methods (a benchmark or a test may register methods of its own, for its own purposes)
PACKAGE_METHODS = sorted(name for name, cls in METHODS.items() if cls.__module__.startswith("attnpatch."))
CASES = [
    (name, family, base)
    for name in PACKAGE_METHODS
    for family in METHODS[name].families
    for base in family_bases(family)
]
REFUSING = [
    (name, family) for name in PACKAGE_METHODS for family in ("llama", "volo") if family not in METHODS[name].families
]
OPTIONS = [(name, option) for name in PACKAGE_METHODS for option in METHODS[name].config_class.__dataclass_fields__]


def test_every_method_declares_the_families_it_is_checked_on():
    assert {"act", "var", "outlook", "head_mask", "adapter"} <= set(PACKAGE_METHODS)
    for name in PACKAGE_METHODS:
        cls = METHODS[name]
        assert cls.families, f"method {name!r} declares no model family (Method.families)"
        assert set(cls.families) <= set(FAMILIES), f"{name}: unknown families {set(cls.families) - set(FAMILIES)}"
        cls.config_class(**cls.neutral_options)  # the neutral options are valid options


@pytest.mark.parametrize(("method", "family", "base"), CASES)
def test_neutral_options_change_nothing_and_remove_restores_every_bit(method, family, base):
    check_neutral_and_remove(method, family, base)


@pytest.mark.parametrize(("method", "family"), REFUSING)
def test_a_model_the_method_does_not_support_is_refused_untouched(method, family):
    check_refused_model(method, family)


@pytest.mark.parametrize(("method", "option"), OPTIONS)
def test_a_bad_option_names_itself_and_leaves_the_model_untouched(method, option):
    check_bad_option(method, option)


@pytest.mark.parametrize("method", PACKAGE_METHODS)
def test_an_unknown_option_names_itself_and_the_valid_ones(method):
    check_unknown_option(method)
