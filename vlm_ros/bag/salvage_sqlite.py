"""Reading the intact rows of a truncated or corrupt sqlite3 rosbag2 (a recorder killed, a copy
cut short).

rosbags refuses such a file outright: SQLite sees that the database is shorter than its header
says and calls the whole image malformed. Most rows are still there, though. With
``PRAGMA writable_schema=ON`` SQLite takes the file's real length instead, and each row can then
be looked up by its id (rosbag2 numbers messages 1, 2, ... in the order it wrote them); a row
whose pages lie past the damage fails on its own and is counted as lost. A table scan is not
used because it stops at the first lost page.

SQLite reads a page cut short by the truncation as zero-padded, which would hand back a row with
a zeroed tail as if it were intact (sqlite3 rows have no checksum). The file is therefore opened
through a small read-only VFS (apsw, which rosbags depends on) that ends the file at its last
whole page. A row is then kept when its topic is known and its data deserialises. Damage inside
the file rather than at its end cannot be seen this way; a picture that decodes wrongly is then
rejected by the node's converter like any bad frame.

Offers the same small reader interface as salvage.SalvageReader (connections, topics, messages,
deserialize, damage). The file itself is never written to.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import closing
from functools import lru_cache
from pathlib import Path

import yaml

from vlm_ros.bag.salvage import SalvagedConnection, TopicCount, typestore_from_schemas

VFS_NAME = "vlm_ros_whole_pages"


def db3_files(bag: Path) -> list[Path]:
    """The sqlite3 storage files of a rosbag2 folder, in name order (split bags are numbered)."""
    return sorted(bag.glob("*.db3")) if bag.is_dir() else []


def expected_counts(bag: Path) -> dict[str, int]:
    """Messages per storage file as metadata.yaml states them (empty when it says nothing)."""
    try:
        doc = yaml.safe_load((bag / "metadata.yaml").read_text(encoding="utf-8")) or {}
        info = doc["rosbag2_bagfile_information"]
    except Exception:  # no, or an unreadable, metadata.yaml: the ids are found without it
        return {}
    files = info.get("files") or []
    counts = {Path(f["path"]).name: int(f["message_count"]) for f in files if "path" in f}
    paths = info.get("relative_file_paths") or []
    if not counts and len(paths) == 1 and "message_count" in info:
        counts[Path(paths[0]).name] = int(info["message_count"])
    return counts


@lru_cache(maxsize=1)
def _whole_pages_vfs():
    """The VFS, registered once per process (apsw needs the object kept alive)."""
    import apsw

    class WholePagesFile(apsw.VFSFile):
        """The default VFS's file, ending at the last whole page; reads past it fail."""

        def __init__(self, name, flags):
            super().__init__("", name, flags)
            path = name.filename() if isinstance(name, apsw.URIFilename) else name
            self.limit = _whole_pages(Path(path))

        def xFileSize(self) -> int:
            return self.limit

        def xRead(self, amount: int, offset: int) -> bytes:
            if offset + amount > self.limit:
                raise apsw.IOError("past the last whole page")
            return super().xRead(amount, offset)

    class WholePagesVFS(apsw.VFS):
        def __init__(self):
            super().__init__(VFS_NAME, "")

        def xOpen(self, name, flags):
            return WholePagesFile(name, flags)

    return WholePagesVFS()


def _pages(path: Path) -> tuple[int, int, int]:
    """(file size, page size, pages the header claims) from SQLite's 100-byte header (page size
    at bytes 16-17, 1 meaning 64 KiB; page count at 28-31); zeros where the header is cut."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(100)
    if len(head) < 32:
        return size, 0, 0
    page = int.from_bytes(head[16:18], "big")
    return size, 65536 if page == 1 else page, int.from_bytes(head[28:32], "big")


def _whole_pages(path: Path) -> int:
    """The file's length rounded down to a whole number of pages."""
    size, page, _ = _pages(path)
    return size - size % page if page else size


def damage_reason(path: Path, con=None, fallback: str = "rows missing") -> str:
    """``cam.db3: truncated: 9 of 19 pages present``, else SQLite's first integrity complaint
    (with an open ``con``), else ``fallback``."""
    size, page, claimed = _pages(path)
    if page and claimed and size // page < claimed:
        return f"{path.name}: truncated: {size // page} of {claimed} pages present"
    found = _rows(con, "PRAGMA quick_check(1)") if con is not None else []
    text = str(found[0][0]).replace("*** in database main ***", "") if found else ""
    text = " ".join(text.split())
    return f"{path.name}: {text if text and text != 'ok' else fallback}"


def _connect(path: Path):
    """Read-only, no locking or journal (immutable), the real file length (writable_schema)."""
    import apsw

    _whole_pages_vfs()
    con = apsw.Connection(
        f"{path.resolve().as_uri()}?mode=ro&immutable=1",
        flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI,
        vfs=VFS_NAME,
    )
    con.execute("PRAGMA writable_schema=ON")
    return con


def _rows(con, sql: str, bindings: tuple = ()) -> list[tuple]:
    """Every row ``sql`` yields before SQLite trips on damage."""
    import apsw

    rows: list[tuple] = []
    try:
        for row in con.execute(sql, bindings):
            rows.append(row)
    except apsw.Error:
        pass
    return rows


