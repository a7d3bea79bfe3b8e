"""An in-memory world for the forwarder's fault model: a file system, a writer
that rotates its log every way logrotate can, and a listener with the real
acceptance rules, all joined to the real tailer, delivery core and shell.

Nothing here sleeps or touches a disk but SQLite's memory database: each
"thread lane" job of the forwarder waits in a queue until the schedule runs
it, so a crash can fall between any two steps.
"""

from __future__ import annotations

import gzip
import hashlib

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock

from decnet.forwarder import core
from decnet.forwarder.client import Shipper
from decnet.forwarder.fs import Entry, Stat
from decnet.forwarder.offsets import JournalStore
from decnet.forwarder.tail import Tailer
from decnet.syslog import ackproto
from decnet.syslog.framing import OctetCountingDecoder, encode_frame

DIR = "/var/log/decnet"
NAME = "decnet.log"
STREAM = "decnet"
KEEP = 3  # rotated files logrotate keeps
# Short reads (a line is at most this long, and a read at most one byte more)
# and a small window, so that acknowledgements land inside generations.
MAX_LINE = 100
GZIP = b"\x1f\x8b"


class FakeFiles:
    """A directory of files with inodes, links, open handles and inode reuse."""

    dev = 7

    def __init__(self, directory: str = DIR):
        self.directory = directory
        self.names: dict[str, int] = {}
        self.data: dict[int, bytearray] = {}
        self.mtime: dict[int, int] = {}
        self.handles: dict[int, int] = {}
        self.free: list[int] = []
        self.birth: dict[int, int] = {}  # tells a reused inode number from the old file
        self._births = 0
        self._next_ino = 100
        self._next_handle = 1
        self.now_ns = 0

    # -- the tailer's side (decnet.forwarder.fs.OsFiles) ------------------

    def _name(self, path: str) -> str:
        directory, _, name = path.rpartition("/")
        assert directory == self.directory, path
        return name

    def _stat(self, ino: int) -> Stat:
        return Stat(self.dev, ino, len(self.data[ino]), self.mtime[ino])

    def stat(self, path: str) -> Stat | None:
        ino = self.names.get(self._name(path))
        return None if ino is None else self._stat(ino)

    def open(self, path: str):
        ino = self.names.get(self._name(path))
        if ino is None:
            return None
        handle = self._next_handle
        self._next_handle += 1
        self.handles[handle] = ino
        return handle

    def fstat(self, handle) -> Stat:
        return self._stat(self.handles[handle])

    def pread(self, handle, size: int, offset: int) -> bytes:
        return bytes(self.data[self.handles[handle]][offset : offset + size])

    def version(self, handle) -> int:
        return self.birth[self.handles[handle]]

    def close(self, handle) -> None:
        ino = self.handles.pop(handle)
        self._maybe_free(ino)

    def listdir(self, directory: str) -> list[Entry]:
        assert directory == self.directory
        return [Entry(name, self._stat(ino)) for name, ino in sorted(self.names.items())]

    # -- the writer's and logrotate's side -------------------------------

    def _touch(self, ino: int) -> None:
        self.now_ns += 4_000_000
        self.mtime[ino] = self.now_ns

    def _new(self) -> int:
        if self.free:
            ino = self.free.pop()
        else:
            ino = self._next_ino
            self._next_ino += 1
        self.data[ino] = bytearray()
        self._births += 1
        self.birth[ino] = self._births
        self._touch(ino)
        return ino

    def _maybe_free(self, ino: int) -> None:
        if ino in self.data and ino not in self.names.values() and ino not in self.handles.values():
            del self.data[ino], self.mtime[ino], self.birth[ino]
            self.free.append(ino)

    def create(self, name: str) -> int:
        old = self.names.get(name)
        ino = self.names[name] = self._new()
        if old is not None:
            self._maybe_free(old)
        return ino

    def append(self, name: str, data: bytes) -> None:
        if not data:
            return  # a write of nothing changes nothing, not even the mtime
        ino = self.names[name]
        self.data[ino] += data
        self._touch(ino)

    def rename(self, old: str, new: str) -> None:
        replaced = self.names.get(new)
        self.names[new] = self.names.pop(old)
        if replaced is not None:
            self._maybe_free(replaced)

    def unlink(self, name: str) -> None:
        self._maybe_free(self.names.pop(name))

    def truncate(self, name: str) -> None:
        ino = self.names[name]
        self.data[ino] = bytearray()
        self._touch(ino)

    def copy(self, old: str, new: str) -> int:
        content = bytes(self.data[self.names[old]])
        ino = self.create(new)
        self.data[ino] += content
        return ino

    def crash(self, handles: set) -> None:
        """A process holding ``handles`` died: they close."""
        for handle in list(handles):
            if handle in self.handles:
                self.close(handle)


