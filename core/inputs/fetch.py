"""Downloading catalog photos from user-supplied http(s) addresses, safely and in parallel.

A catalog export may name its photos by URL. Those addresses come from users, so this
module treats every one as hostile: it resolves the host name itself and refuses any
address inside the company network (private, loopback, link-local such as the cloud
metadata service 169.254.169.254, multicast, reserved), then connects to exactly the
address it checked, so a DNS answer that changes between the check and the connection
("DNS rebinding") cannot redirect it. Redirects are followed by hand and every hop is
checked again. Bodies are streamed with a byte counter, and only files that really decode
as images are kept.

Every URL has ONE total deadline (``CATALOG_LENS_FETCH_TIMEOUT_S``, 30 s by default) for
connecting, the headers, the body, redirects and retries together: a watchdog thread shuts
the socket of any download past its deadline, or of every download once the run is
cancelled, so a server trickling one byte a second cannot hold a URL longer. Installations
whose photos live on an internal server name it in ``CATALOG_LENS_ALLOWED_HOSTS`` (host
names, addresses or networks, comma-separated); link-local addresses such as the cloud
metadata service are refused even then.

Downloads are cached by the SHA-256 of their URL under ``cache_dir``; a failed download
leaves nothing behind. Errors are plain sentences for an analyst, never tracebacks.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import http.client
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urljoin

from core.base.files import atomic_path
from core.inputs.addresses import ALLOWED_HOSTS_ENV, NameNotFound, Target, UrlRefused, env_allowed_hosts, split_url, vet
from core.inputs.images import ImageError, inspect_image

__all__ = ["ALLOWED_HOSTS_ENV", "TIMEOUT_ENV", "FetchPolicy", "FetchResult", "Fetcher", "UrlRefused"]

TIMEOUT_ENV = "CATALOG_LENS_FETCH_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0
_REDIRECTS = (301, 302, 303, 307, 308)
_OCTET = ("application/octet-stream", "binary/octet-stream")
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "TIFF": "tif", "BMP": "bmp"}
_CHUNK = 64 * 1024
_END = object()


def _env_timeout() -> float:
    try:
        value = float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT_S)
    except ValueError:
        value = DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for downloading one photo; the defaults suit public image CDNs.

    ``timeout_s`` is the total time one URL may take, retries and redirects included
    (default ``CATALOG_LENS_FETCH_TIMEOUT_S`` or 30 s). ``allowed_hosts`` (default
    ``CATALOG_LENS_ALLOWED_HOSTS``) names host names (exact), IP addresses or networks
    (``"10.0.0.0/8"``) that may be reached although they are private, on any port, while
    every other private address stays refused; link-local addresses (169.254.0.0/16,
    fe80::/10, the cloud metadata service) are refused whatever the list says. Other ports
    than 80/443 are refused for other hosts because user-chosen ports are how an attacker
    reaches admin consoles and non-HTTP services.
    """

    timeout_s: float = field(default_factory=_env_timeout)
    max_bytes: int = 30 * 1024 * 1024
    max_redirects: int = 3
    retries: int = 2
    backoff_s: float = 0.5
    per_host: int = 4
    workers: int = 16
    allowed_hosts: tuple[str, ...] = field(default_factory=env_allowed_hosts)
    allowed_schemes: tuple[str, ...] = ("http", "https")
    allowed_ports: tuple[int, ...] = (80, 443)
    user_agent: str = "CatalogLens/0.1"


@dataclass
class FetchResult:
    """The outcome for one URL: ``path`` on success, ``error`` (a plain sentence) otherwise."""

    url: str
    path: Path | None = None
    error: str | None = None
    status: int | None = None
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return self.path is not None


class _FetchFailed(Exception):
    """A failed attempt; ``retry`` marks failures worth another try."""

    def __init__(self, message: str, *, status: int | None = None, retry: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retry = retry


# -------------------------------------------------------------------- connections


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a vetted IP while verifying the certificate (and SNI) for the host name."""

    def __init__(self, address: str, port: int, *, server_name: str, timeout: float, context: ssl.SSLContext):
        super().__init__(address, port, timeout=timeout, context=context)
        self._server_name = server_name
        self._ctx = context

    def connect(self) -> None:
        self.raw = socket.create_connection((self.host, self.port), self.timeout)  # the watchdog's handle
        self.sock = self._ctx.wrap_socket(self.raw, server_hostname=self._server_name)


class _Attempt:
    """One URL's download: its total deadline and the connection the watchdog may cut."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.conn: http.client.HTTPConnection | None = None
        self.why: str | None = None  # "deadline" or "cancelled" once the watchdog cut it

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def cut(self, why: str) -> None:
        self.why = why
        conn = self.conn
        sock = conn and (getattr(conn, "raw", None) or conn.sock)
        if sock is not None:
            with contextlib.suppress(OSError):  # wakes a thread blocked reading it
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _human_size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):g} MB"
    if n >= 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n} bytes"


