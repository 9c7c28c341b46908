"""Zip input: extract safely into a temporary folder, read it, remove it.

Refused: members with absolute paths, drive letters or ``..`` components, symbolic links, encrypted members,
more than :data:`MAX_MEMBERS` members, and more than :data:`MAX_UNCOMPRESSED_BYTES` once uncompressed (checked
on the declared sizes first, then on the bytes actually written, so a lying header cannot fill the disk).
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..errors import PneumoctInputError

logger = logging.getLogger("pneumoct.io")

#: Cap on the total uncompressed size of a zip input.
MAX_UNCOMPRESSED_BYTES = 4 * 1024**3
#: Cap on the number of members.
MAX_MEMBERS = 200_000
_CHUNK = 1 << 20


def _size(n: float) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} bytes"


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename.replace("\\", "/")
    if not name:
        return "a member without a name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "a member with an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "a member whose path contains '..'"
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if "\x00" in name:
        return "a member name with a NUL character"
    return None


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        raise PneumoctInputError("corrupt_zip", "the zip file is damaged or is not a zip archive") from None


def check_zip(zf: zipfile.ZipFile, max_bytes: int | None = None) -> list[zipfile.ZipInfo]:
    """Validate every member; return the file members to extract."""
    max_bytes = MAX_UNCOMPRESSED_BYTES if max_bytes is None else max_bytes
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise PneumoctInputError("zip_too_large", f"the zip holds {len(infos)} members (limit {MAX_MEMBERS})")
    for info in infos:
        problem = _member_problem(info)
        if problem is not None:
            raise PneumoctInputError("unsafe_zip", f"unsafe zip refused: it contains {problem}")
        if info.flag_bits & 0x1:
            raise PneumoctInputError("encrypted_zip", "the zip is password-protected: give an unencrypted zip")
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise PneumoctInputError(
            "zip_too_large",
            f"the zip would uncompress to {_size(total)} (limit {_size(max_bytes)})",
        )
    return [i for i in infos if not i.is_dir()]


@contextlib.contextmanager
def extracted_zip(path: Path, *, max_bytes: int | None = None) -> Iterator[Path]:
    """Extract ``path`` into a fresh temporary folder, yield that folder, always remove it afterwards."""
    max_bytes = MAX_UNCOMPRESSED_BYTES if max_bytes is None else max_bytes
    tmp = Path(tempfile.mkdtemp(prefix="pneumoct-zip-"))
    try:
        root = tmp.resolve()
        with _open(Path(path)) as zf:
            members = check_zip(zf, max_bytes)
            written = 0
            try:
                for info in members:
                    target = (root / info.filename.replace("\\", "/")).resolve()
                    if root not in target.parents:
                        raise PneumoctInputError("unsafe_zip", "unsafe zip refused: a member would land outside")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        while True:
                            chunk = src.read(_CHUNK)
                            if not chunk:
                                break
                            written += len(chunk)
                            if written > max_bytes:
                                raise PneumoctInputError(
                                    "zip_too_large",
                                    f"the zip uncompresses to more than the limit of {_size(max_bytes)}",
                                )
                            dst.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError):
                raise PneumoctInputError(
                    "corrupt_zip", "the zip file is damaged (a member could not be extracted)"
                ) from None
        logger.debug("extracted %d zip member(s), %d bytes", len(members), written)
        yield root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
