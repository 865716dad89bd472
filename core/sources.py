"""Downloads into the inbox: ``python -m training enqueue URL`` and the Tavern's "post a quest by URL".

Sources (:data:`SCHEMES`):

- ``https://`` / ``http://`` -- streamed with the standard library (``urllib``), redirects followed to
  http(s) only, ``Accept-Encoding: identity``; the file name comes from ``Content-Disposition`` when the
  server sends one, else from the last segment of the URL path.
- ``hf://datasets/OWNER/NAME[@REVISION]/PATH/FILE`` -- one file of a Hugging Face Hub dataset through
  ``huggingface_hub.hf_hub_download`` (its cache; with ``HF_HUB_OFFLINE=1``, or without network, the cached
  copy is used, and a file not in the cache is a clear error).
- ``s3://BUCKET/KEY`` / ``gs://BUCKET/KEY`` -- through fsspec when its backend (``s3fs`` / ``gcsfs``, the
  ``cloud`` extra) is installed; otherwise a clear error naming the package.

Whatever the source, the bytes go to a hidden ``inbox/<priority>/.fetch-<random>.part`` file (a name the
ingest ignores: :func:`core.ingest.is_temporary_name`), are fsync'ed, and only then appear under their final
name (:func:`publish_new`: a hard link that never overwrites; ``data.jsonl`` taken makes ``data-2.jsonl``).
A failed, cut or over-sized download removes its ``.part`` file: the inbox never holds part of a file.
At most ``sources.max_download_bytes`` bytes are accepted (an announced larger size is refused before any
byte is written). Each download is a ``downloads`` row of the ledger (URL, progress, SHA-256 of the bytes,
final path or error); when the daemon admits the file, :meth:`core.ledger.Ledger.link_download` copies the
URL and SHA-256 onto the quest (``source_url``, ``source_sha256``).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

from core.config import SourcesConfig
from core.ingest import is_temporary_name
from core.ledger import DownloadState, Ledger
from core.realm import PRIORITIES

SCHEMES = ("https", "http", "hf", "s3", "gs")
FSSPEC_BACKENDS = {"s3": "s3fs", "gs": "gcsfs"}
"""fsspec protocol -> the package that implements it (installed by ``pip install 'realm-of-training[cloud]'``)."""
CHUNK_BYTES = 1 << 20
PROGRESS_INTERVAL_SECONDS = 0.5  # ledger progress updates at most this often
MAX_NAME_BYTES = 200
PART_PREFIX = ".fetch-"
USER_AGENT = "realm-of-training (enqueue)"
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")

Progress = Callable[[int, "int | None"], None]
"""``progress(bytes_done, bytes_total or None)``, called after every chunk."""


class SourceError(ValueError):
    """A download that cannot be done, in one sentence. ``reason``: ``unsupported`` (scheme or address),
    ``not_found`` (no such file), ``too_large``, ``interrupted`` (cut, or stopped), ``failed`` (other)."""

    def __init__(self, message: str, reason: str = "failed"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Downloaded:
    """A file published into the inbox: ``path`` (absolute), ``name``, ``url``, ``sha256`` (hex of its
    bytes), ``size_bytes``, ``priority`` and the ledger's ``download_id`` (None without a ledger)."""

    path: Path
    name: str
    url: str
    sha256: str
    size_bytes: int
    priority: str
    download_id: int | None = None


def is_url(text: str) -> bool:
    """True when ``text`` starts with ``scheme://`` (what ``enqueue`` treats as a URL, not a file path)."""
    return bool(_URL_RE.match(text.strip()))


def check_url(url: str) -> str:
    """The scheme of ``url`` if it is one of :data:`SCHEMES` with something after it; raises
    :class:`SourceError` (reason ``unsupported``) naming the accepted schemes otherwise."""
    url = url.strip()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        raise SourceError("file:// addresses are not downloaded: copy a local file with "
                          "`python -m training enqueue PATH`", "unsupported")
    if scheme not in SCHEMES or not is_url(url):
        raise SourceError(f"{url[:200]!r} is not a supported address: use https://, http://, "
                          "hf://datasets/OWNER/NAME/PATH, s3:// or gs://", "unsupported")
    if scheme in ("http", "https") and not parts.hostname:
        raise SourceError(f"{url[:200]!r} has no host name", "unsupported")
    if scheme != "hf" and not parts.netloc:
        raise SourceError(f"{url[:200]!r} names no bucket or host", "unsupported")
    return scheme


