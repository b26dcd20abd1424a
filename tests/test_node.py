"""dckpt._node: node id, shared paths and the node-local folders, from settings alone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import dask.config
import pytest

from dckpt import _node


@pytest.fixture(autouse=True)
def _no_node_settings():
    # The developer's own ~/.config/dask or DASK_DCKPT__* variables must not leak in.
    with dask.config.set(
        {"dckpt.node-id": None, "dckpt.shared-paths": [], "dckpt.node-root": None}
    ):
        yield


# -- node_id --------------------------------------------------------------------------


def test_node_id_defaults_to_the_host_name():
    assert _node.node_id() == socket.gethostname()


def test_node_id_from_config():
    with dask.config.set({"dckpt.node-id": "node-7"}):
        assert _node.node_id() == "node-7"


def test_empty_node_id_means_the_host_name():
    with dask.config.set({"dckpt.node-id": ""}):
        assert _node.node_id() == socket.gethostname()


@pytest.mark.parametrize(("value", "expected"), [("node-1", "node-1"), ("7", "7")])
def test_node_id_from_an_environment_variable(value, expected):
    # Parsed the way a worker parses its environment: DASK_DCKPT__NODE_ID becomes the
    # key dckpt.node_id (underscore) and "7" becomes the int 7.
    parsed = dask.config.collect_env({"DASK_DCKPT__NODE_ID": value})
    assert list(parsed["dckpt"]) == ["node_id"]
    with dask.config.set({"dckpt.node_id": parsed["dckpt"]["node_id"]}):
        assert _node.node_id() == expected


# -- shared paths ---------------------------------------------------------------------


def test_no_shared_paths_by_default():
    assert _node.shared_paths() == []
    assert not _node.is_shared_path("/data/shared/x")


def test_shared_paths_are_normalized_and_deduplicated():
    with dask.config.set(
        {"dckpt.shared-paths": ["/data/shared/", "/data//shared", "/mnt/a/../b", "~/nfs"]}
    ):
        assert _node.shared_paths() == [
            "/data/shared",
            "/mnt/b",
            os.path.join(os.path.expanduser("~"), "nfs"),
        ]


def test_a_single_string_is_one_shared_path():
    with dask.config.set({"dckpt.shared-paths": "/data/shared"}):
        assert _node.shared_paths() == ["/data/shared"]
        assert _node.is_shared_path("/data/shared/x")


def test_relative_shared_path_setting_is_refused():
    with dask.config.set({"dckpt.shared-paths": ["data/shared"]}):
        with pytest.raises(ValueError, match="relative path 'data/shared'.*absolute"):
            _node.shared_paths()


@pytest.mark.parametrize(
    ("path", "shared"),
    [
        ("/data/shared", True),
        ("/data/shared/", True),
        ("/data/shared/run/ckpt", True),
        ("/data/shared/run/../ckpt", True),
        ("/data/shared2", False),
        ("/data/shared2/x", False),
        ("/data/shared/../shared2/x", False),
        ("/data", False),
        ("/data/shar", False),
        ("/other/x", False),
        ("//data/shared/x", True),
    ],
)
def test_is_shared_path_compares_whole_components(path, shared):
    with dask.config.set({"dckpt.shared-paths": ["/data/shared/"]}):
        assert _node.is_shared_path(path) is shared
        assert _node.is_shared_path(Path(path)) is shared


def test_relative_paths_are_taken_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "shared").mkdir()
    (tmp_path / "local").mkdir()
    with dask.config.set({"dckpt.shared-paths": [str(tmp_path / "shared")]}):
        monkeypatch.chdir(tmp_path / "shared")
        assert _node.is_shared_path("run/ckpt")
        assert _node.is_shared_path(".")
        assert not _node.is_shared_path("../local/ckpt")
        monkeypatch.chdir(tmp_path / "local")
        assert not _node.is_shared_path("run/ckpt")
        assert _node.is_shared_path("../shared/run")


def test_root_as_shared_path_shares_everything():
    with dask.config.set({"dckpt.shared-paths": ["/"]}):
        assert _node.is_shared_path("/anything/at/all")


def test_symbolic_links_are_not_resolved(tmp_path):
    # The path is judged by its name: the link may point elsewhere on another node.
    (tmp_path / "shared").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "shared")
    with dask.config.set({"dckpt.shared-paths": [str(tmp_path / "shared")]}):
        assert not _node.is_shared_path(tmp_path / "link" / "x")


# -- node root and cache --------------------------------------------------------------


def test_node_root_from_config_is_created(tmp_path):
    root = tmp_path / "a" / "root"
    with dask.config.set({"dckpt.node-root": str(root) + "/"}):
        assert _node.node_root() == str(root)
        assert root.is_dir()
        assert _node.cache_directory() == str(root / "cache")
        assert (root / "cache").is_dir()


def test_default_node_root_is_named_after_the_node_in_the_temporary_directory(tmp_path):
    settings = {"dckpt.temporary-directory": str(tmp_path), "dckpt.node-id": "rack/7 a"}
    with dask.config.set(settings):
        assert _node.node_root() == str(tmp_path / "dckpt-rack_7_a")
        assert _node.cache_directory() == str(tmp_path / "dckpt-rack_7_a" / "cache")
        assert (tmp_path / "dckpt-rack_7_a" / "cache").is_dir()


def test_node_root_and_cache_directory_are_idempotent(tmp_path):
    with dask.config.set({"dckpt.node-root": str(tmp_path / "r")}):
        assert _node.cache_directory() == _node.cache_directory()
        (tmp_path / "r" / "cache" / "kept").write_text("x")
        _node.cache_directory()
        assert (tmp_path / "r" / "cache" / "kept").read_text() == "x"
