"""The forwarder's generation journal: what it must remember across a crash, and
the pure planner that turns it back into files to read.

A stream is every **generation** of the log file, in order: the file at the
path, then the file that replaced it after a rotation, and so on.  The journal
(persisted by :mod:`decnet.forwarder.offsets`) holds, per stream:

* ``acked``: everything below this logical offset is durable on the master;
* one :class:`GenerationRecord` per generation the forwarder has opened: its
  file identity (device, inode, fingerprint of its first bytes), its logical
  start offset (``base``) and, once it is finished, its logical ``end``.

A generation is recorded *before* anything from it is shipped, so a crash
never forgets a file it was reading, whether or not the master has
acknowledged any of it.  Generations entirely below ``acked`` become
``done``; their rows stay while their file is still in the directory, so a
rotated file that was already shipped is never mistaken for a new one.

Everything here is pure: :func:`plan_start` and :func:`plan_successors` take a
snapshot of the directory (names, stats and the first bytes of each file) and
decide which file is which generation; the tailer does the I/O.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import attrs

from decnet.forwarder.fs import COMPRESSED_MAGIC, GZIP_MAGIC, Stat

FINGERPRINT_BYTES = 1024
# How much of a gzip file is read to find the first FINGERPRINT_BYTES of its content.
GZIP_PROBE_BYTES = 64 * 1024

ACTIVE = "active"
DONE = "done"
GONE = "gone"  # still to declare, but no file holds it any more


@attrs.frozen
class FileIdentity:
    """A file by device and inode, plus what tells it from a later file that
    reuses the inode number: the inode's generation number (``version``, where
    the file system has one) and a SHA-256 of its first ``fp_len`` bytes.

    The fingerprint also finds the copy that ``copytruncate`` made, and the
    compressed copy of a rotated file.
    """

    dev: int
    ino: int
    fp_len: int = 0
    fp_hash: str = ""
    version: int = 0
    mtime_ns: int = 0  # when it was fingerprinted (telling only while ``fp_len`` is 0)

    def emptied(self, c: Candidate) -> bool:
        """Recorded empty, still empty, yet modified since: what was written to it
        was truncated away again (copytruncate) before anyone read it."""
        return self.fp_len == 0 and c.stat.size == 0 and c.stat.mtime_ns != self.mtime_ns

    def same_inode(self, st: Stat) -> bool:
        return (st.dev, st.ino) == (self.dev, self.ino)

    def content_matches(self, head: bytes) -> bool:
        """``head`` (a file's first bytes) starts with the fingerprinted bytes."""
        if self.fp_len == 0:
            return True
        return len(head) >= self.fp_len and fingerprint(head[: self.fp_len]) == self.fp_hash

    def holds(self, c: Candidate) -> bool:
        """``c`` is this very file (renamed or not)."""
        if not self.same_inode(c.stat):
            return False
        if self.version and c.version and self.version != c.version:
            return False  # the inode number was reused
        return self.content_matches(c.head)

    def copied_in(self, c: Candidate) -> bool:
        """``c`` holds this generation's content (copytruncate's copy, or compressed)."""
        return self.fp_len > 0 and self.content_matches(c.head)


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def identity_of(st: Stat, head: bytes, version: int = 0) -> FileIdentity:
    head = head[:FINGERPRINT_BYTES]
    digest = fingerprint(head) if head else ""
    return FileIdentity(st.dev, st.ino, len(head), digest, version, st.mtime_ns)


@attrs.frozen
class GenerationRecord:
    """One generation as the journal stores it.

    ``base`` is ``None`` until it is known (it is the previous generation's
    end, which is only known once that one is finished).  ``end`` is ``None``
    while the generation may still grow.
    """

    seq: int
    identity: FileIdentity
    base: int | None
    end: int | None = None
    state: str = ACTIVE


@attrs.frozen
class Journal:
    acked: int = 0
    generations: tuple[GenerationRecord, ...] = ()

    @property
    def next_seq(self) -> int:
        return max((g.seq for g in self.generations), default=0) + 1


@attrs.frozen
class Candidate:
    """A file in the log's directory, as far as the forwarder can know it.

    ``head`` is the first bytes of its *content* and ``size`` the content's
    length: for a gzip file (logrotate's ``compress``) both come from the
    compressed data (the first block, and the size the gzip trailer records),
    so a generation that was compressed is still recognized, and exactly how
    many of its bytes are gone is known.  Only a ``readable`` file has lines
    the tailer can read.
    """

    name: str
    stat: Stat
    head: bytes
    size: int | None
    readable: bool
    version: int = 0

    @property
    def identity(self) -> FileIdentity:
        return identity_of(self.stat, self.head, self.version)


def probe(name: str, st: Stat, first: bytes, last: bytes, version: int = 0) -> Candidate:
    """What the first bytes (up to :data:`GZIP_PROBE_BYTES`) and the last four bytes
    of a file say about its content."""
    if first.startswith(GZIP_MAGIC):
        try:
            head = zlib.decompressobj(wbits=31).decompress(first, FINGERPRINT_BYTES)
        except zlib.error:
            return Candidate(name, st, b"", None, False, version)
        size = int.from_bytes(last[-4:], "little") if len(last) >= 4 else None
        if size is not None and size < len(head):
            size = None  # over 4 GiB (the trailer keeps the size modulo 2**32)
        return Candidate(name, st, head, size, False, version)
    if first.startswith(COMPRESSED_MAGIC):
        return Candidate(name, st, b"", None, False, version)
    return Candidate(name, st, first[:FINGERPRINT_BYTES], st.size, True, version)


@attrs.frozen
class Planned:
    """A generation to follow: the file holding it (``None``: gone) and where to start.

    A gone generation may still have a known ``size`` (it survives compressed).
    """

    record: GenerationRecord
    name: str | None
    start: int = 0
    size: int | None = None


@attrs.frozen
class Plan:
    generations: tuple[Planned, ...]
    records: tuple[GenerationRecord, ...]  # to write before anything is shipped
    forget: tuple[int, ...]  # seqs of done rows whose file is gone
    notes: tuple[str, ...]  # what the operator should know, in plain words


_NUMERIC_SUFFIX = re.compile(r"\.(\d{1,9})(?:\.[a-z0-9]+)?")


def is_rotation_of(name: str, basename: str) -> bool:
    """``name`` looks like a rotated ``basename`` (``.1``, ``-20261130``, ``.1.gz``...)."""
    return len(name) > len(basename) + 1 and name[: len(basename) + 1] in (
        basename + ".",
        basename + "-",
    )


def rotation_order(candidate: Candidate, basename: str) -> tuple:
    """Oldest first: by modification time, ties broken as logrotate numbers files
    (``.2`` is older than ``.1``), then by name (dated suffixes sort by date)."""
    match = _NUMERIC_SUFFIX.fullmatch(candidate.name[len(basename) :])
    rank = -int(match.group(1)) if match else 0
    return (candidate.stat.mtime_ns, rank, candidate.name)


def _find(identity: FileIdentity, candidates: list[Candidate], used: set[str]) -> Candidate | None:
    """The file holding ``identity``: the same inode, else a copy with its content
    (copytruncate's copy, or a compressed one)."""
    known = [c for c in candidates if c.name not in used and (c.readable or c.size is not None)]
    for c in known:
        if identity.holds(c):
            return c
    for c in known:
        if identity.copied_in(c):
            return c
    return None


def unknown_rotations(
    known: list[FileIdentity],
    basename: str,
    candidates: list[Candidate],
    held: set[tuple[int, int]] = frozenset(),
) -> list[Candidate]:
    """Files named like a rotation of ``basename`` that hold no known generation, oldest first.

    ``held`` are (device, inode) pairs of files the caller has open: an inode
    number cannot be reused while it is open, so those match by inode alone.
    """
    used = {c.name for c in candidates if (c.stat.dev, c.stat.ino) in held}
    for identity in known:
        found = _find(identity, candidates, used)
        if found is not None:
            used.add(found.name)
    return _unknown(candidates, used, basename)


def _unknown(candidates: list[Candidate], used: set[str], basename: str) -> list[Candidate]:
    return sorted(
        (
            c
            for c in candidates
            if c.name not in used
            and (c.readable or c.size is not None)
            and is_rotation_of(c.name, basename)
        ),
        key=lambda c: rotation_order(c, basename),
    )


def plan_start(journal: Journal, basename: str, candidates: list[Candidate]) -> Plan:
    """Which file is which generation after a (re)start; see the module docstring.

    * Every active generation is looked for by identity (renamed or not), then
      by content (copytruncate's copy).  One that is not found is gone: it
      stays in the plan with no file, and the tailer declares the gap.
    * A file in the directory that the journal does not know, named like a
      rotation of the log, appeared while the forwarder was down: it is a
      generation rotated meanwhile, drained in rotation order before the file
      now at the path.  On the very first start (empty journal) such files
      predate the forwarder and are only remembered, not shipped.
    """
    records: dict[int, GenerationRecord] = {}
    notes: list[str] = []
    used: set[str] = set()
    active = sorted(
        (g for g in journal.generations if g.state in (ACTIVE, GONE)), key=lambda g: g.seq
    )
    planned: list[Planned] = []
    for rec in active:
        if rec.base is None and not planned:
            # Its predecessor was acknowledged to its end and released.
            rec = records[rec.seq] = attrs.evolve(rec, base=journal.acked)
        found = None if rec.state == GONE else _find(rec.identity, candidates, used)
        if found is not None:
            used.add(found.name)
        if rec.end is not None and rec.base is not None and rec.end <= journal.acked:
            records[rec.seq] = attrs.evolve(rec, state=DONE)
            continue
        start = max(0, journal.acked - rec.base) if not planned and rec.base is not None else 0
        if found is None or not found.readable:
            size = None if found is None else found.size
            if rec.state != GONE:
                notes.append(_gone_note(rec, journal.acked, found))
            planned.append(Planned(rec, None, start, size))
            continue
        if not rec.identity.holds(found):
            # Found by content only (copytruncate's copy): follow it there from now on.
            moved = attrs.evolve(
                rec.identity, dev=found.stat.dev, ino=found.stat.ino, version=found.version
            )
            rec = records[rec.seq] = attrs.evolve(rec, identity=moved)
            notes.append(f"generation {rec.seq} continues in {found.name} (a copy of it)")
        elif found.name != basename:
            notes.append(f"generation {rec.seq} is now {found.name}")
        planned.append(Planned(rec, found.name, start))

    forget = []
    for rec in journal.generations:
        if rec.state == DONE:
            found = _find(rec.identity, candidates, used)
            if found is None:
                forget.append(rec.seq)
            else:
                used.add(found.name)

    seq = journal.next_seq
    current = next((c for c in candidates if c.name == basename), None)
    if current is not None and (current.name in used or not current.readable):
        current = None
    unknown = _unknown(candidates, used, basename)
    reuse: list[int] = []  # seqs handed to the new generations first
    after: list[Candidate] = []
    moved: Candidate | GenerationRecord | None = None
    last = planned[-1] if planned else None
    at_path = next((c for c in candidates if c.name == basename), None)
    if last is not None and last.record.identity.fp_len == 0 and journal.generations:
        # The last generation was empty when it was opened and nothing of it
        # was read, so what it holds now was all written later.  Rotated files
        # we do not know that were last modified before that (copytruncate's
        # copies of it) come first: it gives its place (its seq) to the first
        # of them and follows them, with its content, or, gone, with the gap
        # that says what it held may be lost.
        found = next((c for c in candidates if c.name == last.name), None)
        when = found.stat.mtime_ns if found is not None else last.record.identity.mtime_ns
        before = [c for c in unknown if c.stat.mtime_ns <= when]
        if before:
            planned.pop()
            reuse = [last.record.seq]
            unknown = [*before, *(c for c in unknown if c not in before)]
            if found is None:
                moved = attrs.evolve(last.record, base=None, state=GONE)
            elif found.name == basename:
                current = found
            else:
                moved = found
            unknown, after = before, unknown[len(before) :]
        elif found is not None and found.name == basename and last.record.identity.emptied(found):
            # Written to and emptied again while we were down, with no copy left.
            planned[-1] = attrs.evolve(last, name=None)
            records[last.record.seq] = attrs.evolve(last.record, state=GONE)
            notes.append(f"{basename} was written to and truncated while the forwarder was down")
            current = at_path
    if not journal.generations or (current is None and basename in used):
        # First start, or the log itself was not rotated: not ours to ship.
        for c in unknown:
            records[seq] = GenerationRecord(seq, c.identity, None, None, DONE)
            seq += 1
        if unknown:
            why = "the log file itself was not rotated"
            if not journal.generations:
                why = "rotated before the forwarder's first start"
            notes.append("not shipping " + ", ".join(c.name for c in unknown) + ": " + why)
        unknown = []
    if unknown:
        notes.append("rotated while the forwarder was down: " + ", ".join(c.name for c in unknown))
    for c in [*unknown, moved, *after, current]:
        if c is None:
            continue
        if reuse:
            number = reuse.pop()
        else:
            number, seq = seq, seq + 1
        if isinstance(c, GenerationRecord):
            rec = records[number] = attrs.evolve(c, seq=number)
            planned.append(Planned(rec, None))
            continue
        rec = records[number] = GenerationRecord(number, c.identity, None)
        if c.readable:
            planned.append(Planned(rec, c.name))
        else:
            notes.append(f"{c.name} was rotated and compressed before it was shipped")
            planned.append(Planned(rec, None, 0, c.size))
    if planned and planned[0].record.base is None:
        first = attrs.evolve(planned[0].record, base=journal.acked)
        records[first.seq] = first
        planned[0] = attrs.evolve(planned[0], record=first)
    return Plan(tuple(planned), tuple(records.values()), tuple(forget), tuple(notes))


def _gone_note(rec: GenerationRecord, acked: int, found: Candidate | None) -> str:
    where = f"from logical offset {max(acked, rec.base or 0)}"
    how = "deleted" if found is None else f"compressed into {found.name}"
    return (
        f"generation {rec.seq} (inode {rec.identity.ino}) was {how} while the forwarder "
        f"was down: its bytes {where} on that were not shipped are gone (a gap is declared)"
    )
