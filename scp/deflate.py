"""Deflated data sets (Deflated Explicit VR Little Endian), inflated as a stream to a file.

The listener stores a deflated instance as it came (deflated); to read its
header and walk its structure it inflates the data set, chunk by chunk with a
bounded output per step, into a temporary file beside the received one (in
``.incoming``, with the received files' prefix, so a crash's leftover is swept)
and walks that. Memory stays at a few hundred kB whatever the data set
inflates to; what inflates to more than :data:`MAX_INFLATED_BYTES` (a
"deflate bomb": a few kB that claim gigabytes) is refused with 0xA700 before
the disk fills.
"""

from __future__ import annotations

import os
import secrets
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ctdx.scp.header_scan import file_meta_end
from ctdx.scp.prepared import TEMP_PREFIX
from ctdx.scp.status import Rejected, Status

__all__ = ["MAX_INFLATED_BYTES", "inflated"]

#: Largest inflated data set accepted (an Enhanced CT of 2,000 512x512 frames is 1 GiB).
MAX_INFLATED_BYTES = 2 * 1024**3
_CHUNK = 1 << 16
_OUTPUT_STEP = 1 << 20


@contextmanager
def inflated(received: Path, folder: Path | None = None) -> Iterator[Path]:
    """A temporary copy of ``received`` (File Meta as is) with its data set inflated, in
    ``folder`` (by default beside ``received``; an unnamed received file has no folder).

    Raises :class:`~scp.status.Rejected`: 0xC210 when the deflate stream is
    broken, 0xA700 when it inflates to more than :data:`MAX_INFLATED_BYTES`.
    The copy is deleted when the block ends.
    """
    folder = received.parent if folder is None else folder
    target = folder / f"{TEMP_PREFIX}inflated-{secrets.token_hex(8)}.dcm"
    try:
        with received.open("rb") as source, open(target, "xb") as out:
            try:
                start = file_meta_end(source)
            except ValueError as exc:
                raise Rejected(Status.CANNOT_PARSE, f"data set cannot be parsed ({exc})") from exc
            source.seek(0)
            out.write(source.read(start))  # preamble and File Meta: a few hundred bytes
            _inflate(source, out)
        yield target
    finally:
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass


def _inflate(source: IO[bytes], out: IO[bytes]) -> None:
    """Inflate what is left of ``source`` into ``out``, at most 1 MiB of output per step."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = 0
    limit = MAX_INFLATED_BYTES
    try:
        while chunk := source.read(_CHUNK):
            data = inflater.decompress(chunk, _OUTPUT_STEP)
            while True:
                written += len(data)
                if written > limit:
                    raise Rejected(Status.OUT_OF_RESOURCES,
                                   f"deflated data set inflates to more than {limit} bytes")
                out.write(data)
                if not inflater.unconsumed_tail:
                    break
                data = inflater.decompress(inflater.unconsumed_tail, _OUTPUT_STEP)
        out.write(inflater.flush())
    except zlib.error as exc:
        raise Rejected(Status.CANNOT_PARSE, "deflated data set cannot be inflated") from exc
