"""Files: the uploads (``fine-tune``, ``batch``) and what batch jobs write (their output and
error files), stored under ``DATA_DIR/files/<id>`` with a record in the store.

A record's fields are a superset of both APIs' file objects (OpenAI's ``FileObject``,
Mistral's ``UploadFileOut``): each client reads the ones it knows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from galerne.platform.store import new_id, now

# Purposes a client may upload, and those galerne writes itself.
UPLOAD_PURPOSES = ("fine-tune", "batch")
OUTPUT_PURPOSES = ("batch_output",)
FILE_ID_PREFIX = "file-"


def file_object(record: dict[str, Any]) -> dict[str, Any]:
    """The wire object of a file record: OpenAI's fields and Mistral's."""
    return {
        "id": record["id"], "object": "file", "bytes": record["bytes"], "created_at": record["created_at"],
        "filename": record["filename"], "purpose": record["purpose"],
        "status": "processed", "status_details": None, "expires_at": None,  # OpenAI
        "sample_type": record.get("sample_type"), "num_lines": record.get("num_lines"), "source": "upload",
        "mimetype": record.get("mimetype"), "signature": None, "deleted": False,  # Mistral (its retrieve's answer)
    }


def add_file(platform, src: Path, *, filename: str, purpose: str, **doc: Any) -> dict[str, Any]:
    """Store the complete file ``src`` (renamed into ``files/``: it must be on the data
    directory's file system, e.g. under ``platform.data.tmp``) and record it. The file is in
    place before its record: a crash between the two leaves an unlisted file, never a record
    without its file."""
    file_id = new_id(FILE_ID_PREFIX)
    dest = platform.data.file(file_id)
    os.replace(src, dest)
    record = {"id": file_id, "created_at": now(), "purpose": purpose, "filename": filename,
              "bytes": dest.stat().st_size, **doc}
    try:
        platform.store.insert("files", record)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return record


def write_file(platform, data: bytes, *, filename: str, purpose: str, **doc: Any) -> dict[str, Any]:
    """Store ``data`` as a new file (a batch job's output): written whole under ``tmp/``,
    then :func:`add_file`."""
    tmp = platform.data.tmp(new_id("w-"))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return add_file(platform, tmp, filename=filename, purpose=purpose, **doc)


def delete_file(platform, file_id: str) -> bool:
    """Remove a file's record, then its bytes. False when there was no such record."""
    if not platform.store.delete("files", file_id):
        return False
    platform.data.file(file_id).unlink(missing_ok=True)
    return True