@attrs.define
class Generation:
    """What the writer wrote into one generation, and the file holding it now."""

    ino: int
    birth: int
    content: bytearray = attrs.Factory(bytearray)
    homes: set = attrs.Factory(set)  # every (inode, birth) that has held its content
    compressed: bool = False
    # Copytruncated before the forwarder had recorded a fingerprint of it: if
    # its copy is deleted too, nothing can tell that it ever had content.
    untraceable: bool = False


class Writer:
    """Appends unique lines to the log and rotates it like logrotate."""

    def __init__(self, fs: FakeFiles, store: JournalStore):
        self.fs = fs
        self.store = store
        self.gens = [self._gen(fs.create(NAME))]
        self.lines = 0

    def recorded(self, gen: Generation, *, fingerprint: bool) -> bool:
        """Does the forwarder's journal know a file ``gen`` lived in (and a fingerprint
        of ``gen``'s own content, not of what that file held before)?"""
        content = bytes(gen.content)
        return any(
            (r.identity.ino, r.identity.version) in gen.homes
            and (
                not fingerprint
                or (r.identity.fp_len and _sha(content[: r.identity.fp_len]) == r.identity.fp_hash)
            )
            for r in self.store.load(STREAM).generations
        )

    def _destroying(self, name: str) -> None:
        """``name`` is about to be deleted: a generation it holds that the forwarder
        never recorded leaves no trace at all."""
        ino = self.fs.names[name]
        for gen in self.gens:
            if gen.ino == ino and gen.birth == self.fs.birth[ino]:
                gen.untraceable |= not self.recorded(gen, fingerprint=False)

    def _gen(self, ino: int) -> Generation:
        return self._moved(Generation(ino, self.fs.birth[ino]), ino)

    def _moved(self, gen: Generation, ino: int) -> Generation:
        gen.ino, gen.birth = ino, self.fs.birth[ino]
        gen.homes.add((gen.ino, gen.birth))
        return gen

    @property
    def current(self) -> Generation:
        return self.gens[-1]

    def append(self, count: int, partial: bool) -> None:
        content = self.current.content
        if len(content) - (content.rfind(b"\n") + 1) > MAX_LINE // 2:
            self._write(b"\n")  # (an unfinished line never grows past MAX_LINE)
        data = b"".join(b"L%05d some attacker text\n" % (self.lines + i) for i in range(count))
        self.lines += count
        if partial:
            data += b"P%05d unfinished " % self.lines
            self.lines += 1
        self._write(data)

    def _write(self, data: bytes) -> None:
        self.fs.append(NAME, data)
        self.current.content += data

    def rotated_names(self) -> list[str]:
        return sorted(n for n in self.fs.names if n.startswith(NAME + "."))

    def _shift(self) -> None:
        """``.2`` → ``.3``, ``.1`` → ``.2``...; the oldest beyond KEEP is deleted."""
        for i in range(KEEP, 0, -1):
            for suffix in ("", ".gz"):
                name = f"{NAME}.{i}{suffix}"
                if name in self.fs.names:
                    if i == KEEP:
                        self._destroying(name)
                        self.fs.unlink(name)
                    else:
                        self.fs.rename(name, f"{NAME}.{i + 1}{suffix}")

    def rotate(self, style: str) -> None:
        if style == "rename":
            self._shift()
            self.fs.rename(NAME, NAME + ".1")
            self.gens.append(self._gen(self.fs.create(NAME)))
        elif style == "delete":
            self._destroying(NAME)
            self.fs.unlink(NAME)
            self.gens.append(self._gen(self.fs.create(NAME)))
        elif style == "copytruncate":
            self._shift()
            old = self.current
            old.untraceable = not self.recorded(old, fingerprint=True)
            self._moved(old, self.fs.copy(NAME, NAME + ".1"))
            self.fs.truncate(NAME)
            self.gens.append(self._gen(self.fs.names[NAME]))
        else:
            raise ValueError(style)

    def compress(self, index: int) -> None:
        raw = [n for n in self.rotated_names() if not n.endswith(".gz")]
        if raw:
            name = raw[index % len(raw)]
            ino = self.fs.names[name]
            content, mtime, birth = bytes(self.fs.data[ino]), self.fs.mtime[ino], self.fs.birth[ino]
            self.fs.unlink(name)
            gz = self.fs.create(name + ".gz")
            self.fs.data[gz] += gzip.compress(content, mtime=0)
            self.fs.mtime[gz] = mtime  # gzip keeps the original's modification time
            for gen in self.gens:
                if (gen.ino, gen.birth) == (ino, birth):
                    self._moved(gen, gz).compressed = True

    def delete(self, index: int) -> None:
        rotated = self.rotated_names()
        if rotated:
            self._destroying(rotated[index % len(rotated)])
            self.fs.unlink(rotated[index % len(rotated)])

    def on_disk(self, gen: Generation) -> bool:
        """Is the generation's file still there, raw (not compressed, not deleted)?"""
        return (
            not gen.compressed
            and gen.ino in self.fs.names.values()
            and self.fs.birth.get(gen.ino) == gen.birth
        )


