"""Dataset paths given as URLs (``s3://``, ``gs://``, ``file://``, any fsspec protocol).

The readers only ever open local files. :func:`resolve_dataset_path` turns a URL into a local path:

* a plain path is returned unchanged, and ``file://`` URLs become the path they name (no fsspec needed);
* any other protocol is mirrored through fsspec into a local cache,
  ``<cache>/<protocol>/<bucket>/<key...>``. A folder URL mirrors every object under the prefix, a file URL
  that one object. An object is downloaded only when it is missing locally or when its size or version
  token (ETag, md5, generation, ...) differs from the one recorded at the last download, and the local
  copy was not touched since. Downloads go to a temporary name in the target folder and are renamed into
  place, so a crash never leaves a half-written file under the real name.

Processes that resolve the same bucket at once (DDP ranks, several jobs) serialise on a file lock in the
bucket's cache folder: the first downloads, the others then find everything up to date.

Credentials and endpoints come from the standard environment of each fsspec backend: for S3
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE`` and the shared credentials file) and
``AWS_ENDPOINT_URL`` for S3-compatible servers (MinIO, Ceph, moto); for GCS
``GOOGLE_APPLICATION_CREDENTIALS``. ``storage_options`` are passed to the fsspec filesystem as is.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import MissingDataError, RemoteAccessError, RemoteSupportError, UnsupportedURLError

log = logging.getLogger(__name__)

#: what to install for the optional remote support (the package extra)
REMOTE_EXTRA = "pip install 'datasets3d[remote]'"
#: extra packages some fsspec protocols need beyond the ``remote`` extra
_PROTOCOL_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
#: environment variables named in credential errors, per protocol
_CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an "
    "S3-compatible server",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or run gcloud auth "
    "application-default login)",
}
_LOCAL_PROTOCOLS = ("file", "local")
#: info keys that identify an object's version, in order of preference
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "crc32c", "checksum", "LastModified", "mtime", "created")

MANIFEST_NAME = ".nvp3d-manifest.json"
LOCK_NAME = ".nvp3d.lock"
CACHE_ENV = "NVP3D_CACHE"
OFFLINE_ENV = "NVP3D_OFFLINE"


def url_protocol(value: str | os.PathLike) -> str | None:
    """The protocol of ``value`` (``"s3"``, ``"file"``, ...) or None for a plain path.

    Only ``<scheme>://`` counts, with a scheme of two or more characters, so Windows drive letters
    (``C:\\data``) stay paths. Chained fsspec URLs (``simplecache::s3://...``) report their first protocol.
    """
    if isinstance(value, os.PathLike):
        return None
    text = str(value)
    head, sep, _ = text.partition("://")
    if not sep:
        return None
    head = head.split("::", 1)[0]
    if len(head) < 2 or not all(c.isalnum() or c in "+-." for c in head):
        return None
    return head.lower()


def is_remote(value: str | os.PathLike | None) -> bool:
    """True for a URL that needs fsspec (any protocol other than ``file://``)."""
    if value is None:
        return False
    protocol = url_protocol(value)
    return protocol is not None and protocol not in _LOCAL_PROTOCOLS


def default_cache_dir() -> Path:
    """``$NVP3D_CACHE``, else ``$XDG_CACHE_HOME/nvp3d/datasets``, else ``~/.cache/nvp3d/datasets``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "nvp3d" / "datasets"


def file_url_path(url: str) -> Path:
    """The local path of a ``file://`` URL (``file:///abs``, ``file://localhost/abs``, ``file://rel``)."""
    parts = urlsplit(url)
    if parts.netloc in ("", "localhost"):
        return Path(unquote(parts.path))
    # file://relative/path: no host part was meant, the netloc is the first folder
    return Path(unquote(parts.netloc + parts.path))


def resolve_dataset_path(
    url_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """A local path holding what ``url_or_path`` names, mirroring remote data into the cache first.

    Plain paths are returned unchanged (not even checked for existence: the readers report missing
    files); ``file://`` URLs become their path. Other URLs are mirrored as described in the module
    docstring and the local copy is returned; with ``$NVP3D_OFFLINE=1`` an existing local copy is
    returned without contacting the server.

    Raises (each with a one-line message): :class:`UnsupportedURLError` for an unknown protocol,
    :class:`RemoteSupportError` when fsspec or the protocol's backend is not installed,
    :class:`RemoteAccessError` for missing or refused credentials, :class:`MissingDataError` (a
    ``FileNotFoundError``) when nothing exists at the URL.
    """
    protocol = url_protocol(url_or_path)
    if protocol is None:
        return Path(url_or_path)
    url = str(url_or_path)
    if "::" in url.partition("://")[0]:
        raise UnsupportedURLError(
            f"{url}: chained fsspec URLs are not supported; give the plain URL (datasets3d caches it itself)"
        )
    if protocol in _LOCAL_PROTOCOLS:
        return file_url_path(url)
    fs = filesystem_for(url, protocol, storage_options)
    root_key = _strip(fs, url)
    parts = _safe_parts(root_key, url)
    if not parts:
        raise UnsupportedURLError(f"{url} names no bucket or path; give s3://<bucket>/<prefix>")
    bucket_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    bucket_dir = bucket_dir / _safe_component(protocol) / parts[0]
    local = bucket_dir.joinpath(*parts[1:])
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0") and local.exists():
        return local
    from filelock import FileLock

    bucket_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(bucket_dir / LOCK_NAME)):
        mirror = _Mirror(fs, url, bucket_dir)
        try:
            info = _call(url, protocol, fs.info, root_key)
            if info.get("type") == "directory":
                listing = _call(url, protocol, fs.find, root_key, withdirs=False, detail=True)
                if not listing:
                    raise MissingDataError(f"{url} does not exist: no objects under this prefix")
                for key, obj in sorted(listing.items()):
                    mirror.fetch(url, protocol, _strip(fs, key), obj)
            else:
                mirror.fetch(url, protocol, root_key, info)
        finally:
            mirror.save()
    if mirror.downloaded:
        log.info("%s: %d objects downloaded into %s", url, mirror.downloaded, local)
    return local


def filesystem_for(url: str, protocol: str, storage_options: Mapping[str, Any] | None = None):
    """The fsspec filesystem for ``protocol``; unknown protocols and missing packages give one-line errors."""
    try:
        import fsspec
    except ImportError as exc:
        raise RemoteSupportError(f"reading {url} needs fsspec, which is not installed: {REMOTE_EXTRA}") from exc
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ValueError as exc:
        known = ", ".join(sorted(p for p in fsspec.available_protocols() if len(p) > 1)[:40])
        raise UnsupportedURLError(f"{url}: unknown protocol {protocol!r} (fsspec knows: {known})") from exc
    except ImportError as exc:
        package = _PROTOCOL_PACKAGES.get(protocol, "s3fs" if protocol in ("s3", "s3a") else None)
        hint = REMOTE_EXTRA if package in (None, "s3fs") else f"pip install {package}"
        raise RemoteSupportError(
            f"reading {url} needs the fsspec backend for {protocol}:// ({package or 'see fsspec docs'}), "
            f"which is not installed: {hint}"
        ) from exc
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        _require_s3_credentials(url, options)
    # a fresh instance (and so a fresh listing and the current environment's credentials) every time:
    # a cached listing would hide objects changed since the last call
    options.setdefault("skip_instance_cache", True)
    fs = cls(**options)
    fs.invalidate_cache()
    return fs


def _require_s3_credentials(url: str, options: Mapping[str, Any]) -> None:
    """Fail early when no AWS credentials are configured anywhere.

    s3fs would otherwise fall back to anonymous requests, which a private bucket answers with an
    access-denied error that does not say what is missing. Public buckets: ``storage_options={"anon": True}``.
    """
    if options.get("anon") or options.get("key") or options.get("profile") or options.get("session"):
        return
    try:
        import botocore.session
    except ImportError as exc:
        raise RemoteSupportError(f"reading {url} needs s3fs (and botocore), not installed: {REMOTE_EXTRA}") from exc
    try:
        credentials = botocore.session.get_session().get_credentials()
    except Exception as exc:  # e.g. ProfileNotFound for an AWS_PROFILE that is not configured
        raise RemoteAccessError(_credential_message(url, "s3", exc)) from exc
    if credentials is None:
        raise RemoteAccessError(
            f"no credentials for {url}: {_CREDENTIAL_HINTS['s3']} (none of these nor a shared credentials "
            "file or instance role was found); for a public bucket pass storage_options={'anon': True}"
        )


def _strip(fs, path: str) -> str:
    return str(fs._strip_protocol(path)).strip("/")


def _safe_component(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def _safe_parts(key: str, url: str) -> tuple[str, ...]:
    """Path components of an object key; refuses keys that would escape the cache folder."""
    parts = tuple(p for p in PurePosixPath(key).parts if p not in ("", "/", "."))
    if ".." in parts:
        raise UnsupportedURLError(f"{url}: object key {key!r} would leave the cache folder ('..' part)")
    return parts


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _call(url: str, protocol: str, fn, *args, **kwargs):
    """Run one fsspec call, turning missing objects and credential problems into one-line errors."""
    try:
        return fn(*args, **kwargs)
    except FileNotFoundError as exc:
        raise MissingDataError(f"{url} does not exist (no object or prefix {args[0]!r} on the server)") from exc
    except PermissionError as exc:
        raise RemoteAccessError(_credential_message(url, protocol, exc)) from exc
    except Exception as exc:
        if "Credentials" in type(exc).__name__ or "credentials" in str(exc).lower():
            raise RemoteAccessError(_credential_message(url, protocol, exc)) from exc
        raise


def _credential_message(url: str, protocol: str, exc: BaseException) -> str:
    hint = _CREDENTIAL_HINTS.get("s3" if protocol in ("s3", "s3a") else "gs" if protocol in ("gs", "gcs") else "")
    hint = hint or f"check the credentials of the {protocol}:// backend in the environment"
    return f"access to {url} failed: no usable credentials or access denied ({_one_line(exc)}); {hint}"


def version_token(info: Mapping[str, Any]) -> str:
    """The object's version identifier from an fsspec info dict ('' when the backend gives none)."""
    for key in _VERSION_KEYS:
        if info.get(key) not in (None, ""):
            return str(info[key]).strip('"')
    return ""


class _Mirror:
    """Downloads of one resolve call plus the bucket's manifest (``key -> size, version, local mtime``)."""

    def __init__(self, fs, url: str, bucket_dir: Path) -> None:
        self.fs = fs
        self.bucket_dir = bucket_dir
        self.path = bucket_dir / MANIFEST_NAME
        self.entries: dict[str, dict] = {}
        self.dirty = False
        self.downloaded = 0
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.entries = {}  # an unreadable manifest only costs a re-download

    def fetch(self, url: str, protocol: str, key: str, info: Mapping[str, Any]) -> Path:
        """Make the local copy of object ``key`` current; returns its path."""
        parts = _safe_parts(key, url)
        rel = "/".join(parts[1:])
        local = self.bucket_dir.joinpath(*parts[1:])
        size = int(info.get("size") or 0)
        token = version_token(info)
        known = self.entries.get(rel)
        if known and local.is_file():
            st = local.stat()
            if (known.get("size") == size == st.st_size and known.get("version") == token
                    and known.get("mtime_ns") == st.st_mtime_ns):
                return local
        local.parent.mkdir(parents=True, exist_ok=True)
        # created with mode 0666 minus the umask (mkstemp would give 0600), under a unique hidden name
        tmp = str(local.parent / f".{local.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        log.info("downloading %s://%s (%d bytes)", protocol, key, size)
        try:
            _call(f"{protocol}://{key}", protocol, self.fs.get_file, key, tmp)
            got = os.path.getsize(tmp)
            if got != size:
                raise MissingDataError(
                    f"download of {protocol}://{key} is incomplete: {got} of {size} bytes; run again"
                )
            os.replace(tmp, local)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.entries[rel] = {"size": size, "version": token, "mtime_ns": local.stat().st_mtime_ns}
        self.dirty = True
        self.downloaded += 1
        return local

    def save(self) -> None:
        """Write the manifest atomically (also after a failed run, so finished downloads are kept)."""
        if not self.dirty:
            return
        fd, tmp = tempfile.mkstemp(dir=self.bucket_dir, prefix=f"{MANIFEST_NAME}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.entries, fh, indent=0, sort_keys=True)
        os.replace(tmp, self.path)
        self.dirty = False
