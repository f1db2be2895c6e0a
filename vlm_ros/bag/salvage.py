"""Reading what is left of a truncated MCAP file (a recorder killed, a robot losing power).

rosbags needs an MCAP's summary section, which is written last, so it refuses a truncated file
outright. The records before the damage are still intact, though, and the ``mcap`` library can
stream them in file order. This reader does that and offers the small part of rosbags'
AnyReader interface that eval-bag and report use (connections, topics, messages, deserialize),
plus ``damage``: the error that ended the file, reported once the last good message was read.
The same streaming reads a complete MCAP file that sits outside a rosbag2 folder.
salvage_sqlite.py does the same for sqlite3 bags, sharing the connection types and the typestore.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlm_ros.bag import describe_error
from vlm_ros.bag.types import typestore


@dataclass(frozen=True)
class SalvagedConnection:
    id: int
    topic: str
    msgtype: str


@dataclass(frozen=True)
class TopicCount:
    msgtype: str
    msgcount: int


def mcap_files(bag: Path) -> list[Path]:
    """The MCAP storage files of a rosbag2 folder, in name order (split bags are numbered)."""
    return sorted(bag.glob("*.mcap")) if bag.is_dir() else []


class SalvageReader:
    """Streams the intact messages of (possibly truncated) MCAP files."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self.damage: str | None = None
        self.connections: list[SalvagedConnection] = []
        self.topics: dict[str, TopicCount] = {}
        self._schemas: dict[str, str] = {}
        self._scan()
        self.typestore = typestore_from_schemas(self._schemas)

    def _records(self, path: Path) -> Iterator[object]:
        """Records of one file; the first failure is kept in ``damage`` and ends the stream."""
        from mcap.stream_reader import StreamReader

        with open(path, "rb") as fh:
            try:
                yield from StreamReader(fh, validate_crcs=True).records
            except Exception as exc:  # any failure past the last good record is "the damage"
                self.damage = f"{path.name} is truncated or corrupt ({describe_error(exc)})"

    def _scan(self) -> None:
        """One pass to learn channels, schemas and message counts (what the error lists)."""
        from mcap.records import Channel, Message, Schema

        schemas: dict[int, Schema] = {}
        counts: dict[int, int] = {}
        for path in self.files:
            for rec in self._records(path):
                if isinstance(rec, Schema):
                    schemas[rec.id] = rec
                elif isinstance(rec, Channel) and rec.schema_id in schemas:
                    schema = schemas[rec.schema_id]
                    self._schemas[schema.name] = schema.data.decode("utf-8", "replace")
                    if all(c.id != rec.id for c in self.connections):
                        self.connections.append(SalvagedConnection(rec.id, rec.topic, schema.name))
                elif isinstance(rec, Message):
                    counts[rec.channel_id] = counts.get(rec.channel_id, 0) + 1
        for c in self.connections:
            prev = self.topics.get(c.topic, TopicCount(c.msgtype, 0))
            self.topics[c.topic] = TopicCount(c.msgtype, prev.msgcount + counts.get(c.id, 0))

    def messages(
        self, connections: Sequence = ()
    ) -> Iterator[tuple[SalvagedConnection, int, bytes]]:
        from mcap.records import Message

        wanted = {c.id: c for c in (connections or self.connections)}
        self.damage = None
        for path in self.files:
            for rec in self._records(path):
                if isinstance(rec, Message) and rec.channel_id in wanted:
                    yield wanted[rec.channel_id], rec.log_time, rec.data

    def deserialize(self, raw: bytes, msgtype: str) -> object:
        return self.typestore.deserialize_cdr(raw, msgtype)


def typestore_from_schemas(schemas: dict[str, str]):
    """A typestore of the bag's own ``ros2msg`` definitions (type name -> text), with the
    package's and the standard types for anything missing or unparsable."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    types: dict = {}
    for name, text in schemas.items():
        try:
            types.update(get_types_from_msg(text, name))
        except Exception:  # an unparsable schema: fall back to the known types below
            pass
    ts = get_typestore(Stores.EMPTY)
    known = typestore().fielddefs
    ts.register({**{k: v for k, v in known.items() if k not in types}, **types})
    return ts