class ModelListener:
    """The listener's durable mirror and acceptance rules, crashable."""

    def __init__(self):
        self.records: list[tuple[int, int, bytes | None]] = []  # durable DATA and GAPs
        self.hwm = 0
        self.pending: list[tuple[int, int, bytes]] = []
        self.accepted = 0
        self.up = True

    def crash(self) -> None:
        self.pending, self.accepted, self.up = [], self.hwm, False

    def accept(self, start: int, end: int, payload: bytes) -> None:
        if end <= self.accepted:
            return  # a duplicate
        assert start >= self.accepted, f"DATA [{start}, {end}) overlaps {self.accepted}"
        self.pending.append((start, end, payload))
        self.accepted = end

    def accept_gap(self, start: int, end: int) -> None:
        if end > self.accepted:
            self.pending.append((start, end, None))
            self.accepted = end

    def commit(self) -> int | None:
        if not self.pending:
            return None
        self.records += self.pending
        self.pending = []
        self.hwm = self.accepted
        return self.hwm

    def mirror(self) -> list[bytes | None]:
        """The mirror as data chunks, with ``None`` where a gap was recorded."""
        out: list[bytes | None] = []
        end = 0
        for start, stop, payload in self.records:
            if start > end or payload is None:
                out.append(None)
            if payload is not None:
                out.append(payload)
            end = stop
        return out


class _Transport:
    def __init__(self):
        self.out = bytearray()

    def writeSequence(self, seq):
        self.out += b"".join(seq)

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass


class _Proto:
    def __init__(self, world: World):
        self.world = world
        self.transport = _Transport()
        self.lost = False

    def abandon(self, reason: str) -> None:
        self.world.closed_reasons.append(reason)
        self.world.drop_connection()


class ModelForwarder:
    """A forwarder process: the real tailer, core and shell, with queued thread jobs."""

    def __init__(self, world: World):
        self.world = world
        self.jobs: list[tuple] = []
        self.clock = world.clock
        fs = world.fs
        opened_before = set(fs.handles)
        self.tailer = Tailer(
            f"{DIR}/{NAME}", files=fs, max_line=MAX_LINE, chunk_size=1, rotate_wait=5.0
        )
        journal = world.store.load(STREAM)
        plan = self.tailer.start(journal)
        world.store.commit(STREAM, records=self.tailer.take_records(), forget=plan.forget)
        delivery = core.DeliveryCore(
            STREAM, acked=journal.acked, max_payload=MAX_LINE, window=3 * MAX_LINE
        )
        self.shipper = Shipper(delivery, self.tailer, world.store, self.clock, self._run)
        self.handles_before = opened_before

    def _run(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def step(self) -> bool:
        if not self.jobs:
            return False
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)
        return True

    def handles(self) -> set:
        return set(self.world.fs.handles) - self.handles_before