# file names -------------------------------------------------------------------------------------------
def split_suffix(name: str) -> tuple[str, str]:
    """``("data", ".jsonl.gz")`` for ``data.jsonl.gz``: the last suffix, two when the last is compression."""
    suffixes = Path(name).suffixes
    keep = 2 if suffixes and suffixes[-1].lower() in _COMPRESSION_SUFFIXES else 1
    suffix = "".join(suffixes[-keep:]) if suffixes else ""
    if len(suffix) > 20 or not name[: len(name) - len(suffix)]:
        return name, ""
    return name[: len(name) - len(suffix)], suffix


def safe_file_name(raw: str | None) -> str | None:
    """A plain, visible file name made from ``raw`` (a URL path segment or a Content-Disposition filename),
    or None when nothing usable is left: folders and control characters removed, no leading ``.``, at most
    :data:`MAX_NAME_BYTES` UTF-8 bytes (the suffix kept), and never a temporary name the ingest ignores."""
    if not raw:
        return None
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable() and ch not in '<>:"|?*').strip().lstrip(".").strip()
    if not name:
        return None
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        stem, suffix = split_suffix(name)
        budget = MAX_NAME_BYTES - len(suffix.encode("utf-8"))
        name = stem.encode("utf-8")[:budget].decode("utf-8", "ignore") + suffix
    if is_temporary_name(name):
        name += ".download"
    return name


def publish_new(tmp: Path, folder: Path, name: str) -> Path:
    """Give the complete file ``tmp`` its final ``name`` in ``folder`` without overwriting anything:
    ``name``, else ``stem-2.ext``, ``stem-3.ext``... (``os.link`` fails on an existing target; on
    filesystems without hard links, check then rename). Removes ``tmp``; returns the final path.
    Raises ``FileExistsError`` after 10,000 taken names."""
    stem, suffix = split_suffix(name)
    for n in range(1, 10_000):
        candidate = folder / (name if n == 1 else f"{stem}-{n}{suffix}")
        try:
            os.link(tmp, candidate)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if candidate.exists():
                continue
            os.rename(tmp, candidate)
            return candidate
        tmp.unlink()
        return candidate
    raise FileExistsError(f"too many files named like {name!r} in {folder}")


# the copy loop ----------------------------------------------------------------------------------------
class _Sink:
    """Writes chunks into the ``.part`` file, hashing and counting them against the size limit."""

    def __init__(self, out: IO[bytes], url: str, limit: int, total: int | None, progress: Progress,
                 should_stop: Callable[[], bool]):
        self.out, self.url, self.limit, self.total = out, url, limit, total
        self.progress, self.should_stop = progress, should_stop
        self.hasher = hashlib.sha256()
        self.done = 0

    def copy(self, read: Callable[[int], bytes]) -> None:
        while True:
            if self.should_stop():
                raise SourceError(f"download of {self.url} stopped after {self.done:,} bytes", "interrupted")
            chunk = read(CHUNK_BYTES)
            if not chunk:
                break
            self.done += len(chunk)
            if self.done > self.limit:
                raise SourceError(f"{self.url} is larger than the limit of {self.limit:,} bytes "
                                  "(sources.max_download_bytes): download stopped", "too_large")
            self.hasher.update(chunk)
            self.out.write(chunk)
            self.progress(self.done, self.total)
        if self.total is not None and self.done != self.total:
            raise SourceError(f"the connection to {self.url} ended after {self.done:,} of {self.total:,} bytes: "
                              "nothing was kept, try again", "interrupted")


def _check_size(url: str, size: int | None, limit: int) -> None:
    if size is not None and size > limit:
        raise SourceError(f"{url} is {size:,} bytes, over the limit of {limit:,} bytes "
                          "(sources.max_download_bytes): nothing was downloaded", "too_large")


