"""Scene folders shipped as tar archives under ``<base_dir>/data/`` (the toolkit's ``data/images.tar.gz``).

:func:`prepare_scene_folders` extracts the archives of a dataset root once, when scene folders of a split
are missing, so that the readers find ``data/<scene_id>/...`` as usual. Extraction is safe to run from
many processes at once (DDP ranks, DataLoader workers, several jobs) and never exposes partial data:

1. a file lock next to the archive serialises the extracting processes; the ones that wait then see the
   marker of the finished extraction and do nothing;
2. every member is checked before anything is written: no absolute path, no ``..``, no link that
   points outside the target, no device or fifo. Such an archive is refused with one line naming the
   member;
3. the archive is extracted into a hidden temporary folder next to the target, the number of extracted
   files is compared with the archive's listing, and only then is each top-level entry renamed into
   place (an older copy is moved aside first and deleted after);
4. a marker ``data/.<archive>.extracted.json`` records the archive's size and mtime, so a changed
   archive (for example a re-downloaded one) is extracted again.

Archive members are paths relative to ``data/`` (``<scene_id>/rgb_0000.png``); archives whose members
all start with ``data/`` are accepted too and the prefix is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import DatasetFormatError, MissingDataError, UnsafeArchiveError

log = logging.getLogger(__name__)

#: archive names looked for in ``<root>/data``, the toolkit's name first
ARCHIVE_PATTERNS = ("images.tar.gz", "*.tar.gz", "*.tgz", "*.tar")


def find_archives(data_dir: Path) -> list[Path]:
    """Archives in ``data_dir`` (not recursive), ``images.tar.gz`` first, each once."""
    found: list[Path] = []
    if not data_dir.is_dir():
        return found
    for pattern in ARCHIVE_PATTERNS:
        for p in sorted(data_dir.glob(pattern)):
            if p.is_file() and not p.name.startswith(".") and p not in found:
                found.append(p)
    return found


def marker_path(archive: Path) -> Path:
    return archive.with_name(f".{archive.name}.extracted.json")


def archive_signature(archive: Path) -> dict[str, int]:
    st = archive.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_marker(archive: Path) -> dict | None:
    """The marker of the last complete extraction of ``archive``, or None."""
    try:
        data = json.loads(marker_path(archive).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_extracted(archive: Path) -> bool:
    """True when the marker matches the archive as it is now and every entry it lists is present."""
    marker = read_marker(archive)
    if marker is None or marker.get("archive") != archive_signature(archive):
        return False
    return all((archive.parent / name).exists() for name in marker.get("entries", []))


def prepare_scene_folders(root: Path, scene_ids: Iterable[str]) -> list[Path]:
    """Make ``<root>/data/<scene_id>`` available for every listed scene that an archive provides.

    Archives are extracted when some of the split's scene folders are missing (and they were not
    extracted yet), or when an archive changed since its recorded extraction. Folders that exist and no
    archive marker claims are left alone (data extracted by hand). Returns the archives extracted now.

    Raises :class:`MissingDataError` when none of the split's scene folders exists and there is no archive
    to extract them from (the message names both places looked at), :class:`UnsafeArchiveError` for an
    archive with a member outside the target, :class:`DatasetFormatError` for a corrupt archive.
    """
    data = Path(root) / "data"
    scenes = sorted(set(scene_ids))
    missing = [s for s in scenes if not (data / s).is_dir()]
    archives = find_archives(data)
    todo = [a for a in archives if (missing or read_marker(a) is not None) and not is_extracted(a)]
    if not todo:
        if missing and len(missing) == len(scenes) and not archives:
            more = f" (and {len(missing) - 1} more scenes)" if len(missing) > 1 else ""
            raise MissingDataError(
                f"no scene folder {data / missing[0]}{more} and no archive to extract it from "
                f"({data}/images.tar.gz, *.tar.gz, *.tgz or *.tar)"
            )
        return []
    done = []
    for archive in todo:
        if extract_archive(archive, data):
            done.append(archive)
    return done


def extract_archive(archive: Path, dest: Path) -> bool:
    """Extract ``archive`` into ``dest`` once (locked, verified, atomic per top-level entry).

    Returns False when another process (or an earlier run) already extracted this version of it.
    """
    try:
        return _extract_locked(archive, dest)
    except PermissionError as exc:
        raise MissingDataError(
            f"cannot extract {archive} into {dest} ({' '.join(str(exc).split())}); make the folder writable "
            "or extract the archive there by hand"
        ) from exc


def _extract_locked(archive: Path, dest: Path) -> bool:
    from filelock import FileLock

    dest.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest / f".{archive.name}.lock")):
        if is_extracted(archive):
            return False
        signature = archive_signature(archive)
        marker = marker_path(archive)
        marker.unlink(missing_ok=True)  # a crash below must not leave a marker that claims success
        log.info("extracting %s into %s", archive, dest)
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{archive.name}.", suffix=".extracting"))
        try:
            expected = _extract_checked(archive, tmp)
            found = _count_files(tmp)
            if found != expected:
                raise DatasetFormatError(
                    f"{archive}: {found} files were extracted but the archive lists {expected}; the archive "
                    "is corrupt or the disk is full"
                )
            entries = sorted(os.listdir(tmp))
            for name in entries:
                _move_into_place(tmp / name, dest / name)
            record = {"archive": signature, "entries": entries, "files": expected}
            fd, part = tempfile.mkstemp(dir=dest, prefix=f"{marker.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh, indent=1)
            os.replace(part, marker)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def _extract_checked(archive: Path, target: Path) -> int:
    """Check every member, then extract into ``target``; returns the number of non-folder entries."""
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            strip = bool(members) and all(_parts(m.name)[:1] == ("data",) for m in members)
            names: set[str] = set()
            for m in members:
                parts = _parts(m.name)[1 if strip else 0:]
                _check_member(archive, m, parts, strip)
                m.name = "/".join(parts) if parts else "."
                if not m.isdir():
                    names.add(m.name)
            keep = [m for m in members if m.name != "."]
            tf.extractall(target, members=keep, filter="data")
    except (UnsafeArchiveError, PermissionError):
        raise
    except tarfile.FilterError as exc:  # the stdlib filter caught something the checks above did not
        raise UnsafeArchiveError(f"refusing to extract {archive}: {exc}") from exc
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise DatasetFormatError(f"{archive} cannot be extracted ({' '.join(str(exc).split())}); the archive is corrupt") from exc
    return len(names)


def _parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _check_member(archive: Path, m: tarfile.TarInfo, parts: tuple[str, ...], strip: bool) -> None:
    """Refuse members that would be written, or point, outside the extraction folder."""
    def refuse(why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"refusing to extract {archive}: member {m.name!r} {why}")

    name = m.name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise refuse("has an absolute path or a '..' part (it would land outside the target folder)")
    if m.ischr() or m.isblk() or m.isfifo():
        raise refuse("is a device or fifo")
    if m.issym() or m.islnk():
        link = m.linkname.replace("\\", "/")
        if link.startswith("/") or (len(link) > 1 and link[1] == ":"):
            raise refuse(f"is a link to the absolute path {m.linkname!r}")
        # symlinks resolve against the member's folder, hard links against the archive root
        base = list(parts[:-1]) if m.issym() else []
        link_parts = _parts(link)
        if m.islnk() and strip:
            link_parts = link_parts[1:] if link_parts[:1] == ("data",) else link_parts
        depth = len(base)
        for p in link_parts:
            depth = depth - 1 if p == ".." else depth + 1
            if depth < 0:
                raise refuse(f"is a link to {m.linkname!r}, outside the target folder")
        if m.islnk():
            m.linkname = "/".join(link_parts)


def _count_files(folder: Path) -> int:
    """Non-folder entries under ``folder`` (links count as entries; linked folders are not followed)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        total += len(filenames)
        total += sum(1 for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
    return total


def _move_into_place(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and removed afterwards."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
