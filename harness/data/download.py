"""Parallel, resumable, validated file downloads over HTTP(S), with the standard library only.

Each file is fetched into `<dest>.tmp`; a cut connection leaves the partial file there and the
next attempt asks for the rest with an HTTP `Range` header (a server that ignores it and answers
200 is simply read from the start). Connection errors, cut connections and 5xx answers are retried
with exponential back-off; a 404 is not. A file is validated before it is renamed into place, so
`dest` only ever exists complete: a corrupt download is deleted and fetched again, an existing
valid file is never requested, an existing corrupt one is replaced.

Processes share the cache: each file is fetched under an exclusive lock on `<dest>.lock`, so a
second process waits for the first and then finds the file complete instead of appending to the
same `.tmp`. A `token` is sent as `Authorization: Bearer` to the server asked, never to the
address it redirects to (a CDN's signed URL refuses a second credential). `offline` uses the
files present and requests nothing.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence
from urllib.error import HTTPError
from urllib.request import Request, urlopen

CHUNK_BYTES = 1 << 20
USER_AGENT = "autoresearch-harness (python urllib)"
RETRIED_STATUS = frozenset({408, 425, 429})  # besides every 5xx

OFFLINE_HINT = "To work offline, use `--data builtin` or `--data local:PATH` (a folder of parquet, jsonl or txt files)."
NETWORK_HINT = (
    "Check your network connection. Where huggingface.co is blocked or slow, set HF_ENDPOINT to a "
    "mirror (for example HF_ENDPOINT=https://hf-mirror.com). " + OFFLINE_HINT
)
MISSING_HINT = (
    "The server has no file at this address: check the data source, and if HF_ENDPOINT is set, "
    "that the mirror holds this dataset. " + OFFLINE_HINT
)
INVALID_HINT = (
    "The server sent something that is not the expected file (a proxy or mirror may answer with an "
    "error page). Check HF_ENDPOINT and your network. " + OFFLINE_HINT
)
AUTH_HINT = (
    "The server refused access: for a gated or private dataset, set HF_TOKEN to a token that may "
    "read it (or log in with `hf auth login`). " + OFFLINE_HINT
)
OFFLINE_MODE_HINT = (
    "HF_HUB_OFFLINE is set, so nothing is downloaded: unset it to fetch the missing file(s). " + OFFLINE_HINT
)


class DownloadError(RuntimeError):
    """A file could not be fetched. The message names the URL, the cause and what to do."""

    def __init__(self, url: str, reason: str, hint: str = NETWORK_HINT) -> None:
        self.url = url
        self.reason = reason
        self.hint = hint
        self.message = f"could not download {url}: {reason}"  # without the hint, for the CLI
        super().__init__(f"{self.message}\n{hint}")


class InvalidFile(ValueError):
    """A file on disk is not what it should be (unreadable, empty, wrong columns)."""


def validate_parquet(path: Path, column: str | None = "text") -> int:
    """Check that the parquet footer reads, the file has rows and (if given) the column;
    returns the row count, raises `InvalidFile` otherwise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidFile(f"{path} is not a readable parquet file ({exc})") from exc
    if metadata.num_rows <= 0:
        raise InvalidFile(f"{path} holds no rows")
    names = metadata.schema.to_arrow_schema().names
    if column is not None and column not in names:
        raise InvalidFile(f"{path} has no {column!r} column (it has: {', '.join(names) or 'none'})")
    return metadata.num_rows


Validator = Callable[[Path], object]


class DownloadJob(NamedTuple):
    url: str
    dest: Path
    validate: Validator | None = validate_parquet  # raises on an invalid file