class World:
    """Everything the schedule drives; see the module docstring."""

    def __init__(self):
        self.fs = FakeFiles()
        self.clock = Clock()
        self.store = JournalStore(":memory:", self.clock.seconds)
        self.writer = Writer(self.fs, self.store)
        self.listener = ModelListener()
        self.forwarder: ModelForwarder | None = None
        self.proto: _Proto | None = None
        self.to_forwarder: list[bytes] = []
        self.in_flight: list[bytes] = []  # frames on the way to the listener
        self.decoder: OctetCountingDecoder | None = None
        self.closed_reasons: list[str] = []
        self.start_forwarder()

    # -- processes -------------------------------------------------------

    def start_forwarder(self) -> None:
        if self.forwarder is None:
            self.forwarder = ModelForwarder(self)

    def crash_forwarder(self) -> None:
        if self.forwarder is not None:
            self.drop_connection()
            self.fs.crash(self.forwarder.handles())
            self.forwarder = None

    def start_listener(self) -> None:
        self.listener.up = True

    def crash_listener(self) -> None:
        self.drop_connection()
        self.listener.crash()

    # -- the connection --------------------------------------------------

    def connect(self) -> None:
        if self.forwarder is None or not self.listener.up or self.proto is not None:
            return
        self.proto = _Proto(self)
        self.decoder = OctetCountingDecoder(4096)
        self.decoder.strip_lf = False
        self.to_forwarder = []
        self.hello_seen = False
        self.forwarder.shipper.attach(self.proto, core.ACK)

    def drop_connection(self) -> None:
        proto, self.proto = self.proto, None
        if proto is None:
            return
        self.to_forwarder = []
        self.in_flight = []
        proto.lost = True
        if self.forwarder is not None:
            self.forwarder.shipper.detach(proto)

    def deliver_to_listener(self, limit: int | None = None) -> None:
        """Frames the forwarder wrote reach the listener (only the first ``limit``)."""
        if self.proto is None:
            return
        if self.proto.transport.out:
            self.in_flight += self.decoder.feed(bytes(self.proto.transport.out))
            self.proto.transport.out.clear()
        count = len(self.in_flight) if limit is None else min(limit, len(self.in_flight))
        frames, self.in_flight = self.in_flight[:count], self.in_flight[count:]
        for frame in frames:
            message = ackproto.decode(frame)
            if isinstance(message, ackproto.Hello):
                # The real listener makes everything accepted durable first.
                self.listener.commit()
                self.hello_seen = True
                self.to_forwarder.append(encode_frame(ackproto.encode_resume(self.listener.hwm)))
            elif isinstance(message, ackproto.Gap):
                assert self.hello_seen
                self.listener.accept_gap(message.start, message.end)
            elif isinstance(message, ackproto.Status):
                assert self.hello_seen  # (never below the listener's mark: tested in the core)
            else:
                assert isinstance(message, ackproto.Data) and self.hello_seen
                self.listener.accept(message.start, message.end, message.payload)

    def listener_commit(self) -> None:
        mark = self.listener.commit()
        if mark is not None and self.proto is not None and self.hello_seen:
            self.to_forwarder.append(encode_frame(ackproto.encode_ack(mark)))

    def lose_message(self) -> None:
        """An ACK lost on the way (only ever the newest, so RESUME still precedes ACKs)."""
        for i in range(len(self.to_forwarder) - 1, -1, -1):
            if self.to_forwarder[i].split(b" ", 1)[1].startswith(b"A "):
                del self.to_forwarder[i]
                return

    def deliver_to_forwarder(self) -> None:
        if self.proto is None or self.forwarder is None:
            return
        while self.to_forwarder and self.proto is not None:
            frame = self.to_forwarder.pop(0)
            message = ackproto.decode(frame.split(b" ", 1)[1])
            if isinstance(message, ackproto.Resume):
                self.forwarder.shipper.resume(message.offset)
            else:
                self.forwarder.shipper.acked_to(message.offset)

    def notify(self) -> None:
        if self.forwarder is not None:
            self.forwarder.shipper.notify()

    def run_job(self) -> None:
        if self.forwarder is not None:
            self.forwarder.step()

    def tick(self) -> None:
        self.clock.advance(6.0)
        self.notify()

    # -- the end ---------------------------------------------------------

    def quiesce(self) -> None:
        """Restart what is down and run until nothing moves any more."""
        self.start_listener()
        self.start_forwarder()
        still = 0
        for _ in range(5000):
            before = self._progress()
            self.connect()
            self.deliver_to_listener()
            self.listener_commit()
            self.deliver_to_forwarder()
            while self.forwarder.step():
                self.deliver_to_listener()
            self.notify()
            if self._progress() == before:
                self.tick()
                still += 1
                if still > 6:
                    return
            else:
                still = 0
        raise AssertionError("the forwarder never caught up")

    def _progress(self):
        proto_out = len(self.proto.transport.out) if self.proto else -1
        return (
            self.listener.hwm,
            len(self.listener.pending),
            proto_out,
            len(self.to_forwarder),
            len(self.in_flight),
            len(self.forwarder.jobs),
        )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_mirror_ok(world: World) -> None:
    """The mirror is every generation's bytes in order; only gone ones may be cut
    short, and then a gap stands exactly where their missing bytes were.

    One allowance: a generation whose content the forwarder never recorded
    (``untraceable``: written and moved away, by copytruncate or deletion,
    before the forwarder looked) cannot be placed exactly.  Nothing of it may
    be lost without a gap unless it is gone, but the gap that stands for a run
    of such generations may be anywhere along that run.
    """
    stream = bytearray()
    gaps: list[int] = []  # mirror positions of recorded gaps, in order
    for token in world.listener.mirror():
        if token is None:
            gaps.append(len(stream))
        else:
            stream += token
    pos = 0
    credit = False  # a gap consumed along a run of untraceable generations
    gens = world.writer.gens
    for i, gen in enumerate(gens):
        content = bytes(gen.content)
        if i == len(gens) - 1:
            content = content[: content.rfind(b"\n") + 1]  # an unfinished line waits
        elif content and not content.endswith(b"\n"):
            content += b"\n"  # an unfinished last line is shipped with an LF added
        assert not gaps or gaps[0] >= pos, f"a gap inside generation {i - 1}"
        vague = gen.untraceable or (i > 0 and gens[i - 1].untraceable)
        if vague and gaps and gaps[0] == pos:
            while gaps and gaps[0] == pos:
                gaps.pop(0)
            credit = True
        if world.writer.on_disk(gen) or i == len(gens) - 1:
            # (A gap right here may stand for a gone generation at the same
            # position, after this one if this one is empty.)
            assert not content or not gaps or gaps[0] > pos, (
                f"a gap at mirror byte {pos}, before generation {i} which is on disk"
            )
            got = bytes(stream[pos : pos + len(content)])
            assert got == content, (
                f"generation {i} is on disk but the mirror differs at byte {pos}: "
                f"expected {content[:80]!r}..., got {got[:80]!r}..."
            )
            pos += len(content)
        else:
            # Gone: the mirror holds a prefix of it (whole lines), then a gap.
            k = 0
            while k < len(content) and pos + k < len(stream) and stream[pos + k] == content[k]:
                k += 1
            if k < len(content):
                k = content.rfind(b"\n", 0, k) + 1
            assert not gaps or gaps[0] >= pos + k, f"a gap inside generation {i}"
            pos += k
            if k and not gen.untraceable:
                credit = False  # (its bytes arrived: an earlier gap cannot stand for it)
            if gaps and gaps[0] == pos:
                while gaps and gaps[0] == pos:
                    gaps.pop(0)
                credit = True
            else:
                assert k == len(content) or credit or gen.untraceable, (
                    f"generation {i} is gone and only {k} of its {len(content)} bytes reached "
                    f"the mirror, but no gap was recorded at mirror byte {pos}"
                )
        if not gen.untraceable and content and world.writer.on_disk(gen):
            credit = False
    assert pos == len(stream), f"{len(stream) - pos} unexpected bytes at the end of the mirror"
    assert not gaps, f"gaps recorded at mirror bytes {gaps} stand for no gone generation"
