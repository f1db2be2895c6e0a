"""Opening and writing bags with rosbags, with every library failure turned into one BagError line.

rosbags raises a different exception per format and per kind of damage (ReaderError, sqlite
errors, struct errors on a truncated MCAP chunk, ...). Callers here only need to know "this bag
cannot be read, and why", so reading goes through ``open_reader``/``iter_messages`` which map all
of them to :class:`BagError` naming the bag.
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlm_ros.bag import BagDamageError, BagError, describe_error
from vlm_ros.bag.salvage import SalvageReader, mcap_files
from vlm_ros.bag.salvage_sqlite import SqliteSalvageReader, db3_files, expected_counts
from vlm_ros.bag.types import ros1_typestore, typestore

STORAGES = ("mcap", "sqlite3", "ros1")
# rosbag2 metadata version 8 (Iron) is read by Iron, Jazzy, Kilted and rosbags; 9 only from Jazzy.
ROSBAG2_VERSION: Literal[8] = 8


ROS1_MAGIC = b"#ROSBAG V2.0\n"
MCAP_MAGIC = b"\x89MCAP0\r\n"


def check_magic(path: Path) -> None:
    """A .bag or .mcap file that does not start with its format's magic bytes is not a damaged
    bag but another file: say so in one line, before a reader trips over it somewhere deep
    (rosbags reported a garbage .bag as a UTF-8 decoding error and a garbage MCAP as a tuple of
    byte values)."""
    magic, kind = {".bag": (ROS1_MAGIC, "a ROS 1 bag"), ".mcap": (MCAP_MAGIC, "an MCAP file")}.get(
        path.suffix, (b"", "")
    )
    if not magic or path.stat().st_size == 0:
        return
    with open(path, "rb") as fh:
        head = fh.read(len(magic))
    if head != magic:
        raise BagError(f"{path} is not {kind}: it does not start with the format's magic bytes")


def resolve_bag_path(path: str | Path) -> Path:
    """The path rosbags wants: a rosbag2 folder (also when given its .mcap/.db3 file) or a .bag."""
    p = Path(path)
    if not p.exists():
        raise BagError(f"bag not found: {p}")
    if p.is_file():
        check_magic(p)
    if p.is_file() and p.suffix in (".mcap", ".db3") and (p.parent / "metadata.yaml").is_file():
        return p.parent
    if p.is_file() and p.suffix in (".bag", ".mcap"):  # ROS 1, or an MCAP without metadata.yaml
        return p
    if p.is_dir() and (p / "metadata.yaml").is_file():
        return p
    if p.is_dir() and (any(p.glob("*.db3")) or any(p.glob("*.mcap"))):
        return p  # a recorder killed before writing metadata.yaml: open_reader salvages it
    if p.is_dir():
        raise BagError(f"{p} is not a rosbag2 folder (no metadata.yaml)")
    raise BagError(
        f"{p} is not a bag: expected a rosbag2 folder (sqlite3/MCAP), an .mcap or a ROS 1 .bag"
    )


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "damaged or unreadable bag" across rosbags' readers and storages.

    A truncated or corrupted file surfaces as whatever the lowest layer trips on (struct, zstd,
    sqlite, UTF-8, an index past the end), so the tuple is broad on purpose; it is only used
    around reading, never around our own code.
    """
    from rosbags.highlevel import AnyReaderError
    from rosbags.rosbag1 import ReaderError as Reader1Error
    from rosbags.rosbag2 import ReaderError as Reader2Error
    from rosbags.serde import SerdeError

    errors: list[type[BaseException]] = [
        AnyReaderError,
        Reader1Error,
        Reader2Error,
        SerdeError,
        sqlite3.Error,
        struct.error,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        AssertionError,
        UnicodeDecodeError,
        OSError,
        RuntimeError,
        TypeError,
        AttributeError,
    ]
    try:
        import apsw

        errors.append(apsw.Error)
    except ImportError:  # pragma: no cover - rosbags pulls apsw in on current versions
        pass
    return tuple(errors)


@contextmanager
def open_reader(path: str | Path):
    """An open rosbags AnyReader that also knows this package's messages.

    Bags recorded by ``ros2 bag record`` (Iron and later) and by eval-bag embed their message
    definitions; for older ones (Humble sqlite3) the package's own types are used. A truncated
    or corrupt bag that rosbags refuses is read as far as it is intact instead (salvage.py for
    MCAP, salvage_sqlite.py for sqlite3); its iteration then ends in the damage error (see
    iter_messages). Nothing readable at all raises BagDamageError.
    """
    bag = resolve_bag_path(path)
    if bag.suffix == ".mcap":  # a lone MCAP file (no rosbag2 metadata.yaml): stream it
        yield _bare_mcap(bag)
        return
    reader, error = _open_anyreader(bag)
    if reader is None:
        salvage = _salvage(bag)
        if salvage is None or not any(t.msgcount for t in salvage.topics.values()):
            found = getattr(salvage, "damage", None)  # the salvage's account is the clearer
            raise BagDamageError(f"cannot open bag {bag}: {found or error}")
        yield salvage
        return
    try:
        _register_missing_types(reader)
        yield reader
    finally:
        try:
            reader.close()
        except _read_errors():
            pass


