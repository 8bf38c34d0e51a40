"""The spool: a local append-only file of rows the ledger database has not taken yet.

The batch writer keeps rows in memory while the database is healthy. It moves them here
when the database is unreachable or the memory buffer is full (``durability="batched"``),
and puts every row here before the call returns (``durability="durable"``). Its writer
thread replays the spool into the database once it can, then removes the file. A spool
left behind by a process that crashed is replayed by the next writer on the same ledger.

On disk
    One directory per ledger (see `spool_directory`), mode 0700. In it, *segments*:
    files named ``<time>-<pid>-<random>-<seq>.jsonl``, mode 0600, each starting with a
    header line (``{"tokenledger_spool": 1, "ledger": "<key>", ...}``) followed by one
    JSON object per row: ``{"t": "calls", "r": {...}}``. Amounts are decimal strings and
    times ISO-8601 strings, so a row comes back exactly as it went in. Rows are only
    ever appended; a segment is removed whole once every row in it is committed.

Who owns a segment
    The process that writes a segment holds an exclusive ``flock`` on it until it
    removes it. The kernel releases the lock when the process dies, however it dies
    (SIGKILL, OOM killer), so a segment nobody holds belongs to a dead process: the
    next writer on the ledger takes the lock and replays it. A segment is created
    under a temporary name and renamed once locked, so no one can take it for an
    orphan while it is being born.

fsync policy
    ``durable``: each row is written with one ``write(2)`` and ``fdatasync``-ed before
    `Spool.append` returns (threads appending together share one ``fdatasync``); a new
    segment's directory entry is fsynced too. The row survives a power loss.
    ``batched``: rows are written with one ``write(2)`` each and never fsynced. They are
    in the kernel's page cache as soon as ``append`` returns, so they survive the
    process being killed, but not a kernel crash or a power loss.

Replay is idempotent: rows carry client-generated ids and the writer inserts them with
``ON CONFLICT`` (calls and prices: ignore a known id; runs: keep the most advanced
state), so a segment replayed twice, or replayed after some of its rows were committed,
never duplicates a row.

This module runs a little over the 600 lines the others keep to, on purpose: it is one
concept, the spool on disk, whose parts (where a spool lives, the line format, segments,
who owns one) are each short and make sense only together, and the format they share
is described once, above.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tokenledger import _storage as storage
from tokenledger._engine import SECRET_QUERY_KEYS

try:  # POSIX; on Windows orphans are recognised by their writer's pid instead
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT_VERSION",
    "SPOOL_DIR_ENV",
    "Segment",
    "Spool",
    "SpoolRow",
    "UntrustedSpool",
    "decode_line",
    "encode_row",
    "ledger_key",
    "spool_directory",
]

logger = logging.getLogger("tokenledger.writer")

#: Environment variable naming the directory under which spools are kept (one
#: subdirectory per ledger), for every ledger that is not given ``spool_dir``.
SPOOL_DIR_ENV = "TOKENLEDGER_SPOOL_DIR"

#: The version of the line format; a segment with a newer one is left alone.
FORMAT_VERSION = 1

_SUFFIX = ".jsonl"
_TABLES: dict[str, sa.Table] = {
    "calls": storage.calls,
    "runs": storage.runs,
    "prices": storage.prices,
}
_MONEY_COLUMNS = {
    name: frozenset(c.name for c in table.columns if isinstance(c.type, storage.Money))
    for name, table in _TABLES.items()
}
_TIME_COLUMNS = {
    name: frozenset(c.name for c in table.columns if isinstance(c.type, storage.UTCDateTime))
    for name, table in _TABLES.items()
}
_COLUMNS = {name: tuple(c.name for c in table.columns) for name, table in _TABLES.items()}

Row = dict[str, Any]
#: One decoded row: (table name, row).
SpoolRow = tuple[str, Row]


# -- where --------------------------------------------------------------------------------
def ledger_key(url: sa.URL) -> str:
    """16 hex digits naming the ledger at ``url``: the same for every process using it.

    A SQLite ledger is named by its file's real path; a server ledger by its URL without
    any password (so the user, host, port, database and ``options`` all count).
    """
    if url.get_backend_name() == "sqlite":
        identity = "sqlite:" + os.path.realpath(url.database or "")
    else:
        public = sa.URL.create(
            url.get_backend_name(),  # postgres:// and postgresql+psycopg:// are one ledger
            username=url.username,
            host=url.host,
            port=url.port,
            database=url.database,
            query={k: v for k, v in url.query.items() if k not in SECRET_QUERY_KEYS},
        )
        identity = public.render_as_string(hide_password=False)
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def spool_directory(url: sa.URL, spool_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the spool of the ledger at ``url``.

    ``spool_dir`` given, else ``$TOKENLEDGER_SPOOL_DIR``: ``<that>/<ledger key>``. Otherwise
    a SQLite ledger's spool sits next to its file (``ledger.db-spool/``) and a server
    ledger's under ``$XDG_CACHE_HOME/tokenledger/spool/<ledger key>`` (by default
    ``~/.cache/tokenledger/spool/<ledger key>``). Nothing is created until a row is
    spooled.
    """
    base = spool_dir if spool_dir is not None else os.environ.get(SPOOL_DIR_ENV, "").strip()
    if base:
        return Path(base).expanduser().absolute() / ledger_key(url)
    if url.get_backend_name() == "sqlite" and url.database:
        return Path(os.path.abspath(url.database) + "-spool")
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join("~", ".cache")
    return Path(cache).expanduser().absolute() / "tokenledger" / "spool" / ledger_key(url)