# sources ----------------------------------------------------------------------------------------------
class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise SourceError(f"{req.full_url} redirects to {newurl[:200]!r}, which is not http(s)", "unsupported")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_http(url: str, open_part: Callable[[int | None], _Sink], config: SourcesConfig) -> str | None:
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    host = urlsplit(url).hostname
    try:
        with opener.open(request, timeout=config.timeout_seconds) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.strip().isdigit() else None
            _check_size(url, total, config.max_download_bytes)
            sink = open_part(total)
            sink.copy(resp.read)
            return resp.headers.get_filename()
    except urllib.error.HTTPError as exc:
        exc.close()  # its response's socket
        if 300 <= exc.code < 400:  # urllib refuses redirects to file:// itself, with this status
            raise SourceError(f"{url} redirects to an address that is not http(s) ({exc.reason}): nothing was "
                              "downloaded", "unsupported") from None
        reason = "not_found" if exc.code in (404, 410) else "failed"
        raise SourceError(f"{url} answered HTTP {exc.code} {exc.reason}: nothing was downloaded", reason) from None
    except urllib.error.URLError as exc:
        raise SourceError(f"cannot reach {host}: {exc.reason}", "failed") from None
    except (HTTPException, ConnectionError, TimeoutError) as exc:
        raise SourceError(f"the connection to {host} broke during the download ({type(exc).__name__}: "
                          f"{exc}): nothing was kept, try again", "interrupted") from None


def parse_hf_url(url: str) -> tuple[str, str, str | None]:
    """``hf://datasets/OWNER/NAME[@REVISION]/PATH`` -> ``(repo_id, filename, revision)``. Raises
    :class:`SourceError` for anything else (only dataset files are accepted)."""
    rest = url.strip()[len("hf://"):]
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 4 or parts[0] != "datasets":
        raise SourceError(f"{url!r}: use hf://datasets/OWNER/NAME/PATH/FILE (a file of a Hugging Face dataset "
                          "repository; add @REVISION after NAME for a branch, tag or commit)", "unsupported")
    name, _, revision = parts[2].partition("@")
    return f"{parts[1]}/{name}", "/".join(parts[3:]), unquote(revision) or None