def _open_anyreader(bag: Path):
    """(open AnyReader, None), or (None, one-line reason) when rosbags cannot open the bag."""
    from rosbags.highlevel import AnyReader

    try:
        reader = AnyReader([bag], default_typestore=typestore())
        reader.open()
    except _read_errors() as exc:
        return None, describe_error(exc)
    return reader, None


def _bare_mcap(path: Path):
    """A reader over an MCAP file that is not inside a rosbag2 folder (copied out, or written by
    another tool); rosbags only opens MCAP through a folder's metadata.yaml."""
    reader = SalvageReader([path])
    if reader.damage and not reader.topics:  # not MCAP at all, or damaged before any channel
        raise BagDamageError(f"cannot open bag {path}: {reader.damage}")
    return reader


def _salvage(bag: Path):
    """A reader over the intact part of a damaged MCAP or sqlite3 bag; None when even the
    salvage readers cannot start."""
    try:
        if mcap_files(bag):
            return SalvageReader(mcap_files(bag))
        if db3_files(bag):
            return SqliteSalvageReader(db3_files(bag), expected_counts(bag))
    except Exception:  # the file is not even the storage it claims: nothing to salvage
        return None
    return None


def _register_missing_types(reader) -> None:
    """Add our types to a reader whose bag embeds definitions for some connections only."""
    store = typestore()
    missing = {k: v for k, v in store.fielddefs.items() if k not in reader.typestore.fielddefs}
    if missing:
        reader.typestore.register(missing)


def topics_text(reader) -> str:
    """``/a (sensor_msgs/msg/Image, 20 msgs), /b (...)``: what a missing-topic error lists."""
    items = [
        f"{name} ({info.msgtype}, {info.msgcount} msgs)"
        for name, info in sorted(reader.topics.items())
    ]
    return ", ".join(items) if items else "none (the bag has no topics)"


def iter_messages(reader, connections: Sequence, on_error) -> Iterator[tuple[Any, int, Any]]:
    """(connection, log time ns, deserialised message) in log-time order.

    A read or decode failure part-way (truncated file) ends the iteration and is passed to
    ``on_error(one_line_text)`` instead of raising, so callers can still report what was read.
    """
    errors = _read_errors()
    it = reader.messages(connections=connections)
    while True:
        try:
            conn, ts, raw = next(it)
            msg = reader.deserialize(raw, conn.msgtype)
        except StopIteration:
            damage = getattr(reader, "damage", None)  # a salvaged truncated file ends in damage
            if damage:
                on_error(damage)
            return
        except errors as exc:
            on_error(describe_error(exc))
            return
        yield conn, ts, msg


@dataclass(frozen=True)
class OutMessage:
    """One message to write: topic, type name (ROS 2 form), log time in ns, message object."""

    topic: str
    msgtype: str
    log_ns: int
    msg: Any  # a rosbags message dataclass


def write_bag(path: str | Path, messages: Sequence[OutMessage], storage: str = "mcap") -> Path:
    """Write ``messages`` (in log-time order) to a new bag; ``storage`` mcap | sqlite3 | ros1.

    Messages are sorted by log time first: eval-bag computes answer times out of order and
    some readers (ros2 bag play) expect a time-ordered file.
    """
    if storage not in STORAGES:
        raise BagError(f"unknown storage {storage!r}; expected one of {', '.join(STORAGES)}")
    ordered = sorted(messages, key=lambda m: m.log_ns)
    out = Path(path)
    if out.exists():
        raise BagError(f"{out} exists already; choose a new output path")
    if storage == "ros1":
        return _write_ros1(out, ordered)
    return _write_ros2(out, ordered, storage)


def _write_ros2(out: Path, ordered: Sequence[OutMessage], storage: str) -> Path:
    from rosbags.rosbag2 import StoragePlugin, Writer

    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    ts = typestore()
    with Writer(out, version=ROSBAG2_VERSION, storage_plugin=plugin) as writer:
        conns: dict[tuple[str, str], Any] = {}
        for m in ordered:
            key = (m.topic, m.msgtype)
            if key not in conns:
                conns[key] = writer.add_connection(m.topic, m.msgtype, typestore=ts)
            writer.write(conns[key], m.log_ns, ts.serialize_cdr(m.msg, m.msgtype))
    return out


def _write_ros1(out: Path, ordered: Sequence[OutMessage]) -> Path:
    """A ROS 1 bag (for reader tests and ROS 1 users); messages must be ROS 1 store objects."""
    from rosbags.rosbag1 import Writer

    ts = ros1_typestore()
    with Writer(out) as writer:
        conns: dict[tuple[str, str], Any] = {}
        for m in ordered:
            key = (m.topic, m.msgtype)
            if key not in conns:
                conns[key] = writer.add_connection(m.topic, m.msgtype, typestore=ts)
            writer.write(conns[key], m.log_ns, ts.serialize_ros1(m.msg, m.msgtype))
    return out