# -- lines --------------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")  # positional, as JSONDocument stores it: exact
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"a value of type {type(value).__name__} cannot be spooled: {value!r:.80}")


def encode_row(table: str, row: Row) -> bytes:
    """One spool line (with its newline) for ``row`` of ``table``.

    Raises TypeError or ValueError for a value JSON cannot hold; ``ensure_ascii`` keeps
    any string, lone surrogates included, representable.
    """
    text = json.dumps({"t": table, "r": row}, default=_json_default, separators=(",", ":"))
    return text.encode("ascii") + b"\n"


def decode_line(line: bytes) -> SpoolRow:
    """The (table, row) a spool line holds; raises ValueError for anything else.

    Amount columns come back as `~decimal.Decimal` and time columns as aware
    `~datetime.datetime`, exactly as they were put; columns a different tokenledger
    version added are dropped and columns it lacked are None.
    """
    item = json.loads(line)
    if not isinstance(item, dict):
        raise ValueError("a spool line must be a JSON object")
    table, raw = item.get("t"), item.get("r")
    if table not in _TABLES or not isinstance(raw, dict):
        raise ValueError(f"a spool line names table {table!r}; expected calls, runs or prices")
    money, times = _MONEY_COLUMNS[table], _TIME_COLUMNS[table]
    row: Row = {}
    for name in _COLUMNS[table]:
        value = raw.get(name)
        if isinstance(value, str):
            if name in money:
                value = Decimal(value)
            elif name in times:
                value = dt.datetime.fromisoformat(value)
        row[name] = value
    return table, row


# -- segments -----------------------------------------------------------------------------
class Segment:
    """One spool file and what is known about it.

    ``rows`` is how many rows it holds; ``done`` how many of those are committed;
    ``offset`` the byte offset of the first row not yet committed (0: not read yet).
    """

    __slots__ = ("corrupt", "done", "fd", "offset", "orphan", "path", "rows", "seq", "torn")

    def __init__(self, path: Path, fd: int, seq: int, *, rows: int = 0, orphan: bool) -> None:
        self.path = path
        self.fd = fd
        self.seq = seq
        self.rows = rows
        self.done = 0
        self.offset = 0
        self.orphan = orphan
        self.corrupt = 0
        self.torn = False  # a write failed half way: no more appends

    def __repr__(self) -> str:
        return f"<Segment {self.path.name} rows={self.rows} done={self.done}>"


