"""The project's own files agree with each other: README, CI, pyproject, conda env."""

from __future__ import annotations

import ast
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
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in [line.strip() for line in ci]


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
# helper, issue 15): reintroducing one outside checkpoint.py fails below too.
_CHECKPOINT_PRIVATES_OF_OLD = {
    "_local_path", "_data_dict", "_files", "_uri", "_storage_options", "_node_ref",
    "_resolved_from", "_known_uris", "_with_node_ref",
}
# Where Checkpoint's private state may be touched: its own module and its sources'.
_CHECKPOINT_HOMES = {"dckpt/checkpoint.py", "dckpt/_sources.py"}


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
    assert offenders == [], f"Checkpoint privates touched outside checkpoint.py: {offenders}"
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
