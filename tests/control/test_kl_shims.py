"""The old module paths of the KL package warn and return the very objects of the new ones."""

import importlib

import pytest

import torchsteer.control.kl as kl

MOVED = {
    "torchsteer.control.kl_base": ("KLController", "as_statistic", "finite_hparam"),
    "torchsteer.control.kl_estimators": (
        "double_softmin",
        "kl_estimate",
        "kl_exact",
        "masked_mean",
    ),
    "torchsteer.control.safe": ("SAFEController",),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_returns_the_same_object(old):
    module = importlib.import_module(old)
    for name in MOVED[old]:
        with pytest.warns(DeprecationWarning, match=f"{name} moved to torchsteer.control.kl"):
            obj = getattr(module, name)
        assert obj is getattr(kl, name)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_raises_attribute_error_for_unknown_names(old):
    module = importlib.import_module(old)
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name


def test_from_import_of_an_old_path_still_works():
    with pytest.warns(DeprecationWarning):
        from torchsteer.control.safe import SAFEController
    assert SAFEController is kl.SAFEController