def _lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False when another holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists; we may not signal it
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - a directory we cannot open cannot be fsynced
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


_datasync = getattr(os, "fdatasync", os.fsync)


# -- trust ---------------------------------------------------------------------------------
class UntrustedSpool(PermissionError):
    """A spool directory or file someone else could have written: not used.

    .. versionadded:: 0.1.0
    """


_geteuid = getattr(os, "geteuid", None)  # POSIX; Windows has no owners or modes to check


def _untrusted_directory(directory: Path) -> str | None:
    """Why ``directory`` (which exists) must not be used as a spool, or None.

    Like ssh's StrictModes: the directory itself must be a real directory (not a
    symlink) owned by this user and writable by no one else; every directory above it
    must be owned by this user or root and writable by no one else, unless it is
    sticky (``/tmp``), where no one can remove or rename what another user made.
    """
    if _geteuid is None:  # pragma: no cover - Windows
        return None
    uid = _geteuid()
    try:
        found = os.lstat(directory)
    except OSError as exc:
        return f"it cannot be examined ({exc.strerror or exc})"
    why = _untrusted_file(found, directory=True)
    if why is not None:
        return why
    for parent in directory.parents:
        try:
            above = os.stat(parent)
        except OSError:
            continue
        if above.st_uid not in (0, uid):
            return f"{parent} above it is owned by uid {above.st_uid}"
        if above.st_mode & 0o022 and not above.st_mode & stat.S_ISVTX:
            return (
                f"{parent} above it is writable by others "
                f"(mode {stat.S_IMODE(above.st_mode):04o}, not sticky)"
            )
    return None


def _untrusted_file(found: os.stat_result, *, directory: bool = False) -> str | None:
    """Why a spool file with this ``fstat`` must not be replayed (with ``directory``: why
    the spool directory with this ``lstat`` must not be used, its parents aside), or None."""
    if _geteuid is None:  # pragma: no cover - Windows
        return None
    uid = _geteuid()
    if directory and not stat.S_ISDIR(found.st_mode):
        return "it is not a directory (a symlink?)"
    if not directory and not stat.S_ISREG(found.st_mode):
        return "it is not a regular file"
    if found.st_uid != uid:
        return f"it is owned by uid {found.st_uid}, not by this user (uid {uid})"
    if found.st_mode & 0o022:
        return f"it is writable by others (mode {stat.S_IMODE(found.st_mode):04o})"
    return None


def _make_directories(directory: Path) -> None:
    """Create ``directory`` and any missing parent, each 0700 whatever the umask."""
    missing: list[Path] = []
    for path in (directory, *directory.parents):
        if path.is_dir() or os.path.lexists(path):
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made meanwhile by another process: checked like any other
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; this one is not


