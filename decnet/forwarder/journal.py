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
from collections.abc import Collection

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
    held: Collection[tuple[int, int]] = frozenset(),
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
      by content (copytruncate's copy, a compressed copy).  One that is not
      found is gone: it stays in the plan with no file, and the tailer
      declares the gap.
    * A file in the directory that the journal does not know, named like a
      rotation of the log, appeared while the forwarder was down: it is a
      generation rotated meanwhile, drained in rotation order before the file
      now at the path.  On the very first start (empty journal) such files
      predate the forwarder and are only remembered, not shipped.
    """
    return _Planner(journal, basename, candidates).plan()


class _Planner:
    """The state of one :func:`plan_start` run."""

    def __init__(self, journal: Journal, basename: str, candidates: list[Candidate]):
        self.journal = journal
        self.basename = basename
        self.candidates = candidates
        self.records: dict[int, GenerationRecord] = {}
        self.notes: list[str] = []
        self.used: set[str] = set()
        self.planned: list[Planned] = []
        self.forget: list[int] = []
        self.seq = journal.next_seq

    def plan(self) -> Plan:
        followed = sorted(
            (g for g in self.journal.generations if g.state in (ACTIVE, GONE)), key=lambda g: g.seq
        )
        for i, rec in enumerate(followed):
            self._follow(rec, last=i == len(followed) - 1)
        self._recognize_done()
        at_path = self._named(self.basename)
        current = at_path if at_path is not None and at_path.name not in self.used else None
        if current is not None and not current.readable:
            current = None
        slots, rest = self._slot(_unknown(self.candidates, self.used, self.basename))
        current = self._emptied(slots, current, at_path)
        slots += self._newer(rest, current)
        if current is not None:
            slots.append(current)
        self._number(slots)
        if self.planned and self.planned[0].record.base is None:
            first = self._record(attrs.evolve(self.planned[0].record, base=self.journal.acked))
            self.planned[0] = attrs.evolve(self.planned[0], record=first)
        return Plan(
            tuple(self.planned),
            tuple(self.records.values()),
            tuple(self.forget),
            tuple(self.notes),
        )

    def _record(self, rec: GenerationRecord) -> GenerationRecord:
        self.records[rec.seq] = rec
        return rec

    def _named(self, name: str | None) -> Candidate | None:
        return next((c for c in self.candidates if c.name == name), None)

    def _follow(self, rec: GenerationRecord, *, last: bool) -> None:
        """Find the file of an active (or gone) generation of the journal."""
        acked = self.journal.acked
        if rec.base is None and not self.planned:
            # Its predecessor was acknowledged to its end and released.
            rec = self._record(attrs.evolve(rec, base=acked))
        found = None if rec.state == GONE else _find(rec.identity, self.candidates, self.used)
        if found is not None:
            self.used.add(found.name)
        if _delivered(rec, acked):
            self._record(attrs.evolve(rec, state=DONE))
            return
        start = max(0, acked - (rec.base or 0)) if not self.planned else 0
        if found is None or not found.readable:
            if rec.state != GONE:
                self.notes.append(_gone_note(rec, acked, found))
            self.planned.append(Planned(rec, None, start, found.size if found else None))
            return
        if rec.identity.holds(found):
            if found.name != self.basename:
                self.notes.append(f"generation {rec.seq} is now {found.name}")
            self.planned.append(Planned(rec, found.name, start))
        else:
            self._follow_copy(rec, found, start, last=last)

    def _follow_copy(
        self, rec: GenerationRecord, found: Candidate, start: int, *, last: bool
    ) -> None:
        """Found by content only (copytruncate's copy): follow it there from now on."""
        original = rec.identity
        moved = attrs.evolve(
            original, dev=found.stat.dev, ino=found.stat.ino, version=found.version
        )
        rec = self._record(attrs.evolve(rec, identity=moved))
        self.notes.append(f"generation {rec.seq} continues in {found.name} (a copy of it)")
        self.planned.append(Planned(rec, found.name, start))
        if last and not any(_same_file(original, c) for c in self.candidates):
            # Its file went on as the next generation, and that file is gone too.
            lost = GenerationRecord(self.seq, original, None, None, GONE)
            self.seq += 1
            self.planned.append(Planned(self._record(lost), None))
            self.notes.append(
                f"the file generation {rec.seq} was truncated in is gone: what was written to it "
                "afterwards is lost (a gap is declared)"
            )

    def _recognize_done(self) -> None:
        """Shipped generations whose file is still here are remembered; the rest forgotten."""
        for rec in self.journal.generations:
            if rec.state == DONE:
                found = _find(rec.identity, self.candidates, self.used)
                if found is None:
                    self.forget.append(rec.seq)
                else:
                    self.used.add(found.name)

    def _slot(self, unknown: list[Candidate]) -> tuple[list, list[Candidate]]:
        """The journal's generations with the unknown rotated files slotted in, and
        the unknown files that come after all of them.

        A generation's file was last written before the next generation began,
        so an unknown file goes before the first generation not shipped from
        yet (no base, or nothing of it ever read) that was last modified after
        it (a lost one: after it was last seen).  Those that come after every
        one are rotations newer than anything the journal knows.
        """
        slots: list = []
        for p in self.planned:
            if p.record.base is None or p.record.identity.fp_len == 0:
                found = self._named(p.name)
                when = found.stat.mtime_ns if found else p.record.identity.mtime_ns
                slots += [c for c in unknown if c.stat.mtime_ns <= when]
                unknown = [c for c in unknown if c.stat.mtime_ns > when]
            slots.append(p)
        return slots, unknown

    def _emptied(
        self, slots: list, current: Candidate | None, at_path: Candidate | None
    ) -> Candidate | None:
        """The last generation was empty when recorded, is still empty at the path,
        yet was modified since: what was written to it was truncated away again
        while we were down, with no copy left.  It is gone; the file is new."""
        last = slots[-1] if slots else None
        if (
            isinstance(last, Planned)
            and at_path is not None
            and last.name == self.basename
            and (len(slots) < 2 or isinstance(slots[-2], Planned))
            and last.record.identity.emptied(at_path)
        ):
            index = self.planned.index(last)
            self.planned[index] = slots[-1] = attrs.evolve(last, name=None)
            self._record(attrs.evolve(last.record, state=GONE))
            self.notes.append(
                f"{self.basename} was written to and truncated while the forwarder was down"
            )
            return at_path
        return current

    def _newer(self, rest: list[Candidate], current: Candidate | None) -> list[Candidate]:
        """Rotated files newer than anything the journal knows: shipped, unless this is
        the first start or the log itself was not rotated (then they are not ours)."""
        if self.journal.generations and (current is not None or self.basename not in self.used):
            if rest:
                names = ", ".join(c.name for c in rest)
                self.notes.append(f"rotated while the forwarder was down: {names}")
            return rest
        self._not_ours(rest)
        return []

    def _not_ours(self, unknown: list[Candidate]) -> None:
        """First start, or the log itself was not rotated: remembered, not shipped."""
        for c in unknown:
            self._record(GenerationRecord(self.seq, c.identity, None, None, DONE))
            self.seq += 1
        if unknown:
            why = "the log file itself was not rotated"
            if not self.journal.generations:
                why = "rotated before the forwarder's first start"
            self.notes.append("not shipping " + ", ".join(c.name for c in unknown) + ": " + why)

    def _number(self, slots: list) -> None:
        """The final order.  Generations are numbered in stream order: from the first
        new file on, every generation takes a fresh number (its old row is dropped)."""
        self.planned = []
        renumber = False
        for item in slots:
            if isinstance(item, Candidate):
                renumber = True
                rec = self._record(GenerationRecord(self.seq, item.identity, None))
                self.seq += 1
                if item.readable:
                    self.planned.append(Planned(rec, item.name))
                else:
                    self.notes.append(
                        f"{item.name} was rotated and compressed before it was shipped"
                    )
                    self.planned.append(Planned(rec, None, 0, item.size))
                continue
            if renumber:
                self.forget.append(item.record.seq)
                self.records.pop(item.record.seq, None)
                item = attrs.evolve(item, record=attrs.evolve(item.record, seq=self.seq, base=None))
                self._record(item.record)
                self.seq += 1
            self.planned.append(self._seen_empty(item))

    def _seen_empty(self, item: Planned) -> Planned:
        """A generation nothing was read of, found empty: whatever changed its
        modification time is accounted for now (the files slotted before it), so
        remember when it was last seen empty."""
        found = self._named(item.name)
        identity = item.record.identity
        if found is None or identity.fp_len or found.stat.size:
            return item
        if identity.mtime_ns == found.stat.mtime_ns:
            return item
        identity = attrs.evolve(identity, mtime_ns=found.stat.mtime_ns)
        return attrs.evolve(item, record=self._record(attrs.evolve(item.record, identity=identity)))


def _delivered(rec: GenerationRecord, acked: int) -> bool:
    """Acknowledged to its end (released, or about to be)."""
    return rec.end is not None and rec.base is not None and rec.end <= acked


def _same_file(identity: FileIdentity, c: Candidate) -> bool:
    """``c`` is the inode ``identity`` names (whatever it holds now)."""
    if not identity.same_inode(c.stat):
        return False
    return not (identity.version and c.version and identity.version != c.version)


def _gone_note(rec: GenerationRecord, acked: int, found: Candidate | None) -> str:
    where = f"from logical offset {max(acked, rec.base or 0)}"
    how = "deleted" if found is None else f"compressed into {found.name}"
    return (
        f"generation {rec.seq} (inode {rec.identity.ino}) was {how} while the forwarder "
        f"was down: its bytes {where} on that were not shipped are gone (a gap is declared)"
    )