if os.name == "nt":
    import msvcrt

    def _try_lock(handle: Any) -> bool:
        try:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _wait_lock(handle: Any) -> None:
        while not _try_lock(handle):
            time.sleep(0.2)

    def _unlock(handle: Any) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(handle: Any) -> bool:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _wait_lock(handle: Any) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)

    def _unlock(handle: Any) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` across processes (released when the process dies);
    `on_wait` is called once when another holder makes this one wait. The lock file stays:
    deleting it would let a third process lock a new file while the second holds the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if not _try_lock(handle):
            if on_wait is not None:
                on_wait()
            _wait_lock(handle)
        try:
            yield
        finally:
            _unlock(handle)


def _request(url: str, headers: dict[str, str], token: str | None) -> Request:
    try:
        request = Request(url, headers=headers)
    except ValueError as exc:  # e.g. HF_ENDPOINT without http(s)://
        raise DownloadError(url, f"not a valid URL ({exc})", NETWORK_HINT) from exc
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    return request


def _http_hint(code: int) -> str:
    if code in (401, 403):
        return AUTH_HINT
    return MISSING_HINT if code in (404, 410) else NETWORK_HINT


def fetch_json(url: str, token: str | None = None, retries: int = 5, backoff: float = 1.0,
               timeout: float = 30.0) -> Any:
    """GET a JSON document, retried as downloads are; DownloadError when it cannot be had."""
    last = "no attempt was made"
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with _network(lambda: urlopen(_request(url, {"User-Agent": USER_AGENT}, token), timeout=timeout)) as answer:
                body = _network(answer.read)
        except HTTPError as exc:
            exc.close()
            if exc.code >= 500 or exc.code in RETRIED_STATUS:
                last = f"HTTP {exc.code} {exc.reason}"
                continue
            raise DownloadError(url, f"HTTP {exc.code} {exc.reason}", _http_hint(exc.code)) from exc
        except _Retry as exc:
            last = str(exc)
            continue
        try:
            return json.loads(body)
        except ValueError as exc:
            raise DownloadError(url, f"the answer is not JSON ({exc})", INVALID_HINT) from exc
    raise DownloadError(url, f"{last} (gave up after {retries} attempts)", NETWORK_HINT)


class _Retry(Exception):
    """This attempt failed in a way a later attempt may not (the message says how)."""


class _Cancelled(Exception):
    """Another file failed for good; stop early and keep what was fetched for a later resume."""


class _Tracker:
    """Rich progress bars on stderr: one per file in flight and one for the total bytes. The
    total is extrapolated from the sizes seen so far until every file's size is known."""

    def __init__(self, enabled: bool, count: int) -> None:
        self._lock = threading.Lock()
        self._count = count
        self._sizes: dict[int, int] = {}
        self._done: dict[int, int] = {}
        self._finished = 0
        self._tasks: dict[int, int] = {}
        self._bar = None
        if enabled and count:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))
            self._total = self._bar.add_task(self._total_label(), total=None)

    def __enter__(self) -> "_Tracker":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _total_label(self) -> str:
        return f"total ({self._finished}/{self._count} files)"

    def _refresh_total(self) -> None:
        if self._bar is None:
            return
        total = None
        if self._sizes:
            known = sum(self._sizes.values())
            total = known + known // len(self._sizes) * (self._count - len(self._sizes))
        self._bar.update(self._total, total=total, completed=sum(self._done.values()),
                         description=self._total_label())

    def start(self, key: int, name: str) -> None:
        with self._lock:
            if self._bar is None:
                return
            if key in self._tasks:  # e.g. it waited for another process, and now downloads
                self._bar.update(self._tasks[key], description=name)
            else:
                self._tasks[key] = self._bar.add_task(name, total=None)

    def size(self, key: int, size: int | None) -> None:
        with self._lock:
            if size is not None:
                self._sizes[key] = size
            if key in self._tasks:
                self._bar.update(self._tasks[key], total=size)
            self._refresh_total()

    def advance(self, key: int, done: int) -> None:
        with self._lock:
            self._done[key] = done
            if key in self._tasks:
                self._bar.update(self._tasks[key], completed=done)
            self._refresh_total()

    def finish(self, key: int, size: int) -> None:
        with self._lock:
            self._sizes[key] = self._done[key] = size
            self._finished += 1
            if key in self._tasks:
                self._bar.remove_task(self._tasks.pop(key))
            self._refresh_total()


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _network(call: Callable[[], object]) -> object:
    """Run a network call; a connection-level failure becomes a retryable error."""
    try:
        return call()
    except HTTPError:
        raise
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise _Retry(f"connection failed ({type(reason).__name__}: {reason})") from exc


def _fetch(url: str, tmp: Path, timeout: float, key: int, tracker: _Tracker, stop: threading.Event,
           token: str | None) -> None:
    """One attempt: fetch `url` into `tmp`, resuming from what `tmp` already holds."""
    offset = tmp.stat().st_size if tmp.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"  # kept on a redirect: the CDN serves the range
    request = _request(url, headers, token)
    try:
        response = _network(lambda: urlopen(request, timeout=timeout))
    except HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return  # we may already hold the whole file; validation decides
        raise
    with response:
        if offset and response.status == 206:
            start = _range_start(response.headers.get("Content-Range"))
            if start != offset:
                tmp.unlink()
                raise _Retry(f"the server answered a range starting at {start}, not {offset}")
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # a fresh start, or a server that ignored Range: start over
        length = response.headers.get("Content-Length", "")
        expected = offset + int(length) if length.isdigit() else None
        tracker.size(key, expected)
        done = offset
        tracker.advance(key, done)
        with open(tmp, mode) as out:
            while True:
                if stop.is_set():
                    raise _Cancelled()
                chunk = _network(lambda: response.read(CHUNK_BYTES))
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                tracker.advance(key, done)
    if expected is not None and done < expected:
        raise _Retry(f"the connection closed after {done:,} of {expected:,} bytes")


def _is_valid(validate: Validator | None, path: Path) -> bool:
    if validate is None:
        return True
    try:
        validate(path)
        return True
    except Exception:
        return False


def _download_one(key: int, job: DownloadJob, retries: int, backoff: float, timeout: float,
                  tracker: _Tracker, stop: threading.Event, token: str | None, offline: bool) -> Path:
    dest = Path(job.dest)
    if stop.is_set():
        raise _Cancelled()
    lock = dest.with_name(dest.name + ".lock")
    with exclusive_lock(lock, on_wait=lambda: tracker.start(key, f"{dest.name} (waiting for another process)")):
        return _download_locked(key, job, dest, retries, backoff, timeout, tracker, stop, token, offline)


def _download_locked(key: int, job: DownloadJob, dest: Path, retries: int, backoff: float, timeout: float,
                     tracker: _Tracker, stop: threading.Event, token: str | None, offline: bool) -> Path:
    if dest.exists():
        if _is_valid(job.validate, dest):
            tracker.finish(key, dest.stat().st_size)
            return dest
        if offline:
            raise DownloadError(job.url, f"{dest} is corrupt and HF_HUB_OFFLINE forbids fetching it again",
                                OFFLINE_MODE_HINT)
        dest.unlink()  # corrupt or truncated by something else: fetch it again
    elif offline:
        raise DownloadError(job.url, f"{dest.name} is not in the cache ({dest.parent})", OFFLINE_MODE_HINT)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tracker.start(key, dest.name)
    last = "no attempt was made"
    for attempt in range(retries):
        if attempt and stop.wait(backoff * 2 ** (attempt - 1)):
            raise _Cancelled()
        try:
            _fetch(job.url, tmp, timeout, key, tracker, stop, token)
        except HTTPError as exc:
            status = f"HTTP {exc.code} {exc.reason}"
            if exc.code >= 500 or exc.code in RETRIED_STATUS:
                last = status
                continue
            raise DownloadError(job.url, status, _http_hint(exc.code)) from exc
        except _Retry as exc:
            last = str(exc)
            continue
        if job.validate is not None:
            try:
                job.validate(tmp)
            except Exception as exc:
                tmp.unlink(missing_ok=True)
                last = f"the downloaded file is invalid ({exc})"
                continue
        size = tmp.stat().st_size
        os.replace(tmp, dest)
        tracker.finish(key, size)
        return dest
    hint = INVALID_HINT if last.startswith("the downloaded file is invalid") else NETWORK_HINT
    raise DownloadError(job.url, f"{last} (gave up after {retries} attempts)", hint)


def download_files(jobs: Iterable[DownloadJob | Sequence], workers: int = 8, retries: int = 5,
                   backoff: float = 1.0, timeout: float = 30.0, progress: bool = True,
                   token: str | None = None, offline: bool = False) -> list[Path]:
    """Fetch every `(url, dest, validate)` job on up to `workers` threads; returns the dests.

    `retries` is the number of attempts per file in all; attempt n+1 waits `backoff * 2**(n-1)`
    seconds. `validate(path)` raises on an invalid file (default: a parquet file with a `text`
    column and at least one row; None accepts anything). When a file fails for good the others
    stop early (their partial files are kept for the next call) and `DownloadError` is raised.
    `token` authenticates to the server asked; `offline` only accepts files already present.
    """
    if retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
    jobs = [job if isinstance(job, DownloadJob) else DownloadJob(*job) for job in jobs]
    stop = threading.Event()
    with _Tracker(progress, len(jobs)) as tracker, \
            ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs) or 1))) as pool:
        futures = [pool.submit(_download_one, i, job, retries, backoff, timeout, tracker, stop, token, offline)
                   for i, job in enumerate(jobs)]
        for future in futures:
            future.add_done_callback(lambda f: f.exception() and stop.set())
        errors = [f.exception() for f in futures]
    failures = [e for e in errors if e is not None and not isinstance(e, _Cancelled)]
    if failures:
        first = failures[0]
        if isinstance(first, DownloadError) and len(failures) > 1:
            raise DownloadError(first.url, f"{first.reason} (and {len(failures) - 1} more file(s) failed)",
                                first.hint) from first
        raise first
    return [Path(job.dest) for job in jobs]
