"""Where Tune keeps a search's trials and their checkpoints: a folder, or a storage URI every Ray node reaches.

On one machine that is the results folder. On a cluster a trial may be restored on another node than the
one that wrote its checkpoint, so the checkpoints must be where every node reads them: an object store
(`s3://bucket/prefix`, `gs://...`, any URI pyarrow opens, as Ray does) or a folder on a mount shared by all
nodes. The driver's own files (study, state, SQLite stores, logs) stay in a local folder (`--local-path`):
SQLite wants a local disk, and only the driver reads them.

S3 credentials and endpoint come from the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for S3-compatible stores), set on every node.
"""
from __future__ import annotations

import fnmatch
import os
import re
import uuid
from pathlib import Path
from typing import Optional

from rekd.errors import UsageError

URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")


def is_uri(location: str) -> bool:
    return bool(URI.match(str(location)))


def resolve(location: str) -> str:
    """A URI as given (without a trailing slash), a folder as an absolute path."""
    if is_uri(location):
        return str(location).rstrip("/")
    return str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """`location/part/...` for a folder or a URI (a URI's query, if any, stays at the end)."""
    base, query = (location.split("?", 1) + [""])[:2] if is_uri(location) else (location, "")
    joined = "/".join([base.rstrip("/"), *parts])
    return f"{joined}?{query}" if query else joined


def filesystem(location: str):
    """(pyarrow filesystem, path in it) for a folder or a URI, opened as Ray opens its storage path."""
    import pyarrow.fs

    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), str(location)
    return pyarrow.fs.FileSystem.from_uri(location)


def read_text(fs, path: str) -> Optional[str]:
    """A file's text, or None if it is not there."""
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()
    except FileNotFoundError:
        return None


def names(fs, folder: str, pattern: str) -> list[str]:
    """The names of the files in `folder` that match the glob `pattern` (none if the folder is missing)."""
    import pyarrow.fs

    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.File
                  and fnmatch.fnmatch(i.base_name, pattern))


def check_reachable(location: str) -> None:
    """A storage URI can be written, probed with one small object that is removed again: a wrong bucket,
    endpoint or credential stops the search here, in one line, instead of failing every trial later."""
    try:
        fs, path = filesystem(location)
        fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/.rekd-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        fs.delete_file(probe)
    except Exception as e:  # pyarrow raises OSError, ValueError or its own ArrowInvalid for a bad URI
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--storage-path {location} cannot be written: {first[:300]}; check the URI and the "
                         "storage credentials (AWS_* variables for s3://) on this machine and every Ray node") \
            from None


def checkpoint_candidates(path: str, fs, filename: str) -> list[str]:
    """Where a restored trial can continue from, best first: the checkpoint folder Tune's experiment state
    names, if its `filename` is there; otherwise the trial's newer checkpoint folders, newest first.

    Tune deletes a trial's superseded checkpoint as soon as it registers the next one, and only names the
    new one in its next experiment snapshot; a driver killed in between leaves a snapshot that points at a
    deleted folder while its successor is on disk. The successor is the same trial further on.
    """
    import pyarrow.fs

    registered = f"{path.rstrip('/')}/{filename}"
    if fs.get_file_info(registered).type == pyarrow.fs.FileType.File:
        return [path]
    trial_folder, _, name = path.rstrip("/").rpartition("/")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(trial_folder, allow_not_found=True))
    newer = sorted((i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name > name), reverse=True)
    return [p for p in newer if fs.get_file_info(f"{p}/{filename}").type == pyarrow.fs.FileType.File]
