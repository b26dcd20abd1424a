"""The project's own files agree with each other: README, CI, pyproject, conda env."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash|console)\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no shell block"
    return [line.strip() for line in blocks[0].splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_set_up_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("dckpt demo")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci[-1] == _readme_commands()[1]
    # ... and type-checks the package before it.
    assert ".venv/bin/python -m mypy" in ci[:-1]


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


# PyPI name -> conda-forge name, where they differ.
_CONDA_NAMES = {"xxhash": "python-xxhash"}


def test_environment_yml_names_every_runtime_dependency():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = {_CONDA_NAMES.get(name, name) for name in
               map(_requirement_name, pyproject["project"]["dependencies"])}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_requirement_name(d) for d in env["dependencies"] if isinstance(d, str)}
    assert runtime <= conda, f"missing from environment.yml: {sorted(runtime - conda)}"
    pip_lines = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    assert any(line.startswith("-e .") for line in pip_lines)


def test_every_default_setting_is_described_in_the_schema():
    defaults = yaml.safe_load((ROOT / "dckpt" / "dckpt.yaml").read_text())
    schema = yaml.safe_load((ROOT / "dckpt" / "dckpt-schema.yaml").read_text())

    def keys(tree: dict, prefix: str = "") -> set[str]:
        out = set()
        for key, value in tree.items():
            out.add(prefix + key)
            if isinstance(value, dict):
                out |= keys(value, prefix + key + ".")
        return out

    def schema_keys(node: dict, prefix: str = "") -> set[str]:
        out = set()
        for key, value in node.get("properties", {}).items():
            out.add(prefix + key)
            out |= schema_keys(value, prefix + key + ".")
        return out

    assert keys(defaults) == schema_keys(schema)


@pytest.mark.slow
def test_quickstart_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "all round trips recovered the original data" in result.stdout


def test_no_test_sleeps_to_wait_for_something():
    """Tests wait on events or poll through tests/_waiting.eventually (one home for
    polling); a sleep that orders events flakes on a loaded machine."""
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if path.name != "_waiting.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\btime\.sleep\(|^\s*from time import .*\bsleep\b", line)
    ]
    assert offenders == [], f"time.sleep in tests: {offenders}"


# What of distributed is not its public API: dckpt/_compat.py says why dckpt needs each.
_DISTRIBUTED_INTERNALS = re.compile(
    r"\.state\.actors[.\[]|\bWorker\._instances\b|\._future\b|distributed\.comm\.tcp\b"
    r"|\bcomm\.stream\b"
)


def test_distributed_internals_are_touched_in_one_module():
    """``Actor._future``, ``TCP.stream``, ``Worker._instances`` and ``worker.state.actors``
    are used only by dckpt/_compat.py, so a distributed release that changes one breaks
    one documented function."""
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "dckpt").rglob("*.py"))
        if path.name != "_compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _DISTRIBUTED_INTERNALS.search(line)
    ]
    assert offenders == [], offenders


@pytest.mark.slow
def test_mypy_finds_nothing_in_dckpt():
    """The package is type-checked as part of the tests (settings in pyproject.toml)."""
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(ROOT / ".mypy_cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


# Checkpoint's private names, now and in the past (its seven source fields and their
# helper, issue 15): reintroducing one outside _checkpoint.py fails below too.
_CHECKPOINT_PRIVATES_OF_OLD = {
    "_local_path", "_data_dict", "_files", "_uri", "_storage_options", "_node_ref",
    "_resolved_from", "_known_uris", "_with_node_ref",
}
# Where Checkpoint's private state may be touched: its own module and its sources'.
_CHECKPOINT_HOMES = {"dckpt/_checkpoint.py", "dckpt/_sources.py"}


def _checkpoint_privates() -> set[str]:
    from dckpt import Checkpoint

    names = set(vars(Checkpoint)) | set(vars(Checkpoint.from_dict({})))
    # _SERIALIZED_ATTRS is Ray's contract with subclasses, theirs to set.
    return {name for name in names if name.startswith("_") and not name.startswith("__")
            and name != "_SERIALIZED_ATTRS"} | _CHECKPOINT_PRIVATES_OF_OLD


def _private_uses(tree: ast.AST, privates: set[str]) -> list[tuple[int, str]]:
    """``x._name`` for a Checkpoint private ``_name``, except a class's own
    ``self._name`` in a class that is no Checkpoint (a stream's own ``self._files``)."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, own_self: bool) -> None:
        if isinstance(node, ast.ClassDef):
            own_self = not any(ast.unparse(base).endswith("Checkpoint") for base in node.bases)
        if (isinstance(node, ast.Attribute) and node.attr in privates
                and not (own_self and isinstance(node.value, ast.Name)
                         and node.value.id in ("self", "cls"))):
            found.append((node.lineno, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, own_self)

    visit(tree, own_self=False)
    return found


def test_no_module_touches_a_checkpoint_private():
    """dckpt's other packages read a Checkpoint through its public and developer API
    (source_of, node_ref_of, with_node_ref), never its private attributes."""
    privates = _checkpoint_privates()
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {text}"
        for path in sorted((ROOT / "dckpt").rglob("*.py"))
        if path.relative_to(ROOT).as_posix() not in _CHECKPOINT_HOMES
        for line, text in _private_uses(ast.parse(path.read_text()), privates)
    ]
    assert offenders == [], f"Checkpoint privates touched outside _checkpoint.py: {offenders}"
    assert {"_source", "_metadata", "_pickled_state"} <= privates  # the guard sees them


def test_the_private_guard_sees_what_it_must():
    privates = _checkpoint_privates()
    caught = _private_uses(ast.parse(
        "def put(checkpoint):\n"
        "    return checkpoint._local_path or checkpoint._source\n"
        "class TorchCheckpoint(Checkpoint):\n"
        "    def f(self):\n"
        "        return self._with_node_ref(None)\n"
        "class ChunkSource:\n"
        "    def f(self):\n"
        "        return self._files\n"
    ), privates)
    assert [text for _, text in caught] == [
        "checkpoint._local_path", "checkpoint._source", "self._with_node_ref"]


# -- the architecture: DESIGN.md's layers, and no reaching into another package --------

# Every part of dckpt/ and its layer, lowest first (DESIGN.md: formats < storage < node <
# transfer < cluster < API < apps). An import may point to its own layer or below. A
# module's part is the longest entry that prefixes its dotted name.
_LAYERS: list[tuple[str, set[str]]] = [
    # DESIGN.md lists errors.py with the API, being public; but every layer raises its
    # types, so it sits under all of them (it imports nothing of dckpt), as do the
    # settings' loader and the machine-wide locks that formats' atomic writes use.
    ("floor", {"dckpt.errors", "dckpt._config", "dckpt._locks"}),
    ("formats", {"dckpt._formats"}),
    ("storage", {"dckpt._storage"}),
    ("node", {"dckpt._node"}),
    ("transfer", {"dckpt._transfer"}),
    # _compat.py: the touches of distributed's internals, for cluster/ and predict/.
    ("cluster", {"dckpt.cluster", "dckpt._compat"}),
    ("API", {"dckpt", "dckpt._checkpoint", "dckpt._checkpoint_reading",
             "dckpt._checkpoint_writing", "dckpt._checkpoint_travel", "dckpt._sources",
             "dckpt._shared_dir", "dckpt._put"}),
    # The apps, in the order they build on each other: a framework module of train/
    # gives its framework's predictor too (ray.train.torch.TorchPredictor), the demo
    # trains and predicts, the command line runs the demo.
    ("predict", {"dckpt.predict"}),
    ("train", {"dckpt.train"}),
    ("air, demo, dashboard", {"dckpt.air", "dckpt.demo", "dckpt.dashboard"}),
    ("cli", {"dckpt.cli", "dckpt.__main__"}),
]

# (importer, imported module): the imports that point up, each with its reason.
_UPWARD_IMPORTS: dict[tuple[str, str], str] = {}

# (importer, private module of another package): each with its reason. What a package
# shares with others it exports in its __init__ (formats' helpers, NodeRef and put).
_PRIVATE_REACHES = {
    ("dckpt._checkpoint", "dckpt.cluster._resolve"):
        "node references resolve through the cluster, imported at call time (it imports "
        "distributed); make_ref and pinned_copy are plumbing, not dckpt.cluster's face.",
    ("dckpt._checkpoint_travel", "dckpt.cluster._resolve"):
        "make_ref, for a directory pickled on a worker: the same plumbing.",
    ("dckpt._checkpoint_travel", "dckpt.cluster._push"):
        "push_for_pickling: the same plumbing, for a driver's large checkpoint pickled.",
    ("dckpt._put", "dckpt.cluster._push"):
        "dckpt.put's cluster half (push a directory, have nodes' stores materialize it): "
        "plumbing of the one public put, not dckpt.cluster's face.",
    ("dckpt.train._persist", "dckpt.cluster._store"):
        "driver_store(): the persister drops the driver's cached copy once persisted; "
        "the driver's store is no public object.",
    ("dckpt.train._persist", "dckpt.cluster._forget"):
        "forget(): unregister a checkpoint the manager dropped, on every node; plumbing.",
}


def _modules() -> dict[str, Path]:
    """Every module of dckpt/ by dotted name (a package by its __init__.py)."""
    out = {}
    for path in sorted((ROOT / "dckpt").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, source: str, modules: set[str]) -> list[tuple[int, str, str]]:
    """``(line, imported module, dotted name used)`` for each of dckpt's names that
    module ``name`` imports or reaches through an imported module's attributes: at
    module level, in functions and under ``TYPE_CHECKING`` alike."""
    is_package = f"{name}.__init__" in modules or any(m.startswith(name + ".") for m in modules)
    package = name if is_package else name.rpartition(".")[0]

    def module_of(dotted: str) -> str:
        while dotted not in modules and "." in dotted:
            dotted = dotted.rpartition(".")[0]
        return dotted

    tree = ast.parse(source)
    found: list[tuple[int, str, str]] = []
    aliases: dict[str, str] = {}  # local name -> the dckpt module or name it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dckpt":
                    found.append((node.lineno, module_of(alias.name), alias.name))
                    bound = alias.name if alias.asname else alias.name.split(".")[0]
                    aliases[alias.asname or alias.name.split(".")[0]] = bound
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.split(".")[0] != "dckpt":
                continue
            for alias in node.names:
                dotted = f"{base}.{alias.name}"
                found.append((node.lineno, module_of(dotted), dotted))
                aliases[alias.asname or alias.name] = dotted
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        # module.attr.attr... on a name bound to one of dckpt's modules (whole chains only)
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            chain, root = [node.attr], node.value
            while isinstance(root, ast.Attribute):
                chain.append(root.attr)
                root = root.value
            if isinstance(root, ast.Name) and root.id in aliases and aliases[root.id] in modules:
                dotted = ".".join([aliases[root.id], *reversed(chain)])
                found.append((node.lineno, module_of(dotted), dotted))
    return found


def _part(name: str) -> str:
    """The entry of :data:`_LAYERS` that module ``name`` belongs to."""
    return max((part for _, parts in _LAYERS for part in parts
                if name == part or name.startswith(part + ".")), key=len)


def _layer(name: str) -> int:
    part = _part(name)
    return next(i for i, (_, parts) in enumerate(_LAYERS) if part in parts)


def _upward(name: str, source: str, modules: set[str]) -> list[tuple[int, str]]:
    """``(line, imported module)`` for each import of ``name`` that points up a layer."""
    return sorted({(line, target) for line, target, _ in _imports(name, source, modules)
                   if _layer(target) > _layer(name)})


def _owner(dotted: str, modules: set[str]) -> str | None:
    """The package that owns ``dotted`` if it is private, None if it is public. A
    private module's owner is the package it is in (``dckpt._formats._atomic.x`` ->
    ``dckpt._formats``, ``dckpt._formats.x`` -> ``dckpt``: a private package's exports
    are for its parent); a private name in a module belongs to the module's package
    (``dckpt.predict._predictor._kind`` -> ``dckpt.predict``)."""
    parts = dotted.split(".")
    module = next(i for i in range(len(parts), 0, -1)
                  if ".".join(parts[:i]) in modules or i == 1)
    owners = [i for i in range(1, module) if parts[i].startswith("_")
              and not parts[i].startswith("__")]
    if any(p.startswith("_") and not p.startswith("__") for p in parts[module:]):
        is_package = any(m.startswith(".".join(parts[:module]) + ".") for m in modules)
        owners.append(module if is_package else module - 1)
    return ".".join(parts[: max(owners)]) if owners else None


def _reaches(name: str, source: str, modules: set[str]) -> list[tuple[int, str, str]]:
    """``(line, private module, name used)`` for each private name of another package
    that module ``name`` uses. A package's own modules and subpackages may use its
    private names (dckpt.cluster uses dckpt._config), no one else."""
    out = set()
    for line, target, dotted in _imports(name, source, modules):
        owner = _owner(dotted, modules)
        if owner is not None and not (name == owner or name.startswith(owner + ".")):
            # Report the private module: the owner plus its next part.
            out.add((line, ".".join(dotted.split(".")[: len(owner.split(".")) + 1]), dotted))
    return sorted(out)


def test_every_part_of_dckpt_has_a_layer():
    # Only dckpt/__init__.py itself may fall to the entry "dckpt".
    unplaced = [name for name in _modules() if name != "dckpt" and _part(name) == "dckpt"]
    assert unplaced == [], f"modules in no layer of _LAYERS (add their package): {unplaced}"


def test_imports_point_down_the_layers():
    """DESIGN.md: each layer uses only the ones below it, at import time or call time."""
    modules = _modules()
    found = {(name, target): line for name, path in modules.items()
             for line, target in _upward(name, path.read_text(), set(modules))}
    offenders = [f"{modules[name].relative_to(ROOT)}:{line} imports {target}"
                 for (name, target), line in sorted(found.items())
                 if (name, target) not in _UPWARD_IMPORTS]
    assert offenders == [], "imports pointing up a layer: " + "; ".join(offenders)
    stale = set(_UPWARD_IMPORTS) - set(found)
    assert not stale, f"listed in _UPWARD_IMPORTS but gone, remove them: {sorted(stale)}"


def test_no_module_reaches_into_another_packages_private_names():
    """DESIGN.md: what two layers share is public in the lower one."""
    modules = _modules()
    found: dict[tuple[str, str], list[str]] = {}
    for name, path in modules.items():
        for line, private, dotted in _reaches(name, path.read_text(), set(modules)):
            found.setdefault((name, private), []).append(
                f"{path.relative_to(ROOT)}:{line} uses {dotted}")
    offenders = [use for key, uses in sorted(found.items()) if key not in _PRIVATE_REACHES
                 for use in uses]
    assert offenders == [], "private names of another package: " + "; ".join(offenders)
    stale = set(_PRIVATE_REACHES) - set(found)
    assert not stale, f"listed in _PRIVATE_REACHES but gone, remove them: {sorted(stale)}"


def test_the_architecture_guards_see_what_they_must():
    modules = set(_modules())
    source = (
        "import dckpt.cluster\n"
        "from dckpt import _config, _node\n"
        "from dckpt._formats._atomic import atomic_directory\n"
        "from dckpt import _transfer as t\n"
        "from .._storage import _read\n"
        "def f():\n"
        "    from dckpt._checkpoint import Checkpoint\n"
        "    return dckpt.cluster._store.local_store(), t._frames, _node.node_id()\n"
    )
    assert _upward("dckpt._transfer._receive", source, modules) == [
        (1, "dckpt.cluster"), (7, "dckpt._checkpoint"), (8, "dckpt.cluster._store")]
    assert _upward("dckpt.cluster._store", source, modules) == [(7, "dckpt._checkpoint")]
    assert [(line, private) for line, private, _ in
            _reaches("dckpt._transfer._receive", source, modules)] == [
        (3, "dckpt._formats._atomic"), (5, "dckpt._storage._read"), (8, "dckpt.cluster._store")]
    # Within its own package a module may use the package's private names.
    assert _reaches("dckpt._formats._packing", "from dckpt._formats._atomic import x\n",
                    modules) == []
    # A private package's exports are for its parent's modules; a module's private
    # names for its package's.
    assert _reaches("dckpt.cluster._store", "from dckpt._formats import atomic_directory\n"
                    "from dckpt.cluster._cache import _Entry\n", modules) == []
    assert [private for _, private, _ in _reaches(
        "dckpt.cluster._store", "from dckpt.predict._predictor import _kind\n",
        modules)] == ["dckpt.predict._predictor"]


# -- the public face: every name a user imports is in the README's API section ----------

def _public_modules() -> list[str]:
    """dckpt's modules with no underscore in their dotted name (``__main__`` aside)."""
    return [name for name in _modules()
            if not any(part.startswith("_") for part in name.split("."))]


def _readme_api() -> dict[str, list[str]]:
    """``{module: [names]}`` from the README's ``## API`` lines ``- `module`: `a`, ...``."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    api = {}
    for line in section.splitlines():
        match = re.match(r"- `(dckpt[\w.]*)`: (.*)", line)
        if match:
            api[match[1]] = re.findall(r"`(\w+)`", match[2].split(" (the ")[0])
    return api


def _module_level_names(source: str) -> tuple[set[str], set[str]]:
    """(names a module defines, names it imports from dckpt) without a leading
    underscore, at module level outside ``if TYPE_CHECKING:`` (what an import of it
    can get). Names imported from other packages are theirs, not dckpt's face."""
    defined: set[str] = set()
    imported: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "")
                                                   .split(".")[0] == "dckpt"):
            imported |= {alias.asname or alias.name for alias in node.names}
    return ({n for n in defined if not n.startswith("_")},
            {n for n in imported if not n.startswith("_")})