def _fetch_hf(url: str, open_part: Callable[[int | None], _Sink], config: SourcesConfig) -> str | None:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, filename, revision = parse_hf_url(url)
    try:
        cached = Path(hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise SourceError(f"{url}: {why} and the file is not in the local Hugging Face cache "
                          f"({constants.HF_HUB_CACHE})", "not_found") from None
    except GatedRepoError:
        raise SourceError(f"{url}: the dataset {repo_id} is gated: accept its terms on huggingface.co and log in "
                          "(`hf auth login`)", "failed") from None
    except RepositoryNotFoundError:
        raise SourceError(f"{url}: no dataset {repo_id} on the Hub (or it is private: log in with "
                          "`hf auth login`)", "not_found") from None
    except RevisionNotFoundError:
        raise SourceError(f"{url}: the dataset {repo_id} has no revision {revision!r}", "not_found") from None
    except EntryNotFoundError:
        raise SourceError(f"{url}: the dataset {repo_id} has no file {filename!r}", "not_found") from None
    except OSError as exc:  # network errors are requests/httpx errors, which subclass OSError
        raise SourceError(f"{url}: download from the Hub failed ({type(exc).__name__}: {exc})", "failed") from None
    size = cached.stat().st_size
    _check_size(url, size, config.max_download_bytes)
    with open(cached, "rb") as f:
        open_part(size).copy(f.read)
    return None


def _fetch_fsspec(url: str, open_part: Callable[[int | None], _Sink], config: SourcesConfig) -> str | None:
    import fsspec

    protocol = urlsplit(url).scheme.lower()
    package = FSSPEC_BACKENDS.get(protocol)
    if package and importlib.util.find_spec(package) is None:
        raise SourceError(f"{protocol}:// addresses need the {package} package: pip install "
                          f"'realm-of-training[cloud]' (or pip install {package})", "unsupported")
    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
        if info.get("type") == "directory":
            raise SourceError(f"{url} is a folder: name one file", "unsupported")
        size = info.get("size")
        _check_size(url, size, config.max_download_bytes)
        with fs.open(path, "rb") as f:
            open_part(size).copy(f.read)
    except FileNotFoundError:
        raise SourceError(f"{url}: no such file", "not_found") from None
    except PermissionError as exc:
        raise SourceError(f"{url}: access denied ({exc}); check the credentials of {package or protocol}",
                          "failed") from None
    except SourceError:
        raise
    except Exception as exc:  # backends raise their own types (botocore, google.auth...)
        raise SourceError(f"{url}: download failed ({type(exc).__name__}: {exc})", "failed") from None
    return None


_FETCHERS = {"http": _fetch_http, "https": _fetch_http, "hf": _fetch_hf, "s3": _fetch_fsspec, "gs": _fetch_fsspec}


def fetch_into_inbox(url: str, inbox: Path, priority: str = "normal", *, config: SourcesConfig,
                     ledger: Ledger | None = None, progress: Progress | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     on_start: Callable[[int], None] | None = None) -> Downloaded:
    """Download ``url`` into ``inbox/<priority>/`` atomically (see the module doc) and return what was
    published. With a ``ledger`` the download is a ``downloads`` row (progress every
    :data:`PROGRESS_INTERVAL_SECONDS`) and ends with a ``source_downloaded`` or ``source_failed`` event.
    ``should_stop()`` is checked between chunks; ``on_start(download_id)`` is called once the ledger row
    exists (before any network access). Raises :class:`SourceError` (one sentence, nothing left
    in the inbox) for an unsupported address, an HTTP error, a cut connection, a size over
    ``config.max_download_bytes`` or a missing file; ``ValueError`` for an unknown priority."""
    url = url.strip()
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    fetch = _FETCHERS[check_url(url)]
    folder = inbox / priority
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{PART_PREFIX}{uuid.uuid4().hex}.part"
    download_id = ledger.start_download(url, priority, str(part), os.getpid()) if ledger is not None else None
    if on_start is not None and download_id is not None:
        on_start(download_id)
    last_update = [0.0]

    def report(done: int, total: int | None) -> None:
        if progress is not None:
            progress(done, total)
        now = time.monotonic()
        if download_id is not None and now - last_update[0] >= PROGRESS_INTERVAL_SECONDS:
            last_update[0] = now
            ledger.download_progress(download_id, done, total)

    sink: _Sink | None = None
    try:
        with open(part, "xb") as out:
            def open_part(total: int | None) -> _Sink:
                nonlocal sink
                sink = _Sink(out, url, config.max_download_bytes, total, report, should_stop or (lambda: False))
                return sink

            disposition = fetch(url, open_part, config)
            if sink is None:
                raise SourceError(f"{url}: nothing was downloaded")
            out.flush()
            os.fsync(out.fileno())
        name = (safe_file_name(disposition) or safe_file_name(unquote(urlsplit(url).path))
                or safe_file_name(urlsplit(url).hostname) or "download")
        final = publish_new(part, folder, name)
    except BaseException as exc:
        part.unlink(missing_ok=True)
        if download_id is not None:
            error = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
            ledger.fail_download(download_id, error)
            ledger.event("source_failed", f"download of {url} failed: {error}", level="error", url=url,
                         download_id=download_id)
        if isinstance(exc, OSError):
            raise SourceError(f"cannot write into {folder}: {exc.strerror or exc}") from exc
        raise
    result = Downloaded(path=final, name=final.name, url=url, sha256=sink.hasher.hexdigest(), size_bytes=sink.done,
                        priority=priority, download_id=download_id)
    if download_id is not None:
        ledger.finish_download(download_id, path=str(final), name=final.name, sha256=result.sha256,
                               size_bytes=result.size_bytes)
        ledger.event("source_downloaded", f"{final.name} downloaded into the inbox ({priority}, "
                     f"{result.size_bytes:,} bytes) from {url}", url=url, sha256=result.sha256,
                     size_bytes=result.size_bytes, path=str(final), download_id=download_id)
    return result


def clean_stale_downloads(ledger: Ledger, alive: Callable[[int], bool]) -> int:
    """Downloads left ``downloading`` by a process that is gone (``alive(pid)`` false): their ``.part``
    file is removed and the row failed as interrupted. Returns how many were cleaned."""
    cleaned = 0
    for row in ledger.list_downloads(limit=1000, state=DownloadState.DOWNLOADING):
        if row["pid"] and alive(int(row["pid"])):
            continue
        part = Path(row["part_path"]) if row["part_path"] else None
        if part is not None and part.name.startswith(PART_PREFIX) and part.name.endswith(".part"):
            part.unlink(missing_ok=True)
        ledger.fail_download(row["id"], "interrupted: the downloading process ended before the download did")
        cleaned += 1
    return cleaned
