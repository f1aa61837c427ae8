"""Downloading catalog photos from user-supplied http(s) addresses, safely and in parallel.

A catalog export may name its photos by URL. Those addresses come from users, so this
module treats every one as hostile: it resolves the host name itself and refuses any
address inside the company network (private, loopback, link-local such as the cloud
metadata service 169.254.169.254, multicast, reserved), then connects to exactly the
address it checked, so a DNS answer that changes between the check and the connection
("DNS rebinding") cannot redirect it. Redirects are followed by hand and every hop is
checked again. Bodies are streamed with a byte counter and a deadline, and only files that
really decode as images are kept.

Downloads are cached by the SHA-256 of their URL under ``cache_dir``; a failed download
leaves nothing behind. Errors are plain sentences for an analyst, never tracebacks.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from core.base.files import atomic_path
from core.inputs.images import ImageError, inspect_image

ALLOW_PRIVATE_ENV = "CATALOG_LENS_ALLOW_PRIVATE_URLS"
_REDIRECTS = (301, 302, 303, 307, 308)
_OCTET = ("application/octet-stream", "binary/octet-stream")
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "TIFF": "tif", "BMP": "bmp"}
_CHUNK = 64 * 1024
_END = object()


def _env_allows_private() -> bool:
    return os.environ.get(ALLOW_PRIVATE_ENV, "").strip() == "1"


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for downloading one photo; the defaults suit public image CDNs.

    ``allow_private`` (or ``CATALOG_LENS_ALLOW_PRIVATE_URLS=1``) lifts the network checks
    entirely, for an installation whose photos live on an internal server.
    ``allowed_private_hosts`` is the narrow alternative: IP addresses (e.g. ``"127.0.0.1"``)
    that may be reached although they are private, on any port, while every other private
    address stays refused. Other ports than 80/443 are refused for public hosts because
    user-chosen ports are how an attacker reaches admin consoles and non-HTTP services.
    """

    timeout_s: float = 10.0
    max_bytes: int = 30 * 1024 * 1024
    max_redirects: int = 3
    retries: int = 2
    backoff_s: float = 0.5
    per_host: int = 4
    workers: int = 16
    allow_private: bool = field(default_factory=_env_allows_private)
    allowed_private_hosts: frozenset[str] = frozenset()
    allowed_schemes: tuple[str, ...] = ("http", "https")
    allowed_ports: tuple[int, ...] = (80, 443)
    user_agent: str = "CatalogLens/0.1"


class UrlRefused(ValueError):
    """An address this app will not download from; ``str()`` says why in plain words."""


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


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, no brackets
    port: int
    path: str
    address: str  # the vetted IP to connect to

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


# ------------------------------------------------------------------------ URL checks


def _split(url: str, policy: FetchPolicy) -> tuple[str, str, int, str]:
    """Static checks that need no network: scheme, credentials, host, port syntax."""
    if not isinstance(url, str) or not url.strip():
        raise UrlRefused("the address is empty")
    url = url.strip()
    if any(ord(ch) < 33 or ord(ch) == 127 for ch in url):
        raise UrlRefused("the address contains spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in policy.allowed_schemes:
        allowed = " and ".join(policy.allowed_schemes)
        raise UrlRefused(f"only {allowed} addresses can be downloaded (this one starts with '{scheme or '?'}:')")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("addresses with a user name or password in them are not allowed")
    if not parts.hostname:
        raise UrlRefused("the address has no server name")
    try:
        port = parts.port
    except ValueError:
        raise UrlRefused("the address has an invalid port number") from None
    port = port or (443 if scheme == "https" else 80)
    try:
        host = parts.hostname.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise UrlRefused("the server name in the address is not valid") from None
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return scheme, host, port, path


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _is_private(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address inside are judged by that address.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and _is_private(embedded):
            return True
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global  # e.g. 100.64.0.0/10 carrier-grade NAT
    )


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]  # an IP literal needs no DNS
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (UnicodeError, OSError):
        infos = []
    addresses = []
    for info in infos:
        with contextlib.suppress(ValueError):
            addresses.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
    if not addresses:
        raise _FetchFailed(f"the server name '{host}' could not be found")
    return addresses


def _vet(url: str, policy: FetchPolicy) -> _Target:
    """Resolve and check one hop; returns the single address to connect to."""
    scheme, host, port, path = _split(url, policy)
    addresses = _resolve(host, port)
    if not policy.allow_private:
        # Refuse if ANY answer is private: an attacker's DNS may mix public and private ones.
        exempt = all(str(a) in policy.allowed_private_hosts for a in addresses)
        if not exempt and any(_is_private(a) for a in addresses):
            raise UrlRefused("addresses inside the company network are not allowed")
        if not exempt and port not in policy.allowed_ports:
            raise UrlRefused(f"only the standard web ports are allowed (this address uses port {port})")
    return _Target(scheme, host, port, path, str(addresses[0]))


