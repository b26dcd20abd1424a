"""``dckpt cp SRC DST``: copy a checkpoint between directories, URIs and bytes files.

The copy holds what the :class:`~dckpt.Checkpoint` API would write (a bytes file
reads back with ``Checkpoint.from_bytes``, and one that ``to_bytes`` wrote copies to
what ``from_bytes(...).to_directory()`` gives), and it is atomic at DST: a directory
is built beside its place and renamed, a URI gets its commit marker last, a bytes
file is written to a hidden sibling and renamed. Bytes files are packed and unpacked
as streams (:func:`dckpt._formats.pack_directory_to_file`,
:func:`dckpt._formats.unpack_directory`): memory stays bounded whatever the size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from dckpt import _config, _storage
from dckpt._checkpoint import Checkpoint
from dckpt._formats import pack_directory_to_file, unpack_directory
from dckpt.cli import _output, _places
from dckpt.cli._listing import list_place
from dckpt.cli._progress_bar import progress

NAME = "cp"
SUMMARY = "copy a checkpoint between directories, URIs and bytes files"
DESCRIPTION = f"""\
Copy a checkpoint from SRC to DST: any of a local directory, a folder at a URI and a
bytes file (Checkpoint.to_bytes()) to any other, atomically at DST.

SRC is a folder at a URI when it has a scheme other than file:// (s3://..., gs://...)
or is a local folder with dckpt's upload markers, else a directory or a bytes file,
whichever it is.
DST is chosen by its name, unless --to says:
  a bytes file     when it ends in {_places.BYTES_SUFFIX} (or --to bytes; local paths only)
  a folder at URI  when it has a scheme other than file:// (or --to uri: a local
                   folder then gets the URI layout, commit marker included)
  a directory      otherwise (a path or file:// URI)
An existing DST is replaced only with --force.

A progress bar on stderr follows transfers of at least dckpt.cli.progress-min-bytes
(4MiB; DASK_DCKPT__CLI__PROGRESS_MIN_BYTES), when stderr is a terminal or --progress
is given. Copying may unpickle a subclass's state (as Checkpoint.from_directory()
does): copy only checkpoints you trust.
"""

_VERBS = {"directory": "write", "uri": "upload", "bytes": "pack"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``cp``."""
    parser.add_argument("src", metavar="SRC", help="a directory, a URI or a bytes file")
    parser.add_argument("dst", metavar="DST", help="where to write the copy")
    parser.add_argument("--to", choices=_places.KINDS,
                        help="the kind of DST, instead of telling it by its name")
    parser.add_argument("--force", "-f", action="store_true",
                        help="replace whatever is at DST")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--quiet", "-q", dest="progress", action="store_false", default=None,
                       help="print nothing on success, show no progress bar")
    shown.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help="show the progress bar even when stderr is not a terminal")
    _places.add_storage_option_argument(parser)


def run(args: argparse.Namespace) -> int:
    options = _places.storage_options(args.storage_options)
    src = _places.source(args.src, options)
    dst = _places.destination(args.dst, args.to, options)
    if _places.exists(dst) and not args.force:
        raise _output.CommandError(
            f"{args.dst} exists already; pass --force to replace it"
        )
    started = time.perf_counter()
    # Sizes for the bar and the summary, read without unpickling (a bytes file is
    # not decompressed twice: its size on disk says whether a bar is worth it).
    files = None if src.kind == "bytes" else list_place(src, ()).files
    total = None if files is None else sum(files.values())
    hint = os.path.getsize(src.location) if src.kind == "bytes" else None

    if src.kind == "directory":
        _write(src.location, dst, total, hint, args.progress)
    elif src.kind == "uri" and dst.kind == "directory" and not _storage.is_local_uri(src.location):
        # Straight into DST, atomically, by the Checkpoint API.
        with progress("download", total, show=args.progress) as callback:
            _places.load(src).to_directory(dst.location, callback=callback)
    elif src.kind == "bytes" and dst.kind == "directory":
        with open(src.location, "rb") as packed, \
                progress("unpack", total, show=args.progress, size_hint=hint) as callback:
            unpack_directory(packed, dst.location, callback=callback)
    else:
        # Into a local directory first, with a bar of its own, then on to DST.
        with tempfile.TemporaryDirectory(
            prefix="dckpt-cp-", dir=_config.temporary_directory()
        ) as scratch:
            local = os.path.join(scratch, "checkpoint")
            if src.kind == "uri":
                os.mkdir(local)
                with progress("download", total, show=args.progress) as callback:
                    _storage.download_directory(src.location, local,
                                               storage_options=src.storage_options,
                                               callback=callback)
            else:
                with open(src.location, "rb") as packed, \
                        progress("unpack", total, show=args.progress, size_hint=hint) as callback:
                    unpack_directory(packed, local, callback=callback)
            _write(local, dst, total, hint, args.progress)

    if files is None and dst.kind != "bytes":
        files = list_place(dst, ()).files
        total = sum(files.values())
    if args.progress is not False:
        written = (f" ({_output.size(os.path.getsize(dst.location))} packed)"
                   if dst.kind == "bytes" else "")
        count = "" if files is None else f" in {len(files)} files"
        print(f"copied {src} to {dst}{written}: {_output.size(total)}{count}, "
              f"{time.perf_counter() - started:.1f} s")
    return 0


def _write(
    directory: str, dst: _places.Place, total: int | None, hint: int | None,
    show: bool | None,
) -> None:
    """Write the checkpoint in the local ``directory`` to ``dst``.

    A bytes file is packed straight from the directory's files (control files
    included, as they are), streaming, so memory stays bounded whatever the size; it
    holds what ``Checkpoint.from_directory(directory).to_bytes()`` would. A local
    folder asked for as a URI (``--to uri``) gets the URI layout of
    :func:`dckpt._storage.upload_directory`, commit marker last.
    """
    with progress(_VERBS[dst.kind], total, show=show, size_hint=hint) as callback:
        if dst.kind == "bytes":
            pack_directory_to_file(directory, dst.location, callback=callback)
        elif dst.kind == "uri" and _storage.is_local_uri(dst.location):
            _storage.upload_directory(directory, dst.location, callback=callback)
        elif dst.kind == "uri":
            Checkpoint.from_directory(directory).to_uri(
                dst.location, storage_options=dst.storage_options, callback=callback)
        else:
            Checkpoint.from_directory(directory).to_directory(dst.location, callback=callback)
