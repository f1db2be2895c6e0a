"""Where eval-bag and report write: the output folder is checked before any work starts.

A replay of a long bag takes minutes; finding only at the end that ``--out`` is a file, sits
under ``/proc`` or already holds another bag's report loses the whole run. ``prepare_out_dir``
runs first, in both commands, with one overwrite policy: a folder that already holds a report
(or an output bag) is refused unless ``force`` is given, and then what this tool wrote there
before is removed, so the folder never mixes two runs.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from vlm_ros.errors import InputError

OUTPUT_BAG = "output_bag"
# Everything write_report / eval-bag put in a report folder (the plots are *.png).
REPORT_FILES = ("report.json", "report.md")


def report_files(out: Path) -> list[Path]:
    """What a previous run of eval-bag or report left in ``out``."""
    found = [out / name for name in REPORT_FILES if (out / name).exists()]
    if (out / OUTPUT_BAG).exists():
        found.append(out / OUTPUT_BAG)
    if found:  # plots only count as ours beside a report
        found += sorted(out.glob("*.png"))
    return found


def prepare_out_dir(path: str | Path, force: bool = False, flag: str = "--out") -> Path:
    """Check that ``path`` can take a new report, or raise InputError (one line); the folder
    itself is made by whoever writes first.

    Refused: an existing file; a folder holding a report or output bag (unless ``force``:
    then those are removed first); a path that cannot be created or written (the OS's reason).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out} is an existing file; give a folder for the report")
    previous = report_files(out) if out.is_dir() else []
    if previous and not force:
        names = ", ".join(p.name for p in previous[:3])
        raise InputError(
            f"{flag} {out} already holds a report ({names}); "
            "pass --force to replace it, or choose another folder"
        )
    _check_writable(out, flag)
    for old in previous:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return out


def _check_writable(out: Path, flag: str) -> None:
    """Create ``out`` and a file in it for real (permission bits say little to root, and
    nothing about /proc or a read-only mount), then remove what the check created: a run
    refused later (say, for the bag's encoding) leaves nothing behind."""
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to {flag} {out}: {exc.strerror or exc}") from None
    finally:
        for created in missing:  # innermost first; only folders this check made, still empty
            if created.is_dir() and not any(created.iterdir()):
                created.rmdir()
