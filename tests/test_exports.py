"""The public namespaces only re-export, and every public name is exported once.

``crealia`` imports its names when they are first read (PEP 562): its table of where each name
lives, its ``TYPE_CHECKING`` imports (what type checkers see) and ``__all__`` must agree, and
``import crealia`` alone must import none of them.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import trio

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


def _type_checking_imports() -> dict[str, str]:
    """What ``crealia/__init__.py`` imports under ``if TYPE_CHECKING:``: name -> module."""
    tree = ast.parse(Path(crealia.__file__).read_text())
    (block,) = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    ]
    found: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.unparse(node)
        for alias in node.names:
            assert alias.asname is None and alias.name not in found, ast.unparse(node)
            found[alias.name] = f"crealia.{node.module}"
    return found


def test_lazy_names_table_type_checking_imports_and_all_agree() -> None:
    homes = crealia._HOMES
    assert set(homes) == set(crealia.__all__)
    assert _type_checking_imports() == homes
    for name, home in homes.items():
        assert getattr(crealia, name) is getattr(importlib.import_module(home), name), name
        assert name in vars(crealia), f"{name} was not kept in the package once imported"
    assert set(crealia.__all__) <= set(dir(crealia))
    assert "__version__" in dir(crealia)


def test_unknown_names_raise_attribute_error_and_submodules_still_import() -> None:
    with pytest.raises(AttributeError, match="module 'crealia' has no attribute 'nonesuch'"):
        _ = crealia.nonesuch  # type: ignore[attr-defined]
    assert not hasattr(crealia, "nonesuch")
    from crealia import _openapi  # a private submodule, not a public name

    assert _openapi.__name__ == "crealia._openapi"


async def fresh_interpreter(code: str) -> list[str]:
    """The lines ``code`` prints in a new Python (where nothing of crealia is imported yet)."""
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True
        )
    return result.stdout.decode().splitlines()


async def test_importing_crealia_imports_no_public_name_module() -> None:
    code = (
        "import sys, crealia; print(crealia.__version__); "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('crealia', 'trio')))))"
    )
    version, modules = await fresh_interpreter(code)
    assert version == crealia.__version__
    assert modules.split() == ["crealia", "crealia._version"]


async def test_subpackages_read_as_attributes_and_dir_lists_only_public_names() -> None:
    # Here the subpackages were imported by other tests long ago.
    code = (
        "import crealia; "
        "print(crealia.transports.__name__, crealia.backplanes.__name__, "
        "crealia.strategies.__name__); "
        "print(' '.join(n for n in dir(crealia) if not n.startswith('__')))"
    )
    subpackages, names = await fresh_interpreter(code)
    assert subpackages == "crealia.transports crealia.backplanes crealia.strategies"
    assert sorted(names.split()) == sorted([*crealia.__all__, "backplanes", "strategies",
                                            "transports"])  # fmt: skip
