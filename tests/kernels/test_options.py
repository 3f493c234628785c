"""The compute layer's switches (`attnpatch.kernels.kernel_options`): one frozen options object per thread / context,
restored on exit (also when the block raises), validated, and no mutable module state behind them."""

from __future__ import annotations

import ast
import asyncio
import contextvars
import dataclasses
import sys
import threading
from pathlib import Path

import pytest

import attnpatch.kernels as kernels
from attnpatch.kernels import KernelOptions, Tiles, current_kernel_options, kernel_options

KERNELS = Path(kernels.__file__).resolve().parent


def test_defaults_are_the_current_code_paths():
    options = current_kernel_options()
    assert options == KernelOptions()
    assert options.fold_decode_groups and options.decode_mass_from_logits and options.split_keys
    assert dict(options.tiles) == {}


def test_block_changes_only_what_it_names_and_restores_on_exit():
    before = current_kernel_options()
    with kernel_options(fold_decode_groups=False) as inside:
        assert current_kernel_options() is inside
        assert not inside.fold_decode_groups and inside.decode_mass_from_logits and inside.split_keys
        with kernel_options(split_keys=False):  # nested blocks start from the enclosing options
            assert not current_kernel_options().fold_decode_groups and not current_kernel_options().split_keys
        assert current_kernel_options() is inside
    assert current_kernel_options() is before


def test_options_are_restored_when_the_block_raises():
    before = current_kernel_options()
    with pytest.raises(RuntimeError, match="inside"), kernel_options(decode_mass_from_logits=False):
        raise RuntimeError("inside")
    assert current_kernel_options() is before


def test_options_belong_to_their_thread():
    """A block in one thread is not seen by another running at the same time, and neither leaks out."""
    entered, checked = threading.Event(), threading.Event()
    seen: dict[str, KernelOptions] = {}

    def worker() -> None:
        seen["worker_start"] = current_kernel_options()
        with kernel_options(split_keys=False, tiles={"var": Tiles(16, 16, 0, 4, 1)}):
            seen["worker_inside"] = current_kernel_options()
            entered.set()
            checked.wait(10)

    with kernel_options(fold_decode_groups=False):
        thread = threading.Thread(target=worker)
        thread.start()
        assert entered.wait(10)
        seen["main_inside"] = current_kernel_options()
        checked.set()
        thread.join(10)
    assert seen["worker_start"] == KernelOptions()  # a new thread starts from the defaults, not the caller's block
    assert not seen["worker_inside"].split_keys and seen["worker_inside"].fold_decode_groups
    assert seen["main_inside"] == KernelOptions(fold_decode_groups=False)
    assert current_kernel_options() == KernelOptions()


def test_options_belong_to_their_context():
    """Context copies (what asyncio gives each task) see the block they were copied in, and their own blocks stay
    theirs."""

    async def task(name: str, **changes) -> tuple[str, KernelOptions]:
        with kernel_options(**changes):
            await asyncio.sleep(0)  # the other task runs its block here
            return name, current_kernel_options()

    async def both():
        return await asyncio.gather(task("a", fold_decode_groups=False), task("b", decode_mass_from_logits=False))

    results = dict(asyncio.run(both()))
    assert results["a"] == KernelOptions(fold_decode_groups=False)
    assert results["b"] == KernelOptions(decode_mass_from_logits=False)
    with kernel_options(split_keys=False):
        copied = contextvars.copy_context()
    assert copied.run(current_kernel_options).split_keys is False and current_kernel_options().split_keys


def test_unknown_name_and_wrong_types_are_refused_naming_them():
    with pytest.raises(TypeError, match="fold_decode_group\\b.*options: fold_decode_groups"):
        with kernel_options(fold_decode_group=False):
            pass
    with pytest.raises(TypeError, match="split_keys must be a bool"):
        with kernel_options(split_keys=1):
            pass
    with pytest.raises(ValueError, match="unknown kernel 'flashy'"):
        with kernel_options(tiles={"flashy": Tiles(16, 16, 0, 4, 1)}):
            pass
    with pytest.raises(TypeError, match=r"tiles\['flash'\] must be a Tiles"):
        KernelOptions(tiles={"flash": (16, 16, 0, 4, 1)})
    with pytest.raises(TypeError, match="tiles must be a mapping"):
        KernelOptions(tiles=[("flash", Tiles(16, 16, 0, 4, 1))])
    assert current_kernel_options() == KernelOptions()


def test_options_are_immutable():
    tiles = {"flash": Tiles(16, 16, 0, 4, 1)}
    options = KernelOptions(tiles=tiles)
    tiles["column_mass"] = Tiles(32, 32, 0, 4, 1)  # the caller's dict is copied
    assert set(options.tiles) == {"flash"}
    with pytest.raises(TypeError):
        options.tiles["var"] = Tiles(16, 16, 0, 4, 1)  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.split_keys = False  # type: ignore[misc]
    assert hash(options) == hash(KernelOptions(tiles=tiles))


def test_no_module_level_switches_and_a_cheap_package_import():
    """The old module globals are gone, and the package's __init__ and the options module import only the standard
    library (so `import attnpatch.kernels` imports no triton)."""
    from attnpatch.kernels import act, backend

    assert not hasattr(act, "DECODE_MASS_FROM_LOGITS")
    if backend.triton_version() is not None:
        from attnpatch.kernels._triton import common, flash, var

        assert not hasattr(flash, "FOLD_DECODE_GROUPS") and not hasattr(var, "SPLIT_KEYS")
        assert not hasattr(common, "TILE_OVERRIDES")
    for path in (KERNELS / "__init__.py", KERNELS / "options.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported.add((node.module or "").split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                assert node.module == "options", f"{path.name} imports .{node.module}"
        assert imported <= set(sys.stdlib_module_names) | {"__future__"}, (path.name, imported)
