"""The package as a whole: exceptions, imports without torch, type stubs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

import reft_rs
from reft_rs import errors


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (errors.PositionError, ValueError),
        (errors.ShapeError, ValueError),
        (errors.LocationError, IndexError),
        (errors.ReftMemoryError, MemoryError),
        (errors.CheckpointNotFoundError, FileNotFoundError),
        (errors.CheckpointIOError, OSError),
        (errors.InvalidCheckpointError, ValueError),
        (errors.CorruptCheckpointError, errors.InvalidCheckpointError),
        (errors.UnsupportedFormatError, ValueError),
        (errors.MissingDependencyError, ImportError),
    ],
)
def test_every_error_is_a_reft_error_and_its_builtin(error, builtin):
    assert issubclass(error, reft_rs.ReftError)
    assert issubclass(error, builtin)
    instance = error("something is wrong", "/some/file")
    assert str(instance) == "something is wrong"
    assert instance.path == "/some/file"
    if isinstance(instance, OSError):
        assert instance.filename == "/some/file"


def test_checkpoint_errors_share_a_base():
    for name in (
        "CheckpointNotFoundError",
        "CheckpointIOError",
        "InvalidCheckpointError",
        "UnsupportedFormatError",
    ):
        assert issubclass(getattr(reft_rs, name), reft_rs.CheckpointError)


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers"}:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_core_features_work_without_torch(tmp_path):
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        import numpy as np
        import reft_rs
        loc = reft_rs.positions.locate([10, 4], "f2+l2")
        assert loc.tolist() == [[[0, 1], [0, 1]], [[8, 9], [2, 3]]], loc
        hidden = np.ones((2, 10, 3), np.float32)
        assert reft_rs.spans.gather(hidden, loc).shape == (2, 2, 2, 3)
        config = {{"base_model": {{"name_or_path": "m", "model_type": "gpt2", "hidden_size": 3, "num_hidden_layers": 1}},
                   "interventions": [{{"name": "s", "type": "steer", "layer": 0, "component": "block_output", "positions": "all"}}]}}
        reft_rs.io.checkpoint.save({str(tmp_path)!r}, config, {{"s.vector": np.ones(3, np.float32)}})
        assert reft_rs.io.checkpoint.load({str(tmp_path)!r})[1]["s.vector"].tolist() == [1, 1, 1]
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is a dev extra")
def test_type_stubs_match_the_extension():
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "reft_rs._core"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MYPY_CACHE_DIR": os.devnull if os.name != "posix" else "/tmp/reft_rs_mypy_cache"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_py_typed_ships():
    package = os.path.dirname(reft_rs.__file__)
    assert os.path.exists(os.path.join(package, "py.typed"))
    assert os.path.exists(os.path.join(package, "_core.pyi"))


def test_a_panic_in_the_extension_is_an_engine_error_and_the_interpreter_lives_on():
    from reft_rs import _core

    with pytest.raises(errors.EngineError, match="internal error in reft_rs.*the message"):
        _core._panic_for_tests("the message")
    # The extension stays usable after the panic.
    assert reft_rs.PositionSpec("f1+l1").group_count(True) == 1


def test_every_released_call_of_the_bindings_catches_panics():
    """Each call that releases the interpreter goes through the guard that
    turns panics into EngineError (the one exception waits on a condition)."""
    folder = os.path.join(os.path.dirname(__file__), "..", "rust", "reft-python", "src")
    unguarded = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if ".detach(" in line and "self.inner.wait(" not in line and name != "errors.rs":
                    unguarded.append(f"{name}:{number}: {line.strip()}")
    assert unguarded == []


@pytest.mark.parametrize("preset", [{}, {"CANDLE_NUM_THREADS": "3", "RAYON_NUM_THREADS": "2"}])
def test_the_thread_variables_are_set_at_import_and_the_users_kept(preset):
    env = {k: v for k, v in os.environ.items() if k not in ("CANDLE_NUM_THREADS", "RAYON_NUM_THREADS")}
    code = "import os, reft_rs; print(os.environ['CANDLE_NUM_THREADS'], os.environ['RAYON_NUM_THREADS'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **preset}, capture_output=True, text=True, check=True
    )
    expected = preset or {"CANDLE_NUM_THREADS": "1", "RAYON_NUM_THREADS": str(len(os.sched_getaffinity(0)))}
    assert out.stdout.split() == [expected["CANDLE_NUM_THREADS"], expected["RAYON_NUM_THREADS"]]


def test_the_rust_engine_never_changes_the_environment():
    """``set_var`` is unsafe while other threads read the environment; the
    core crate calls it only in the function documented for ``main``."""
    root = os.path.join(os.path.dirname(__file__), "..", "rust")
    calls = []
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".rs"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    text = handle.read()
                calls += [(name, text.count("set_var("))] if "set_var(" in text else []
    assert calls == [("mod.rs", 2)]
    with open(os.path.join(root, "reft-core", "src", "engine", "mod.rs"), encoding="utf-8") as handle:
        text = handle.read()
    assert "configure_threads_env()" not in text.split("pub fn configure_threads_env()")[1]


def test_no_module_imports_another_module_s_private_names():
    """The issue's measure: no ``from .x import _name`` between the package's
    modules (the extension ``_core`` and ``_environment`` are modules, not names)."""
    import ast
    from pathlib import Path

    root = Path(reft_rs.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                for alias in node.names:
                    dunder = alias.name.startswith("__") and alias.name.endswith("__")
                    if (
                        alias.name.startswith("_")
                        and not dunder
                        and alias.name not in {"_core", "_environment"}
                    ):
                        found.append(
                            f"{path.relative_to(root)}: from {'.' * node.level}{node.module or ''} import {alias.name}"
                        )
    assert found == []


def _package_imports():
    """Each module of the package and the package modules it imports (at
    any depth of the file, ``TYPE_CHECKING`` blocks included)."""
    import ast
    from pathlib import Path

    root = Path(reft_rs.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = ["reft_rs", *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph = {"reft_rs._core": set()}  # the extension imports nothing of the package
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    targets.add(full if full in modules or full.endswith("._core") else source)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = targets
    return {name: {t for t in targets if t in graph and t != name} for name, targets in graph.items()}


def test_the_package_modules_import_one_another_without_a_circle():
    graph = _package_imports()
    assert len(graph) > 40  # the walk found the package
    assert graph["reft_rs.model.reft_model"] >= {"reft_rs.model.hooks", "reft_rs.model.merge"}
    # Depth-first search for a path back to a module on the current path.
    circles = []
    state: dict[str, str] = {}

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_at_most_a_dozen_modules_at_the_top_of_the_package():
    from pathlib import Path

    root = Path(reft_rs.__file__).parent
    modules = sorted(p.name for p in root.glob("*.py"))
    assert len(modules) <= 12, modules
    folders = sorted(p.name for p in root.iterdir() if (p / "__init__.py").exists())
    assert folders == ["cli", "engine", "experiments", "io", "model", "serve", "training"]


def test_the_flat_paths_of_release_0_1_still_import_with_a_deprecation_warning():
    script = BLOCK_TORCH + textwrap.dedent(
        """
        import importlib.util, warnings
        import reft_rs
        import reft_rs.io.checkpoint, reft_rs.engine.sampling, reft_rs.io.records
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import reft_rs.checkpoint
            from reft_rs.sampling import SamplingParams
            records = reft_rs.records
        messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
        assert reft_rs.checkpoint is reft_rs.io.checkpoint
        assert SamplingParams is reft_rs.engine.sampling.SamplingParams
        assert records is reft_rs.io.records
        assert any("reft_rs.checkpoint is now reft_rs.io.checkpoint" in m for m in messages), messages
        assert any("reft_rs.sampling is now reft_rs.engine.sampling" in m for m in messages), messages
        assert any("reft_rs.records is now reft_rs.io.records" in m for m in messages), messages
        for old, new in reft_rs.MOVED.items():
            assert importlib.util.find_spec("reft_rs." + new) is not None, new
        try:
            import reft_rs.no_such_module
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("an unknown name imported")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the torch path")
def test_the_old_torch_paths_are_the_same_modules(recwarn):
    import reft_rs.model.gradient_checkpointing
    import reft_rs.recompute
    import reft_rs.sweep

    assert reft_rs.recompute is reft_rs.model.gradient_checkpointing
    assert reft_rs.sweep.run is reft_rs.experiments.sweep.run
    assert any(issubclass(w.category, DeprecationWarning) for w in recwarn)
