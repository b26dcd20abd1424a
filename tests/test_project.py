"""The project's own files agree with each other: README, CI, pyproject, conda env."""

from __future__ import annotations

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