# -------------------------------------------------------------------- connections


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a vetted IP while verifying the certificate (and SNI) for the host name."""

    def __init__(self, address: str, port: int, *, server_name: str, timeout: float, context: ssl.SSLContext):
        super().__init__(address, port, timeout=timeout, context=context)
        self._server_name = server_name
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self._server_name)


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

    # -- public --------------------------------------------------------------------

    def fetch(self, url: str) -> FetchResult:
        """Download one URL (or take it from the cache); never raises for a bad URL."""
        try:
            _split(url, self.policy)
        except UrlRefused as exc:
            return FetchResult(url, error=str(exc))
        cached = self.cached(url)
        if cached is not None:
            return FetchResult(url, path=cached, from_cache=True)
        last = _FetchFailed("the download failed")
        for attempt in range(self.policy.retries + 1):
            if attempt:
                time.sleep(self.policy.backoff_s * 2 ** (attempt - 1))
            try:
                path, status = self._download(url)
                return FetchResult(url, path=path, status=status)
            except UrlRefused as exc:
                return FetchResult(url, error=str(exc))
            except _FetchFailed as exc:
                last = exc
                if not exc.retry:
                    break
        return FetchResult(url, error=str(last), status=last.status)

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
        more URLs are read; queued ones get a "cancelled" result and running ones finish.
        """
        cancelled = should_cancel or (lambda: False)
        source = iter(urls)
        window = max(1, self.policy.workers) * 2
        pending: dict[cf.Future, str] = {}
        exhausted = False
        with cf.ThreadPoolExecutor(max_workers=max(1, self.policy.workers), thread_name_prefix="fetch") as pool:
            try:
                while True:
                    stop = cancelled()
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
            host = _split(url, self.policy)[1]
        except UrlRefused:
            host = ""
        with self._lock:
            sem = self._host_locks.setdefault(host, threading.BoundedSemaphore(max(1, self.policy.per_host)))
        with sem:
            # A worker may wait a long time for its host's slot; the user may have given up.
            if cancelled():
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

    def _download(self, url: str) -> tuple[Path, int]:
        current = url.strip()
        for _hop in range(self.policy.max_redirects + 1):
            target = _vet(current, self.policy)
            conn = self._connect(target)
            try:
                response = self._request(conn, target)
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
                return self._store(url, response, conn), status
            finally:
                conn.close()
        raise _FetchFailed("too many redirects")

    def _connect(self, target: _Target) -> http.client.HTTPConnection:
        if target.scheme == "https":
            return _PinnedHTTPSConnection(
                target.address, target.port, server_name=target.host, timeout=self.policy.timeout_s, context=self._ssl
            )
        return http.client.HTTPConnection(target.address, target.port, timeout=self.policy.timeout_s)

    def _request(self, conn: http.client.HTTPConnection, target: _Target) -> http.client.HTTPResponse:
        headers = {
            "Host": target.host_header,
            "User-Agent": self.policy.user_agent,
            "Accept": "image/*",
            "Connection": "close",
        }
        try:
            conn.request("GET", target.path, headers=headers)
            return conn.getresponse()
        except TimeoutError:
            raise self._too_slow() from None
        except ssl.SSLError as exc:
            raise _FetchFailed(f"the secure connection to '{target.host}' failed ({exc.reason or exc})") from None
        except (OSError, http.client.HTTPException):
            raise _FetchFailed(f"the server '{target.host}' could not be reached", retry=True) from None

    def _too_slow(self) -> _FetchFailed:
        return _FetchFailed(f"the download took longer than {self.policy.timeout_s:g} s", retry=True)

    def _too_big(self) -> _FetchFailed:
        return _FetchFailed(f"the file is larger than {_human_size(self.policy.max_bytes)}")

    def _store(self, url: str, response: http.client.HTTPResponse, conn: http.client.HTTPConnection) -> Path:
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
            deadline = time.monotonic() + self.policy.timeout_s
            received = 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._too_slow()
                if conn.sock is not None:
                    conn.sock.settimeout(remaining)
                try:
                    chunk = response.read(_CHUNK)
                except TimeoutError:
                    raise self._too_slow() from None
                except (OSError, http.client.HTTPException):
                    raise _FetchFailed("the connection broke off during the download", retry=True) from None
                if not chunk:
                    break
                received += len(chunk)
                if received > self.policy.max_bytes:
                    raise self._too_big()
                out.write(chunk)
        return stored[0]
