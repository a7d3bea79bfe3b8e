"""Everything ``decnet-admin`` (and the sandbox's live view) shows a person goes through here.

Workers are not trusted: a compromised one answers with whatever text it likes,
and decoys log what attackers type.  A string from either must never drive the
operator's terminal (``ESC ] 0;title BEL``, ``ESC [2J``, a C1 ``CSI``, a
right-to-left override that makes ``txt.exe`` read ``exe.txt``).  So:

* :func:`printable` is the one escaping function: C0 and C1 controls, ESC, DEL,
  the Unicode bidi overrides, isolates and marks, and anything else Python does
  not call printable (line separators, format characters, unpaired surrogates)
  become ``\\xNN`` / ``\\uNNNN`` / ``\\UNNNNNNNN``;
* :func:`table`, :class:`StreamTable`, :func:`line`, :func:`text` and :func:`error`
  escape every cell and line on the way out; a newline only ever separates lines
  this layer made itself;
* :func:`print_json` writes ASCII-only JSON (``ensure_ascii``), in which every control
  character is a ``\\u`` escape.

Under ``--json`` (:func:`begin`, called once per command by :func:`decnet.cli.main.main`)
stdout is always JSON: the lines a command would print for a person are kept and end
up in the ``messages`` of one closing document (:func:`finish`) unless the command
printed its own; a command that streams (``sandbox up``) writes one JSON object per
line (NDJSON) instead; and every error is a JSON object on stderr.

Domain code returns data; only this module decides what reaches the terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

import attrs

# Escaped even where Python calls them printable (it does not, today: belt and braces,
# and the list the operator can check against docs/Security.md).
_C0 = frozenset(range(0x00, 0x20))
_C1 = frozenset(range(0x80, 0xA0))
_BIDI = frozenset([0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])
UNSAFE = _C0 | {0x7F} | _C1 | _BIDI

#: A table cell shows at most this many characters (``--json`` has the whole value).
CELL_MAX = 200


@attrs.define
class _Mode:
    """How the running command prints: text, one JSON document, or NDJSON."""

    as_json: bool = False
    streaming: bool = False
    documents: int = 0  # JSON documents (or NDJSON records) written to stdout
    messages: list[str] = attrs.Factory(list)


_mode = _Mode()


def begin(*, as_json: bool, streaming: bool = False) -> None:
    """Start a command's output: text, or (``as_json``) JSON only on stdout."""
    global _mode
    _mode = _Mode(as_json=as_json, streaming=streaming)


def json_mode() -> bool:
    """Whether the running command was given ``--json``."""
    return _mode.as_json


def printed_json() -> bool:
    """Whether the running command has written a JSON document to stdout already."""
    return _mode.documents > 0


def finish(code: int) -> None:
    """End a ``--json`` command that printed no document of its own with one that says
    how it ended and what it would have told a person."""
    if _mode.as_json and not _mode.documents:
        print_json({"ok": code == 0, "exit_code": code, "messages": _mode.messages})


def _keep(message: str, stream: IO[str] | None) -> bool:
    """Under ``--json``, a line meant for a person on stdout is kept (or streamed) as JSON."""
    if not _mode.as_json or (stream is not None and stream is not sys.stdout):
        return False
    if _mode.streaming:
        print_json({"message": message})
    else:
        _mode.messages.append(message)
    return True


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str, limit: int | None = None) -> str:
    """``text`` with every control, bidi or otherwise unprintable character escaped.

    With ``limit``, the result is cut to at most that many characters, ending in
    ``...``; a cut never splits an escape.
    """
    pieces: list[str] = []
    size = 0
    for ch in text:
        piece = ch if ch.isprintable() and ord(ch) not in UNSAFE else _escape(ch)
        if limit is not None and size + len(piece) > limit:
            while pieces and size > limit - 3:
                size -= len(pieces.pop())
            return "".join(pieces) + "..."
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def cell(value: object, limit: int = CELL_MAX) -> str:
    """One table cell: ``None`` is empty, anything else escaped and cut to ``limit``."""
    return "" if value is None else printable(str(value), limit)