def test_the_readme_lists_every_public_module_and_its_names():
    api = _readme_api()
    assert sorted(api) == sorted(_public_modules()), (
        "the README's API section and dckpt's modules without an underscore differ")
    for name, names in api.items():
        module = importlib.import_module(name)
        assert sorted(module.__all__) == sorted(names), f"{name}: __all__ != README"
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert missing == [], f"{name}.__all__ names what it lacks: {missing}"


def test_nothing_else_is_importable_without_an_underscore():
    """A public module's names are its __all__, or public names of another module."""
    api = _readme_api()
    everywhere = {n for names in api.values() for n in names}
    modules = _modules()
    offenders = []
    for name in _public_modules():
        defined, imported = _module_level_names(modules[name].read_text())
        offenders += [f"{name}.{n}" for n in sorted(defined - set(api[name]))]
        offenders += [f"{name}.{n}" for n in sorted(imported - everywhere)
                      if f"{name}.{n}" not in modules]  # a subpackage (dckpt.air.session)
    assert offenders == [], (
        "importable without an underscore but not in the README's API section (rename "
        "it with a leading underscore, or move it to a private module): "
        + ", ".join(offenders))


def test_the_public_face_guard_sees_what_it_must():
    defined, imported = _module_level_names(
        "from typing import TYPE_CHECKING\n"
        "from dckpt._node import node_id, cache_directory as _cache\n"
        "from pathlib import Path\n"
        "if TYPE_CHECKING:\n"
        "    from dckpt.cluster import NodeRef\n"
        "LIMIT = 3\n"
        "_HIDDEN = 4\n"
        "def helper(): ...\n"
        "class Thing: ...\n")
    assert defined == {"LIMIT", "helper", "Thing"}
    assert imported == {"node_id"}


