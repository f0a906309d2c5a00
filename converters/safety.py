"""Guards for the commands that write directories (the converter and the trainer).

- Paths are compared resolved (``..`` segments, symlinked parents, bind mounts through
  ``os.path.samefile``) before anything is replaced: an output may never be, or contain, an input.
- Temporary directories are created beside their target with the user's umask (``tempfile.mkdtemp``
  would make them 0700, and a renamed temporary directory *is* the output) and carry an owner
  marker (pid, process start time, boot, host). A later run sweeps the ones whose owner is provably
  gone (killed with SIGKILL, power loss); nothing without our name pattern and marker is touched.
- Signals are :mod:`engine.shell`'s: inside ``signals_interrupt`` SIGTERM, SIGHUP and SIGQUIT run the
  same clean-up as Ctrl-C, and ``deferred_interrupts`` holds them off while an output is swapped in.
- A full disk (``ENOSPC``/``EDQUOT``, also as safetensors reports it) is recognised by
  :func:`is_disk_full` and described in one line by :func:`disk_full_line`.

No torch import here: a killed helper process in the tests uses this module alone.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterable

MARKER = ".llm-encoder-engine-owner.json"
_KINDS = ("tmp", "old", "base")
_NAME = re.compile(r"^\.(?P<stem>.+)\.(?P<kind>tmp|old|base)-[0-9a-f]{8}$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# ---------------------------------------------------------------------------------------------------
# Paths


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` absolute, with ``~``, ``..`` and symlinked parents resolved; a final component that is
    itself a symlink is kept (so that the link, never its target, is what gets replaced)."""
    p = Path(path).expanduser().absolute()
    if p.is_symlink():
        return p.parent.resolve() / p.name
    return p.resolve()


def overlapping_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> Path | None:
    """The first of ``inputs`` that ``out`` is, or lies inside of, once both are resolved (replacing or
    deleting ``out`` would destroy it); None when ``out`` is clear of all of them."""
    target = Path(out).expanduser().absolute().resolve()
    exists = target.exists()
    for item in inputs:
        resolved = Path(item).expanduser().absolute().resolve()
        chain = [resolved, *resolved.parents]
        if target in chain:
            return Path(item)
        if exists:  # the same directory under two names (bind mounts, case-insensitive file systems)
            for d in chain:
                try:
                    if os.path.samefile(d, target):
                        return Path(item)
                except OSError:
                    continue
    return None


# ---------------------------------------------------------------------------------------------------
# Owned temporary directories


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None where unavailable."""
    text = _read(f"/proc/{pid}/stat")
    if text is None or ")" not in text:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None  # field 22 of stat(5)


def _boot_id() -> str | None:
    text = _read("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def _owner() -> dict:
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "boot": _boot_id(), "host": socket.gethostname()}


def owner_alive(owner: dict) -> bool:
    """False only when the marker's process is provably gone: same host, and another boot, no such
    pid, a zombie, or a pid reused by a later process. Anything unclear counts as alive."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True
    boot = _boot_id()
    if boot is not None and owner.get("boot") not in (None, boot):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to someone else
    fields = _stat_fields(pid)
    if fields is not None:
        if fields[0] == "Z":
            return False
        if owner.get("start") is not None and len(fields) > 19 and fields[19] != owner["start"]:
            return False
    return True


def write_marker(directory: Path, kind: str) -> None:
    (directory / MARKER).write_text(json.dumps({"kind": kind, **_owner()}) + "\n", encoding="ascii")


def read_marker(directory: Path) -> dict | None:
    text = _read(str(directory / MARKER))
    try:
        data = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def unused_name(parent: Path, stem: str, kind: str) -> Path:
    """A free ``parent/.{stem}.{kind}-XXXXXXXX`` (for a directory about to be renamed there)."""
    if kind not in _KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {_KINDS}")
    while True:
        path = parent / f".{stem}.{kind}-{secrets.token_hex(4)}"
        if not (path.exists() or path.is_symlink()):
            return path


def make_temp_dir(parent: Path, stem: str, kind: str = "tmp") -> Path:
    """``parent/.{stem}.{kind}-XXXXXXXX``, created with the user's umask, marked as this process's."""
    for _ in range(100):
        path = unused_name(parent, stem, kind)
        try:
            os.mkdir(path)  # mode 0o777 & ~umask, as any directory the user creates
        except FileExistsError:
            continue
        try:
            write_marker(path, kind)
        except BaseException:
            os.rmdir(path)
            raise
        return path
    raise FileExistsError(f"{parent}: could not create a temporary directory for {stem}")


def remove_owned(path: Path) -> None:
    """Delete a marked directory, the marker last: an interrupted removal can still be swept later."""
    marker = path / MARKER
    try:
        children = list(path.iterdir())
    except FileNotFoundError:
        return
    for child in children:
        if child == marker:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            try:
                child.unlink()
            except FileNotFoundError:
                pass
    try:
        marker.unlink()
    except FileNotFoundError:
        pass
    try:
        path.rmdir()
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def sweep(parent: Path, stems: Iterable[str] | None = None, kinds: Iterable[str] = _KINDS) -> list[Path]:
    """Remove what killed runs left in ``parent``: directories named ``.{stem}.{kind}-XXXXXXXX``
    (``stem`` in ``stems``, or any with None) whose marker names a process that is provably gone.

    A ``.{stem}.old-`` directory is a replaced output moved aside; it is deleted only when ``stem``
    exists again (the replacement landed), else it is moved back to ``stem``. Returns what was swept.
    """
    wanted = None if stems is None else set(stems)
    kinds = set(kinds)
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    swept = []
    for entry in sorted(entries):
        match = _NAME.match(entry.name)
        if match is None or match["kind"] not in kinds or (wanted is not None and match["stem"] not in wanted):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        owner = read_marker(entry)
        if owner is None or owner.get("kind") != match["kind"] or owner_alive(owner):
            continue
        target = parent / match["stem"]
        if match["kind"] == "old" and not (target.exists() or target.is_symlink()):
            try:
                os.rename(entry, target)
                (target / MARKER).unlink()
            except OSError:
                continue
        else:
            remove_owned(entry)
        swept.append(entry)
    return swept


def current_umask() -> int:
    """The process umask, read without changing it where the kernel says it (Linux >= 4.7): setting
    it to read it back would briefly affect files other threads create."""
    text = _read("/proc/self/status") or ""
    for line in text.splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(file: Path) -> None:
    """Give ``file`` the mode a plain ``open(..., "w")`` would have: safetensors writes through a
    temporary file created 0600 and renames it, whatever the user's umask."""
    os.chmod(file, 0o666 & ~current_umask())


# ---------------------------------------------------------------------------------------------------
# A full disk


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT: as an OSError, or inside the message of a library that wraps it (safetensors
    reports Rust I/O errors as ``... No space left on device (os error 28)``)."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return True
    text = str(exc)
    return any(f"(os error {code})" in text for code in _DISK_FULL)


def _size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def disk_full_line(target: Path, needed: int | None = None) -> str:
    """``no space left on device writing TARGET (needs about N, M free)``: measured after clean-up."""
    probe = Path(target)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{_size(shutil.disk_usage(probe).free)} free"
    except OSError:
        free = "free space unknown"
    need = f"needs about {_size(needed)}, " if needed else ""
    return f"no space left on device writing {target} ({need}{free})"