class Spool:
    """The spool of one ledger, as seen by one `~tokenledger._writer.BatchWriter`.

    `append` may be called from any thread; the rest (`seal`, `read`, `remove`,
    `claim_orphans`, `release`) from the writer's thread, or when it is stopped.

    Args:
        directory: where the segments live (see `spool_directory`).
        key: the ledger's `ledger_key`; segments of another ledger are never replayed.
        durable: fsync each row before `append` returns (see the module docstring).

    .. versionadded:: 0.1.0
    """

    def __init__(self, directory: Path, key: str, *, durable: bool) -> None:
        self.directory = directory
        self.key = key
        self.durable = durable
        self._lock = threading.Lock()  # the active segment, the lists and the counters
        self._sync_lock = threading.Lock()  # one fdatasync at a time: group commit
        self._distrust_said: set[str] = set()  # what was logged as untrusted, once each
        self._reset()

    def _reset(self) -> None:
        self._active: Segment | None = None
        self._sealed: list[Segment] = []  # oldest first: replayed in this order
        self._next_seq = 1
        self._written = 0  # lines written to any segment
        self._synced = 0  # of those, how many are known to be on disk
        self._token = secrets.token_hex(4)
        #: Rows ever appended, and rows ever replayed (committed from a segment).
        self.appended = 0
        self.replayed = 0

    def __repr__(self) -> str:
        return f"<Spool {self.directory} rows={self.rows}>"

    # -- state ------------------------------------------------------------------------
    @property
    def has_rows(self) -> bool:
        """Whether any segment is waiting to be replayed (a lock-free snapshot)."""
        return self._active is not None or bool(self._sealed)

    @property
    def rows(self) -> int:
        """Rows in the spool not yet committed to the database."""
        with self._lock:
            segments = [*self._sealed, *([self._active] if self._active else [])]
            return sum(max(segment.rows - segment.done, 0) for segment in segments)

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest segment so far (0: none yet)."""
        return self._next_seq - 1

    def settled(self, seq: int) -> bool:
        """Whether every segment numbered ``seq`` or lower is replayed and removed."""
        with self._lock:
            if self._active is not None and self._active.seq <= seq:
                return False
            return all(segment.seq > seq for segment in self._sealed)

    def files_on_disk(self) -> bool:
        """Whether the directory holds any segment (ours or another process's)."""
        try:
            return any(name.endswith(_SUFFIX) for name in os.listdir(self.directory))
        except OSError:
            return False

    # -- appending --------------------------------------------------------------------
    def append(self, table: str, row: Row) -> None:
        """Append one row. In ``durable`` mode it is on disk when this returns.

        Raises TypeError or ValueError when the row cannot be encoded, and OSError when
        the spool cannot be written (directory not writable, disk full): the caller
        keeps the row some other way.
        """
        line = encode_row(table, row)
        with self._lock:
            segment = self._active
            if segment is None:
                segment = self._active = self._open_segment()
            try:
                _write_all(segment.fd, line)
            except OSError:
                # A partial line may be on disk: never append after it. The segment is
                # sealed; its complete rows are replayed and its torn tail ignored.
                segment.torn = True
                self._seal_active_locked()
                raise
            segment.rows += 1
            self.appended += 1
            self._written += 1
            ticket = self._written
        if self.durable:
            self._sync(ticket)

    def _sync(self, ticket: int) -> None:
        with self._sync_lock:
            if self._synced >= ticket:
                return  # another thread's fdatasync covered this row
            with self._lock:
                segment, target = self._active, self._written
            # Sealing takes _sync_lock first, so this segment stays open meanwhile;
            # rows of segments sealed earlier were synced when they were sealed.
            if segment is not None:
                _datasync(segment.fd)
            self._synced = target

    def _distrusted(self, path: Path, why: str, action: str) -> None:
        """Log once per path and reason that ``path`` is not trusted."""
        said = f"{path}\0{why}"
        if said in self._distrust_said:
            return
        self._distrust_said.add(said)
        logger.error(
            "tokenledger does not trust spool %s: %s. %s Fix it with `chown $USER` and "
            "`chmod 700` (directories) or `chmod 600` (files), or remove it.",
            path,
            why,
            action,
        )

    def trusted(self) -> bool:
        """Whether the spool directory exists and only this user can have written it
        (logged once when not)."""
        if not os.path.lexists(self.directory):
            return False
        why = _untrusted_directory(self.directory)
        if why is not None:
            self._distrusted(
                self.directory,
                why,
                "Nothing in it is replayed and nothing is written to it; rows that "
                "would be spooled are kept in memory.",
            )
            return False
        return True

    def _open_segment(self) -> Segment:
        directory = self.directory
        if not os.path.lexists(directory):
            _make_directories(directory)
        if not self.trusted():
            raise UntrustedSpool(
                f"spool directory {directory} is not trusted: "
                f"{_untrusted_directory(directory) or 'it cannot be created'}"
            )
        seq = self._next_seq
        name = f"{time.time_ns():x}-{os.getpid()}-{self._token}-{seq}"
        temporary = directory / f".{name}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(temporary, flags, 0o600)
        try:
            _lock(fd)
            header = {
                "tokenledger_spool": FORMAT_VERSION,
                "ledger": self.key,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "created": dt.datetime.now(dt.timezone.utc).isoformat(),
            }
            _write_all(fd, json.dumps(header, separators=(",", ":")).encode() + b"\n")
            path = directory / f"{name}{_SUFFIX}"
            os.rename(temporary, path)
            if self.durable:
                _datasync(fd)
                _fsync_directory(directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._next_seq = seq + 1
        return Segment(path, fd, seq, orphan=False)

    # -- replaying --------------------------------------------------------------------
    def seal(self) -> list[Segment]:
        """Close the segment being appended to (new rows start a new one); return every
        segment waiting to be replayed, oldest first."""
        with self._sync_lock, self._lock:
            self._seal_active_locked()
            return list(self._sealed)

    def _seal_active_locked(self) -> None:
        segment = self._active
        if segment is None:
            return
        if self.durable and not segment.torn:
            try:
                _datasync(segment.fd)
            except OSError:  # pragma: no cover - the rows stay readable in the page cache
                logger.warning("tokenledger could not fsync spool file %s", segment.path)
        self._synced = self._written
        self._active = None
        self._sealed.append(segment)
        self._sealed.sort(key=lambda s: s.seq)

    def read(self, segment: Segment, batch_rows: int) -> Iterator[tuple[list[SpoolRow], int]]:
        """The segment's rows not yet committed, in batches of up to ``batch_rows``.

        Each batch comes with the byte offset just after its last line: give it to
        `committed` once the batch is written. A corrupt line is logged, counted and
        skipped (the segment is kept as ``.corrupt`` when removed); an incomplete last
        line, left by a process killed in the middle of a write, is ignored: its call
        had not returned.
        """
        with open(segment.path, "rb") as file:
            if segment.offset == 0:
                header = file.readline()
                if not header.endswith(b"\n"):
                    return  # killed while writing its header: no rows
                segment.offset = file.tell()
            else:
                file.seek(segment.offset)
            batch: list[SpoolRow] = []
            offset = segment.offset
            number = 0
            for line in file:
                number += 1
                if not line.endswith(b"\n"):
                    if not segment.orphan:
                        segment.torn = True
                    logger.debug("tokenledger ignored an incomplete last line in %s", segment.path)
                    break
                offset += len(line)
                try:
                    batch.append(decode_line(line))
                except (ValueError, TypeError, ArithmeticError) as exc:
                    segment.corrupt += 1
                    logger.error(
                        "tokenledger skipped a corrupt line in spool file %s (%s); the file "
                        "is kept as %s.corrupt for inspection.",
                        segment.path,
                        exc,
                        segment.path.name,
                    )
                    continue
                if len(batch) >= batch_rows:
                    yield batch, offset
                    batch = []
            if batch or offset != segment.offset:
                yield batch, offset

    def committed(self, segment: Segment, rows: int, offset: int) -> None:
        """``rows`` more rows of ``segment``, up to byte ``offset``, are in the database."""
        with self._lock:
            segment.done += rows
            segment.offset = offset
            self.replayed += rows

    def remove(self, segment: Segment) -> None:
        """Every row of ``segment`` is committed: delete it (or keep it as ``.corrupt``)."""
        with self._lock:
            if segment not in self._sealed:
                return  # released meanwhile: the next writer on the ledger replays it
            try:
                if segment.corrupt:
                    os.replace(segment.path, f"{segment.path}.corrupt")
                else:
                    os.unlink(segment.path)
            except FileNotFoundError:
                pass
            finally:
                # Unlinked while still locked: a process that opened it meanwhile finds
                # the path gone (or another file) once it gets the lock, and skips it.
                os.close(segment.fd)
                self._sealed.remove(segment)

    # -- orphans ----------------------------------------------------------------------
    def claim_orphans(self) -> int:
        """Take every segment whose writer is gone, for replay; returns how many rows.

        A segment another live process (or another writer in this process) holds is
        left alone, as is one of another ledger or of a newer line format.
        """
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return 0
        if not self.trusted():
            return 0
        with self._lock:
            known = {s.path.name for s in self._sealed}
            if self._active is not None:
                known.add(self._active.path.name)
        claimed = 0
        for name in names:
            if not name.endswith(_SUFFIX) or name in known:
                continue
            segment = self._claim(self.directory / name)
            if segment is not None:
                claimed += segment.rows
        return claimed

    def _claim(self, path: Path) -> Segment | None:
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags)
        except OSError:
            return None
        keep = False
        try:
            why = _untrusted_file(os.fstat(fd))
            if why is not None:
                self._distrusted(path, why, "It is left alone and never replayed.")
                return None
            if not _lock(fd):
                return None  # its writer is alive
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                return None  # replayed and removed by another process just now
            with open(path, "rb") as file:
                header_line = file.readline()
                rows = file.read().count(b"\n")
            header = self._header(path, header_line)
            if header is None:
                return None
            if fcntl is None and _pid_alive(header.get("pid")):  # pragma: no cover
                return None
            with self._lock:
                segment = Segment(path, fd, self._next_seq, rows=rows, orphan=True)
                self._next_seq += 1
                self._sealed.append(segment)
                self._sealed.sort(key=lambda s: s.seq)
            keep = True
            if rows:
                logger.warning(
                    "tokenledger found %d row(s) in spool file %s, left by process %s on %s; "
                    "writing them to the ledger.",
                    rows,
                    path,
                    header.get("pid"),
                    header.get("host"),
                )
            return segment
        finally:
            if not keep:
                os.close(fd)

    def _header(self, path: Path, line: bytes) -> dict[str, Any] | None:
        if not line.endswith(b"\n"):
            return {}  # killed while writing the header: an empty segment, removed
        try:
            header = json.loads(line)
        except ValueError:
            header = None
        if not isinstance(header, dict) or "tokenledger_spool" not in header:
            logger.error("tokenledger left %s alone: it is not a tokenledger spool file.", path)
            return None
        version = header["tokenledger_spool"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            logger.error(
                "tokenledger left spool file %s alone: it was written in spool format %r by "
                "a newer tokenledger, which must replay it.",
                path,
                version,
            )
            return None
        if header.get("ledger") != self.key:
            logger.error(
                "tokenledger left spool file %s alone: it belongs to another ledger (key %s, "
                "this ledger's is %s).",
                path,
                header.get("ledger"),
                self.key,
            )
            return None
        return header

    # -- letting go -------------------------------------------------------------------
    def release(self) -> int:
        """Close every segment without removing it; returns the rows left on disk.

        They are orphans from now on: the next writer on this ledger replays them.
        """
        with self._sync_lock, self._lock:
            self._seal_active_locked()
            left = sum(max(s.rows - s.done, 0) for s in self._sealed)
            for segment in self._sealed:
                if segment.rows <= segment.done and not segment.corrupt:
                    with contextlib.suppress(OSError):  # fully replayed, not yet removed
                        os.unlink(segment.path)
                os.close(segment.fd)
            self._sealed = []
        return left

    def after_fork_in_child(self) -> None:
        """In a forked child: drop the parent's segments (closing only our copies of
        their descriptors; the parent keeps its locks) and start afresh."""
        for segment in [*self._sealed, *([self._active] if self._active else [])]:
            with contextlib.suppress(OSError):
                os.close(segment.fd)
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._reset()