# -- module size: a module stays under ~600 lines (STYLE.md), split along its seams ------

_MAX_MODULE_LINES = 600

# module -> why it cannot be split; none today. An entry names one module and its reason.
_LONG_MODULES: dict[str, str] = {}


def _too_long(modules: dict[str, Path], root: Path = ROOT,
              limit: int = _MAX_MODULE_LINES) -> list[str]:
    """``"path: N lines"`` (relative to ``root``) for each module of ``modules`` longer
    than ``limit`` lines that :data:`_LONG_MODULES` does not excuse, longest first."""
    counts = {name: len(path.read_text().splitlines()) for name, path in modules.items()}
    return [f"{modules[name].relative_to(root)}: {count} lines"
            for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            if count > limit and name not in _LONG_MODULES]


def test_every_module_stays_under_600_lines():
    """STYLE.md: modules of about 100-400 lines; one that passes ~600 is split where
    its jobs part (e.g. the façade's reading, writing and pickling)."""
    offenders = _too_long(_modules())
    assert offenders == [], (
        f"modules over {_MAX_MODULE_LINES} lines (split each along a seam, one job per "
        "module): " + "; ".join(offenders))
    stale = set(_LONG_MODULES) - set(_modules())
    assert not stale, f"listed in _LONG_MODULES but gone, remove them: {sorted(stale)}"


def test_the_module_size_guard_sees_what_it_must(tmp_path: Path):
    (tmp_path / "short.py").write_text("x = 1\n" * 600)
    (tmp_path / "long.py").write_text("x = 1\n" * 601)
    (tmp_path / "longer.py").write_text("x = 1\n" * 900)
    modules = {name: tmp_path / f"{name}.py" for name in ("short", "long", "longer")}
    assert _too_long(modules, tmp_path) == ["longer.py: 900 lines", "long.py: 601 lines"]
    # The counts are of lines, not of statements: blank lines and docstrings count too.
    (tmp_path / "short.py").write_text('"""\n' + "\n" * 600 + '"""\n')
    assert "short.py: 602 lines" in _too_long(modules, tmp_path)
    # ... and every module of dckpt/ is counted, packages by their __init__.py.
    assert _modules()["dckpt.cluster"].name == "__init__.py"
    assert len(_modules()) > 100
