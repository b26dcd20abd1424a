"""``dckpt inspect SRC``: what a checkpoint is and holds, without unpickling it.

Reads the header (``.dckpt.json``: layout version, class, metadata) and the list of
files; the pickled control files (the dict, the preprocessor, a subclass's state) are
only noticed, never loaded, unless ``--unpickle`` is given. The class is reported as
recorded, not imported.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dckpt._formats.layout import (
    DICT_FILE,
    HEADER_FILE,
    PREPROCESSOR_FILE,
    STATE_FILE,
    CheckpointHeader,
    load_pickle,
)
from dckpt.cli import _output, _places
from dckpt.cli._listing import Listing, list_place
from dckpt.errors import CheckpointFormatError

_PICKLES = (DICT_FILE, PREPROCESSOR_FILE, STATE_FILE)
#: How the base class is named when a checkpoint records none.
_BASE_CLASS = "dckpt:Checkpoint"

NAME = "inspect"
SUMMARY = "show what a checkpoint is and holds, without unpickling it"
DESCRIPTION = """\
Show what a checkpoint is and holds: its kind, class, metadata, size, files (a tree
with sizes), whether it has a preprocessor, and its format version.

SRC is a local directory, a URI (s3://bucket/prefix, file:///path, any fsspec URI)
or a file written by Checkpoint.to_bytes(). Nothing is unpickled unless --unpickle
is given: checkpoints are pickles, so unpickle only those you trust.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``inspect``."""
    parser.add_argument("src", metavar="SRC", help="a directory, a URI or a bytes file")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.add_argument(
        "--unpickle", action="store_true",
        help="also load the pickled dict, preprocessor and subclass state, to show "
             "the dict's keys and the preprocessor's type (runs code from the checkpoint)",
    )
    _places.add_storage_option_argument(parser)


def run(args: argparse.Namespace) -> int:
    place = _places.source(args.src, _places.storage_options(args.storage_options))
    read = (HEADER_FILE, *_PICKLES) if args.unpickle else (HEADER_FILE,)
    listing = list_place(place, read)
    report = describe(place, listing, unpickle=args.unpickle)
    if args.json:
        _output.print_json(report)
    else:
        print(render(report, listing))
    return 0


def describe(place: _places.Place, listing: Listing, *, unpickle: bool) -> dict[str, Any]:
    """The report, as plain JSON-able data."""
    raw_header = listing.contents.get(HEADER_FILE)
    header = (CheckpointHeader.from_json(raw_header, f"{place.location}/{HEADER_FILE}")
              if raw_header is not None else None)
    report: dict[str, Any] = {
        "source": place.location,
        "kind": place.kind,
        "layout": "dckpt" if header is not None else "plain",
        "format_version": header.format_version if header is not None else None,
        "packed_format_version": listing.packed_version if place.kind == "bytes" else None,
        "uri_status": listing.status,
        "class": (header.checkpoint_class if header is not None else None) or _BASE_CLASS,
        "metadata": header.metadata if header is not None else {},
        "size": listing.total_bytes,
        "stored_size": listing.stored_bytes,
        "file_count": len(listing.files),
        "dict_data": DICT_FILE in listing.files,
        "preprocessor": PREPROCESSOR_FILE in listing.files,
        "subclass_state": STATE_FILE in listing.files,
        "files": dict(sorted(listing.files.items())),
        "links": dict(sorted(listing.links.items())),
    }
    if unpickle:
        report.update(_unpickled(place, listing))
    return report


def _unpickled(place: _places.Place, listing: Listing) -> dict[str, Any]:
    loaded = {}
    for name in _PICKLES:
        if name in listing.contents:
            source = f"{place.location}/{name}"
            try:
                loaded[name] = load_pickle(listing.contents[name], source)
            except CheckpointFormatError:
                raise
            except Exception as e:  # any error of foreign code, in one line
                raise _output.CommandError(
                    f"cannot unpickle {source}: {type(e).__name__}: {e}; install the "
                    "code it needs, or inspect without --unpickle"
                ) from e
    data, state = loaded.get(DICT_FILE), loaded.get(STATE_FILE)
    preprocessor = loaded.get(PREPROCESSOR_FILE)
    return {
        "dict_keys": [k if isinstance(k, str) else repr(k) for k in data]
        if isinstance(data, dict) else None,
        "preprocessor_type": _type_name(preprocessor) if PREPROCESSOR_FILE in loaded else None,
        "subclass_state_keys": sorted(map(str, state)) if isinstance(state, dict) else None,
    }


def _type_name(value: object) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def render(report: dict[str, Any], listing: Listing) -> str:
    """The report as text for people."""
    kind = report["kind"]
    if report["format_version"] is not None:
        kind += f", dckpt layout version {report['format_version']}"
    else:
        kind += ", plain (no dckpt header)"
    if report["packed_format_version"] is not None:
        kind += f", packed format version {report['packed_format_version']}"
    if report["uri_status"] is not None:
        kind += f", {report['uri_status']}"
    size = f"{_output.size(report['size'])} in {report['file_count']} files"
    if report["stored_size"] is not None:
        size += f" ({_output.size(report['stored_size'])} packed)"
    lines = [
        ("source", report["source"]),
        ("kind", kind),
        ("class", report["class"]),
        ("metadata", json.dumps(report["metadata"], sort_keys=True)),
        ("size", size),
        ("data", _data_line(report)),
        ("preprocessor", _preprocessor_line(report)),
    ]
    if report["subclass_state"]:
        keys = report.get("subclass_state_keys")
        lines.append(("state", "subclass attributes" + (f": {', '.join(keys)}" if keys else "")))
    width = max(len(name) for name, _ in lines) + 1
    text = [f"{name + ':':<{width}} {value}" for name, value in lines]
    text.append("files:")
    text.extend(f"  {line}" for line in tree(listing))
    return "\n".join(text)


def _data_line(report: dict[str, Any]) -> str:
    if not report["dict_data"]:
        return "files only"
    keys = report.get("dict_keys")
    if keys is None:
        return f"a pickled dict ({DICT_FILE}; pass --unpickle to list its keys)"
    return f"a pickled dict with keys: {', '.join(map(str, keys))}"


def _preprocessor_line(report: dict[str, Any]) -> str:
    if not report["preprocessor"]:
        return "none"
    kind = report.get("preprocessor_type")
    return f"yes ({kind})" if kind else f"yes ({PREPROCESSOR_FILE}, pickled)"


def tree(listing: Listing) -> list[str]:
    """The files as an indented tree, folders first, with sizes right-aligned."""
    entries: dict[str, str] = {path: _output.size(size) for path, size in listing.files.items()}
    entries.update({path: f"-> {target}" for path, target in listing.links.items()})
    folders = set(listing.directories)
    for path in entries:
        parts = path.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, depth: int) -> None:
        def children(names: set[str] | dict[str, str]) -> list[str]:
            return sorted(p for p in names
                          if p.startswith(prefix) and "/" not in p[len(prefix):])
        for folder in children(folders):
            rows.append(("  " * depth + folder[len(prefix):] + "/", ""))
            walk(folder + "/", depth + 1)
        for path in children(entries):
            rows.append(("  " * depth + path[len(prefix):], entries[path]))

    walk("", 0)
    width = max((len(name) for name, _ in rows), default=0)
    return [f"{name:<{width}}  {value}".rstrip() for name, value in rows]
