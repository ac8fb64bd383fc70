"""Reads a SQLite write-ahead log to tell a torn tail from damage SQLite would hide.

SQLite's own recovery keeps the WAL up to the first frame whose checksum fails and silently
ignores everything after it. That is right for a torn write at the end (those frames were never
acknowledged), but wrong when a bit flips in an older frame: every later, acknowledged
transaction would vanish without a word. So before the journal opens its database, this
module walks the WAL (format: https://www.sqlite.org/fileformat2.html#walformat) and reports a
damaged frame that has valid frames of the same WAL generation after it. It never writes.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Final

import msgspec

_HEADER_BYTES: Final = 32
_FRAME_HEADER_BYTES: Final = 24
_MAGIC_LITTLE: Final = 0x377F0682
_MAGIC_BIG: Final = 0x377F0683


class WalReport(msgspec.Struct, frozen=True):
    """What the walk found. `damaged_frame` is set only for damage followed by valid frames."""

    frames: int
    damaged_frame: int | None = None


def _checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def check_wal(path: Path) -> WalReport:
    """Walks the WAL at `path` (a missing or empty file is fine)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return WalReport(0)
    if len(data) < _HEADER_BYTES:
        return WalReport(0)  # a header torn mid-write: SQLite ignores the whole file
    magic, _version, page_size, _ckpt, salt1, salt2, c0, c1 = struct.unpack(">8I", data[:32])
    if magic not in (_MAGIC_LITTLE, _MAGIC_BIG):
        return WalReport(0)
    big = magic == _MAGIC_BIG
    if _checksum(data[:24], 0, 0, big) != (c0, c1):
        return WalReport(0)
    frame_bytes = _FRAME_HEADER_BYTES + page_size
    frames = (len(data) - _HEADER_BYTES) // frame_bytes
    # Checksums chain from frame to frame. After a damaged frame the chain may continue from
    # its stored checksum (its page was hit) or from its recomputed one (its checksum was hit),
    # so both are tried: damage then stays local to one frame.
    seeds = {(c0, c1)}
    damaged: int | None = None
    for index in range(frames):
        start = _HEADER_BYTES + index * frame_bytes
        header = data[start : start + _FRAME_HEADER_BYTES]
        content = header[:8] + data[start + _FRAME_HEADER_BYTES : start + frame_bytes]
        _pgno, _commit, f_salt1, f_salt2, f0, f1 = struct.unpack(">6I", header)
        if (f_salt1, f_salt2) != (salt1, salt2):
            break  # a frame of an earlier WAL generation: the current log ends here
        computed = {_checksum(content, s0, s1, big) for s0, s1 in seeds}
        good = (f0, f1) in computed
        if good and damaged is not None:
            # A frame that checks out after one that did not: the log was written past the
            # bad frame, so that frame is damage to acknowledged data, not a torn tail.
            return WalReport(frames, damaged)
        if not good and damaged is None:
            damaged = index
        seeds = {(f0, f1)} if good else {(f0, f1), *computed}
        if len(seeds) > 4:  # a run of bad frames: a torn tail, not worth following further
            seeds = {(f0, f1)}
    return WalReport(frames)