def _status_words(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase.lower()
    except ValueError:
        phrase = "unknown answer"
    return f"the server answered {status} ({phrase})"


# --------------------------------------------------------------------------- fetcher


class Fetcher:
    """Downloads photos into a content-addressed cache, one call or many in parallel."""

    def __init__(self, cache_dir: Path, policy: FetchPolicy | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        # Built per fetcher, not once at import, so the configuration in force now applies.
        self.policy = policy or FetchPolicy()
        self._ssl = ssl.create_default_context()  # verifies the certificate against the host name
        self._ssl.set_alpn_protocols(["http/1.1"])
        self._host_locks: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._live: set[_Attempt] = set()  # downloads in progress, watched for their deadline
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()  # set when a fetch_many run is cancelled

    # -- public --------------------------------------------------------------------

    def fetch(self, url: str) -> FetchResult:
        """Download one URL (or take it from the cache); never raises for a bad URL.

        Connecting, redirects, headers, body and retries share one deadline (``timeout_s``)."""
        try:
            split_url(url, self.policy)
        except UrlRefused as exc:
            return FetchResult(url, error=str(exc))
        cached = self.cached(url)
        if cached is not None:
            return FetchResult(url, path=cached, from_cache=True)
        attempt = _Attempt(self.policy.timeout_s)
        with self._lock:
            self._live.add(attempt)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="fetch-watchdog", daemon=True)
                self._watchdog.start()
        last = _FetchFailed("the download failed")
        try:
            for tries in range(self.policy.retries + 1):
                pause = self.policy.backoff_s * 2 ** (tries - 1) if tries else 0.0
                if pause and (attempt.left() <= pause or self._stop.wait(pause)):
                    break  # no time left for another try, or the run was cancelled
                try:
                    path, status = self._download(url, attempt)
                    return FetchResult(url, path=path, status=status)
                except UrlRefused as exc:
                    return FetchResult(url, error=str(exc))
                except _FetchFailed as exc:
                    last = exc
                    if not exc.retry:
                        break
        finally:
            with self._lock:
                self._live.discard(attempt)
        if self._stop.is_set():
            return FetchResult(url, error="cancelled")
        return FetchResult(url, error=str(last), status=last.status)

    def _watch(self) -> None:
        """Cut every download past its deadline, or all of them once the run is cancelled."""
        while True:
            with self._lock:
                live = list(self._live)
                if not live:
                    self._watchdog = None
                    return
            for attempt in live:
                if attempt.why is None and (self._stop.is_set() or attempt.left() <= 0):
                    attempt.cut("cancelled" if self._stop.is_set() else "deadline")
            time.sleep(0.05)

    def fetch_many(
        self,
        urls: Iterable[str],
        *,
        on_result: Callable[[FetchResult], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> Iterator[FetchResult]:
        """Download many URLs in parallel, yielding each result as it finishes.

        Every URL read from ``urls`` gets exactly one result. The input is read lazily, so
        a long catalog is never queued all at once. Once ``should_cancel()`` is true no
        more URLs are read, queued ones get a "cancelled" result and running ones are cut
        off within a fraction of a second (also "cancelled").
        """
        cancelled = should_cancel or (lambda: False)
        self._stop.clear()
        source = iter(urls)
        window = max(1, self.policy.workers) * 2
        pending: dict[cf.Future, str] = {}
        exhausted = False
        with cf.ThreadPoolExecutor(max_workers=max(1, self.policy.workers), thread_name_prefix="fetch") as pool:
            try:
                while True:
                    stop = self._stop.is_set() or cancelled()
                    if stop:
                        self._stop.set()  # the watchdog cuts the running downloads
                    while not stop and not exhausted and len(pending) < window:
                        url = next(source, _END)
                        if url is _END:
                            exhausted = True
                        else:
                            pending[pool.submit(self._fetch_limited, url, cancelled)] = url
                    if stop:
                        for future in list(pending):
                            if future.cancel():
                                yield self._emit(FetchResult(pending.pop(future), error="cancelled"), on_result)
                    if not pending:
                        return
                    done, _ = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                    for future in done:
                        url = pending.pop(future)
                        try:
                            result = future.result()
                        except Exception as exc:  # a bug must not lose the other results
                            result = FetchResult(url, error=f"the download failed unexpectedly ({exc})")
                        yield self._emit(result, on_result)
            finally:
                for future in pending:
                    future.cancel()

    # -- internals -----------------------------------------------------------------

    @staticmethod
    def _emit(result: FetchResult, on_result: Callable[[FetchResult], None] | None) -> FetchResult:
        if on_result is not None:
            on_result(result)
        return result

    def _fetch_limited(self, url: str, cancelled: Callable[[], bool]) -> FetchResult:
        try:
            host = split_url(url, self.policy)[1]
        except UrlRefused:
            host = ""
        with self._lock:
            sem = self._host_locks.setdefault(host, threading.BoundedSemaphore(max(1, self.policy.per_host)))
        with sem:
            # A worker may wait a long time for its host's slot; the user may have given up.
            if self._stop.is_set() or cancelled():
                return FetchResult(url, error="cancelled")
            return self.fetch(url)

    def _key(self, url: str) -> str:
        return hashlib.sha256(url.strip().encode("utf-8")).hexdigest()

    def cached(self, url: str) -> Path | None:
        """The file an earlier download of ``url`` left in the cache, else None (never the network)."""
        key = self._key(url)
        for path in (self.cache_dir / key[:2]).glob(f"{key}.*"):
            if not path.name.endswith(".tmp"):
                return path
        return None

    def _download(self, url: str, attempt: _Attempt) -> tuple[Path, int]:
        current = url.strip()
        for _hop in range(self.policy.max_redirects + 1):
            self._check(attempt)
            try:
                target = vet(current, self.policy)
            except NameNotFound as exc:
                raise _FetchFailed(str(exc)) from None
            conn = attempt.conn = self._connect(target, attempt)
            try:
                response = self._request(conn, target, attempt)
                status = response.status
                if status in _REDIRECTS:
                    location = response.getheader("Location")
                    if not location:
                        raise _FetchFailed(f"{_status_words(status)} without saying where to", status=status)
                    current = urljoin(current, location.strip())
                    continue
                if status >= 500 or status == 429:
                    raise _FetchFailed(_status_words(status), status=status, retry=True)
                if status != 200:
                    raise _FetchFailed(_status_words(status), status=status)
                return self._store(url, response, attempt), status
            finally:
                attempt.conn = None
                conn.close()
        raise _FetchFailed("too many redirects")

    def _connect(self, target: Target, attempt: _Attempt) -> http.client.HTTPConnection:
        left = max(0.01, attempt.left())  # each wait on the socket; the watchdog bounds the total
        if target.scheme == "https":
            return _PinnedHTTPSConnection(
                target.address, target.port, server_name=target.host, timeout=left, context=self._ssl
            )
        return http.client.HTTPConnection(target.address, target.port, timeout=left)

    def _request(self, conn: http.client.HTTPConnection, target: Target, attempt: _Attempt) -> http.client.HTTPResponse:
        headers = {
            "Host": target.host_header,
            "User-Agent": self.policy.user_agent,
            "Accept": "image/*",
            "Connection": "close",
        }
        try:
            conn.request("GET", target.path, headers=headers)
            response = conn.getresponse()
        except TimeoutError:
            raise self._too_slow() from None
        except ssl.SSLError as exc:
            self._check(attempt)
            raise _FetchFailed(f"the secure connection to '{target.host}' failed ({exc.reason or exc})") from None
        except (OSError, http.client.HTTPException):
            self._check(attempt)
            raise _FetchFailed(f"the server '{target.host}' could not be reached", retry=True) from None
        self._check(attempt)
        return response

    def _check(self, attempt: _Attempt) -> None:
        """Stop here if the watchdog cut this download or its time is up."""
        if attempt.why == "cancelled" or self._stop.is_set():
            raise _FetchFailed("cancelled")
        if attempt.why == "deadline" or attempt.left() <= 0:
            raise self._too_slow()

    def _too_slow(self) -> _FetchFailed:
        # Not worth another try: the deadline covers all tries together.
        return _FetchFailed(f"the download took longer than {self.policy.timeout_s:g} s")

    def _too_big(self) -> _FetchFailed:
        return _FetchFailed(f"the file is larger than {_human_size(self.policy.max_bytes)}")

    def _store(self, url: str, response: http.client.HTTPResponse, attempt: _Attempt) -> Path:
        ctype = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype and not ctype.startswith("image/") and ctype not in _OCTET:
            raise _FetchFailed(f"the address is not an image ({ctype})", status=response.status)
        length = response.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > self.policy.max_bytes:
            raise self._too_big()

        key = self._key(url)
        folder = self.cache_dir / key[:2]
        folder.mkdir(parents=True, exist_ok=True)
        stored: list[Path] = []

        def named_by_format(tmp: Path) -> Path:
            """The cache name of a checked download (its extension from its real format)."""
            try:
                info = inspect_image(tmp)
            except ImageError as exc:
                what = f"the address is not an image ({ctype})" if ctype in _OCTET or not ctype else None
                raise _FetchFailed(what or f"the downloaded file is not a usable image: {exc}") from None
            stored.append(folder / f"{key}.{_EXTENSIONS.get(info.format.upper(), 'img')}")
            return stored[0]

        with atomic_path(folder / key, name_after=named_by_format) as tmp, open(tmp, "wb") as out:
            received = 0
            while True:
                self._check(attempt)
                try:
                    chunk = response.read(_CHUNK)
                except TimeoutError:
                    raise self._too_slow() from None
                except (OSError, http.client.HTTPException):
                    self._check(attempt)
                    raise _FetchFailed("the connection broke off during the download", retry=True) from None
                self._check(attempt)  # a cut socket reads as the end: never keep a partial file
                if not chunk:
                    break
                received += len(chunk)
                if received > self.policy.max_bytes:
                    raise self._too_big()
                out.write(chunk)
        return stored[0]
