"""The public namespaces only re-export, and every public name is exported once."""

from __future__ import annotations

import crealia
import crealia.abc
import crealia.testing


def test_public_names_are_exported_once_and_exist() -> None:
    for module in (crealia, crealia.abc, crealia.testing):
        names = module.__all__
        assert len(names) == len(set(names)), f"{module.__name__}: a name is listed twice"
        for name in names:
            assert hasattr(module, name), f"{module.__name__}.{name} is listed but missing"
    assert not set(crealia.__all__) & set(crealia.abc.__all__) - {
        "Backplane",
        "Listener",
        "Connection",
    }


def test_public_objects_live_in_private_modules_and_are_documented() -> None:
    for name in crealia.__all__:
        obj = getattr(crealia, name)
        module = getattr(obj, "__module__", "")
        if module and callable(obj) and module != "typing":
            assert module.rsplit(".", 1)[-1].startswith("_"), f"{name} lives in {module}"
            assert obj.__doc__, f"{name} has no docstring"
