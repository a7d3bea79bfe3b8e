"""Reading what arrives in the master's JSON feeds, and how far behind each mirror is.

Blocking file reads, meant for the thread pool (:func:`decnet.threads.run_in_pool`): the
live view calls :meth:`FeedTail.read_new` on a timer and prints what it gets.
Only whole lines are consumed; a line the feed builder is still writing waits
for the next read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from decnet.events.query import event_params

__all__ = ["FeedTail", "event_params", "parse_entries", "size_of", "split_lines"]

READ_LIMIT = 4 * 1024 * 1024  # at most this much of one feed per read


def split_lines(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Whole lines (without LF) and the unfinished rest."""
    *lines, rest = buffer.split(b"\n")
    return lines, rest


def parse_entries(lines: list[bytes]) -> list[dict]:
    """The JSON object of each line; a line that is not JSON is kept as ``unparsed``."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            doc = {"parsed": False, "raw": line.decode("utf-8", "replace")}
        if isinstance(doc, dict):
            out.append(doc)
    return out


class FeedTail:
    """New entries of a set of feed files since the last read (or since :meth:`skip_to_end`)."""

    def __init__(self, paths: dict[str, Path]):
        self.paths = dict(paths)
        self.offsets: dict[str, int] = dict.fromkeys(self.paths, 0)

    def skip_to_end(self) -> None:
        """Start from what the feeds hold now: only what arrives later is read."""
        for name, path in self.paths.items():
            self.offsets[name] = size_of(path) or 0

    def read_new(self) -> list[dict]:
        entries = []
        for name, path in self.paths.items():
            entries += self._read(name, path)
        return entries

    def _read(self, name: str, path: Path) -> list[dict]:
        offset = self.offsets[name]
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < offset:  # the feed was removed and rebuilt: start again
                    offset = 0
                if size == offset:
                    self.offsets[name] = offset
                    return []
                fh.seek(offset)
                chunk = fh.read(min(size - offset, READ_LIMIT))
        except FileNotFoundError:
            return []
        lines, rest = split_lines(chunk)
        self.offsets[name] = offset + len(chunk) - len(rest)
        return parse_entries(lines)


def size_of(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def sizes(paths: dict[str, tuple[Path, Path]]) -> dict[str, tuple[int | None, int | None]]:
    """``{worker: (decoy log size, mirror size)}`` for the log lag column."""
    return {name: (size_of(local), size_of(mirror)) for name, (local, mirror) in paths.items()}


def entry_order(entry: dict) -> tuple:
    """Entries of several feeds in the order they happened (their timestamp, then offset)."""
    return (entry.get("timestamp") or entry.get("received_at") or "", entry.get("mirror_offset", 0))