class SqliteSalvageReader:
    """The readable messages of (possibly damaged) rosbag2 sqlite3 files, in log-time order."""

    def __init__(self, files: Sequence[Path], expected: dict[str, int] | None = None):
        self.files = list(files)
        self.expected = expected or {}
        self.connections: list[SalvagedConnection] = []
        self.topics: dict[str, TopicCount] = {}
        self._index: list[list[tuple[int, int, SalvagedConnection]]] = []  # per file: ts, id, conn
        self._schemas: dict[str, str] = {}
        self._reasons: list[str] = []
        self._lost = 0  # rows metadata.yaml or the table promise that cannot be found
        self._bad: set[tuple[int, int]] = set()  # (file, id) of found rows that do not decode
        for path in self.files:
            self._index.append(self._scan(path))
        self.typestore = typestore_from_schemas(self._schemas)
        self._count_topics()
        self.damage: str | None = self._damage_text()

    def _scan(self, path: Path) -> list[tuple[int, int, SalvagedConnection]]:
        """Topics, definitions and (log time, id, connection) of every row that can be found."""
        import apsw

        try:
            with closing(_connect(path)) as con:
                return self._scan_db(path, con)
        except apsw.Error as exc:
            self._reasons.append(damage_reason(path, fallback=" ".join(str(exc).split())))
            self._lost += self.expected.get(path.name, 0)
            return []

    def _scan_db(self, path: Path, con):
        conns = {}
        for topic_id, name, msgtype in _rows(con, "SELECT id, name, type FROM topics"):
            if isinstance(name, str) and name and isinstance(msgtype, str) and msgtype:
                conns[topic_id] = SalvagedConnection(len(self.connections), name, msgtype)
                self.connections.append(conns[topic_id])
        defs = "SELECT topic_type, encoding, encoded_message_definition FROM message_definitions"
        for msgtype, encoding, text in _rows(con, defs):  # absent before Iron: types then known
            if encoding == "ros2msg" and isinstance(text, str) and text:
                self._schemas[msgtype] = text
        index, missing = [], 0
        for row_id in self._row_ids(path, con):
            found = _rows(con, "SELECT topic_id, timestamp FROM messages WHERE id = ?", (row_id,))
            row = found[0] if found else None
            if row is None or row[0] not in conns or not isinstance(row[1], int):
                missing += 1
                continue
            index.append((row[1], row_id, conns[row[0]]))
        if missing:
            self._lost += missing
            self._reasons.append(damage_reason(path, con))
        return sorted(index, key=lambda item: item[:2])

    def _row_ids(self, path: Path, con) -> list[int]:
        """Ids to look up: 1..N with N from metadata.yaml, else from the table itself (bounded
        by what the file can hold, since a damaged page can claim any id)."""
        if path.name in self.expected:
            return list(range(1, self.expected[path.name] + 1))
        cap = os.path.getsize(path) // 8  # a row takes more than 8 bytes of the file
        top = _rows(con, "SELECT max(id) FROM messages")
        scanned = [r[0] for r in _rows(con, "SELECT id FROM messages")]
        highest = max([n for n in [*scanned, *(t[0] for t in top)] if isinstance(n, int)] or [0])
        return list(range(1, min(highest, cap) + 1))

    def _count_topics(self) -> None:
        for index in self._index:
            for _, _, conn in index:
                prev = self.topics.get(conn.topic, TopicCount(conn.msgtype, 0))
                self.topics[conn.topic] = TopicCount(conn.msgtype, prev.msgcount + 1)
        for conn in self.connections:  # topics with no readable row still show, with 0
            self.topics.setdefault(conn.topic, TopicCount(conn.msgtype, 0))

    def _damage_text(self) -> str | None:
        if not self._reasons:
            return None
        found = sum(len(index) for index in self._index)
        return (
            f"sqlite3 bag is truncated or corrupt ({'; '.join(self._reasons)}): "
            f"{found - len(self._bad)} of {found + self._lost} messages readable"
        )

    def messages(
        self, connections: Sequence = ()
    ) -> Iterator[tuple[SalvagedConnection, int, bytes]]:
        """Rows of ``connections`` whose data can be read and deserialised, by log time per
        file; a row that fails is counted as lost (in ``damage``) and skipped."""
        wanted = {c.id for c in (connections or self.connections)}
        for n, (path, index) in enumerate(zip(self.files, self._index, strict=True)):
            if not index:
                continue
            with closing(_connect(path)) as con:
                for log_ns, row_id, conn in index:
                    if conn.id not in wanted or (n, row_id) in self._bad:
                        continue
                    data = self._data(con, row_id, conn.msgtype)
                    if data is None:
                        self._bad.add((n, row_id))
                        self._reasons = self._reasons or [f"{path.name}: rows that do not decode"]
                        self.damage = self._damage_text()
                        continue
                    yield conn, log_ns, data

    def _data(self, con, row_id: int, msgtype: str) -> bytes | None:
        try:
            data = bytes(_rows(con, "SELECT data FROM messages WHERE id = ?", (row_id,))[0][0])
            self.typestore.deserialize_cdr(data, msgtype)  # no checksum: decoding is the check
        except Exception:  # an unreadable page, or garbage that is not this type's CDR
            return None
        return data

    def deserialize(self, raw: bytes, msgtype: str) -> object:
        return self.typestore.deserialize_cdr(raw, msgtype)