def _join(cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = [c.ljust(w) for c, w in zip(cells, widths, strict=False)]
    return "  ".join([*padded, *cells[len(widths) :]]).rstrip()


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain, aligned text table (no colour codes: it must read well in a log too)."""
    cells = [[cell(h) for h in headers]] + [[cell(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [_join(row, widths) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class StreamTable:
    """A table whose rows are printed as they arrive (fleet commands).

    Column widths are fixed up front, from the headers and ``widths`` (what is
    known before anyone answers: host names, addresses, typical lengths), so
    that a slow host never holds back the line of another.  A longer cell makes
    its row wider instead of being cut further than :data:`CELL_MAX`.
    """

    def __init__(
        self,
        headers: Sequence[str],
        widths: Sequence[int] = (),
        write: Callable[[str], None] | None = None,
    ):
        self.write = write or line
        self.widths = [
            max(len(h), widths[i] if i < len(widths) else 0) for i, h in enumerate(headers[:-1])
        ]
        self.write(_join([cell(h) for h in headers], self.widths))
        self.write("  ".join("-" * w for w in [*self.widths, len(headers[-1])]))

    def row(self, values: Sequence[object]) -> None:
        self.write(_join([cell(v) for v in values], self.widths))


def line(message: object = "", stream: IO[str] | None = None) -> None:
    """Print one line: a newline or tab in ``message`` is escaped, never obeyed."""
    if _keep(str(message), stream):
        return
    stream = stream or sys.stdout
    stream.write(printable(str(message)) + "\n")
    stream.flush()


def text(block: str, stream: IO[str] | None = None) -> None:
    """Print several lines (a table this module built): each line is escaped on its own."""
    if _mode.as_json and (stream is None or stream is sys.stdout):
        for part in block.split("\n"):
            _keep(part, stream)
        return
    stream = stream or sys.stdout
    stream.write("".join(printable(part) + "\n" for part in block.split("\n")))
    stream.flush()


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    text(table(headers, rows))


def _dumps(doc: Any, *, indent: int | None) -> str:
    return json.dumps(doc, indent=indent, sort_keys=True, ensure_ascii=True) + "\n"


def print_json(doc: Any) -> None:
    """``doc`` as JSON: ASCII only, so no control character leaves unescaped.

    Indented, except in a streaming command, where it is one NDJSON record.
    """
    _mode.documents += 1
    sys.stdout.write(_dumps(doc, indent=None if _mode.streaming else 2))
    sys.stdout.flush()


def print_json_lines(lines: Sequence[str]) -> None:
    """JSON texts already encoded (ASCII only, one per line) as NDJSON records on stdout."""
    _mode.documents += len(lines)
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def print_ndjson(doc, stream=None) -> None:
    """``doc`` as one line of ASCII-only JSON (NDJSON for streaming commands)."""
    stream = stream or sys.stdout
    if stream is sys.stdout:
        _mode.documents += 1
    stream.write(json.dumps(doc, sort_keys=True, ensure_ascii=True) + "\n")
    stream.flush()


# The one terminal control this layer sends: cursor home, clear to the end of the screen.
HOME_CLEAR = "\x1b[H\x1b[J"


def screen(lines: Sequence[str], stream=None) -> None:
    """Redraw a whole terminal screen (``top``): home, clear, then ``lines``, each escaped."""
    stream = stream or sys.stdout
    stream.write(HOME_CLEAR + "".join(printable(line) + "\n" for line in lines))
    stream.flush()


def json_error(problems: Sequence[str], **fields: Any) -> None:
    """An error under ``--json``: one JSON object on stderr (``error`` is the first problem)."""
    doc = {"error": problems[0] if problems else "failed", "problems": list(problems), **fields}
    sys.stderr.write(_dumps(doc, indent=None))
    sys.stderr.flush()


def error(message: object) -> None:
    """One error line on stderr; under ``--json`` a JSON object."""
    if _mode.as_json:
        json_error([str(message)])
        return
    line(f"decnet-admin: error: {message}", sys.stderr)


def short_fp(fp: str | None) -> str:
    return fp[:16] if fp else "-"
