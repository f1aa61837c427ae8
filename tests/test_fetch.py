"""core.inputs.fetch against a throw-away HTTP server on 127.0.0.1 (no internet needed)."""

from __future__ import annotations

import io
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from core.inputs import fetch as fetch_mod
from core.inputs.addresses import UrlRefused, vet
from core.inputs.fetch import Fetcher, FetchPolicy


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


JPEG, PNG = _image_bytes("JPEG"), _image_bytes("PNG")


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.active = 0
        self.max_active = 0


def _handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes = b"", ctype: str | None = None, **headers: str) -> None:
            self.send_response(status)
            if ctype:
                self.send_header("Content-Type", ctype)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _trickle(self, data: bytes, at_once: int = 16) -> None:
            """Send ``data`` a byte every 50 ms (for at most 20 s) until the client hangs up."""
            self.close_connection = True
            try:
                self.wfile.write(data[:at_once])
                self.wfile.flush()
                for i in range(at_once, min(len(data), at_once + 400)):
                    time.sleep(0.05)
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
            except OSError:  # the client gave up: what a deadline is for
                pass

        def do_GET(self) -> None:
            path = self.path
            with state.lock:
                state.counts[path] = state.counts.get(path, 0) + 1
                count = state.counts[path]
                state.active += 1
                state.max_active = max(state.max_active, state.active)
            try:
                self._route(path, count)
            finally:
                with state.lock:
                    state.active -= 1

        def _route(self, path: str, count: int) -> None:
            if path.startswith("/photo.jpg") or path.startswith("/busy/"):
                if path.startswith("/busy/"):
                    time.sleep(0.15)
                self._send(200, JPEG, "image/jpeg")
            elif path == "/photo.png":
                self._send(200, PNG, "image/png")
            elif path == "/octet":
                self._send(200, PNG, "application/octet-stream")
            elif path == "/flaky":
                self._send(500, b"oops", "text/plain") if count == 1 else self._send(200, JPEG, "image/jpeg")
            elif path == "/slow":
                time.sleep(1.5)
                self._send(200, JPEG, "image/jpeg")
            elif path == "/big":
                self._send(200, b"\xff" * 5000, "image/jpeg")
            elif path == "/big-chunked":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()  # no Content-Length: the byte counter must stop it
                self.wfile.write(b"\xff" * 5000)
                self.close_connection = True
            elif path == "/page":
                self._send(200, b"<html>hi</html>", "text/html; charset=utf-8")
            elif path.startswith("/hop/"):
                n = int(path.rsplit("/", 1)[1])
                self._send(302, Location="/photo.jpg" if n == 0 else f"/hop/{n - 1}")
            elif path == "/loop":
                self._send(302, Location="/loop")
            elif path == "/metadata":
                self._send(302, Location="http://169.254.169.254/latest/meta-data")
            elif path.startswith("/trickle-headers"):
                self._trickle(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n" + b"X-Slow: " + b"a" * 10_000)
            elif path.startswith("/trickle-body"):
                head = f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(JPEG)}\r\n\r\n"
                self._trickle(head.encode() + JPEG, at_once=len(head))
            elif path == "/to-file":
                self._send(302, Location="file:///etc/passwd")
            else:
                self._send(404, b"nope", "text/plain")

    return Handler


@pytest.fixture
def server():
    state = _State()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield base, state
    finally:
        httpd.shutdown()
        httpd.server_close()


def _local(**kw) -> FetchPolicy:
    """Only the test server's loopback address is exempt; other private ranges stay refused."""
    defaults = {"allowed_hosts": ("127.0.0.1",), "timeout_s": 0.5, "backoff_s": 0.01}
    return FetchPolicy(**{**defaults, **kw})


@pytest.fixture
def fetcher(tmp_path):
    return Fetcher(tmp_path / "cache", _local(max_bytes=4000))


def test_jpeg_and_png_are_saved_by_content_type(fetcher, server):
    base, _ = server
    jpg, png = fetcher.fetch(f"{base}/photo.jpg"), fetcher.fetch(f"{base}/photo.png")
    assert jpg.error is None and jpg.status == 200 and jpg.path.suffix == ".jpg"
    assert jpg.path.read_bytes() == JPEG
    assert png.path.suffix == ".png" and png.path.read_bytes() == PNG


def test_octet_stream_is_kept_when_the_bytes_are_an_image(fetcher, server):
    assert fetcher.fetch(f"{server[0]}/octet").path.suffix == ".png"


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/missing", "the server answered 404 (not found)"),
        ("/page", "the address is not an image (text/html)"),
        ("/big", "the file is larger than"),
        ("/big-chunked", "the file is larger than"),
        ("/loop", "too many redirects"),
        ("/metadata", "addresses inside the company network are not allowed"),
        ("/to-file", "only http and https"),
    ],
)
def test_failures_are_plain_words_and_leave_nothing(fetcher, server, path, expected):
    result = fetcher.fetch(server[0] + path)
    assert result.path is None and expected in result.error
    assert not [p for p in fetcher.cache_dir.rglob("*") if p.is_file()]


def test_slow_server_times_out(tmp_path, server):
    result = Fetcher(tmp_path, _local(retries=0)).fetch(f"{server[0]}/slow")
    assert result.error == "the download took longer than 0.5 s"


def test_server_error_is_retried(fetcher, server):
    base, state = server
    result = fetcher.fetch(f"{base}/flaky")
    assert result.error is None and state.counts["/flaky"] == 2


def test_not_found_is_not_retried(fetcher, server):
    base, state = server
    fetcher.fetch(f"{base}/missing")
    assert state.counts["/missing"] == 1


def test_redirect_chain_is_followed(fetcher, server):
    base, state = server
    result = fetcher.fetch(f"{base}/hop/2")  # three redirects: the policy's limit
    assert result.path.read_bytes() == JPEG and state.counts["/photo.jpg"] == 1


def test_second_fetch_comes_from_cache(fetcher, server):
    base, state = server
    first, second = fetcher.fetch(f"{base}/photo.jpg"), fetcher.fetch(f"{base}/photo.jpg")
    assert not first.from_cache and second.from_cache and second.path == first.path
    assert state.counts["/photo.jpg"] == 1


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://127.0.0.1/", "company network"),
        ("http://10.0.0.1/x.jpg", "company network"),
        ("http://[::1]/", "company network"),
        ("http://[::ffff:127.0.0.1]/", "company network"),
        ("http://169.254.169.254/latest/meta-data", "company network"),
        ("http://0.0.0.0/", "company network"),
        ("http://[64:ff9b::a00:1]/", "company network"),  # NAT64 form of 10.0.0.1
        ("http://[2002:a00:1::]/", "company network"),  # 6to4 form of 10.0.0.1
        ("file:///etc/passwd", "only http and https"),
        ("ftp://example.com/a.jpg", "only http and https"),
        ("data:image/png;base64,AAAA", "only http and https"),
        ("http://user:pw@host/", "user name or password"),
        ("http://8.8.8.8:8080/a.jpg", "standard web ports"),
    ],
)
def test_default_policy_refuses_without_network(tmp_path, monkeypatch, url, words):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv(fetch_mod.ALLOWED_HOSTS_ENV, raising=False)
    result = Fetcher(tmp_path, FetchPolicy()).fetch(url)
    assert result.path is None and words in result.error


def test_any_private_dns_answer_refuses_the_host(tmp_path, monkeypatch):
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 80)) for ip in ("93.184.216.34", "10.1.2.3")]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
    assert "company network" in Fetcher(tmp_path).fetch("http://mixed.example/a.jpg").error


def _answers(monkeypatch, *ips):
    answers = [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 80)) for ip in ips]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)


def test_allow_list_names_hosts_and_networks_from_the_environment(tmp_path, monkeypatch, server):
    monkeypatch.setenv(fetch_mod.ALLOWED_HOSTS_ENV, "intranet.example.com, 10.0.0.0/8 ,127.0.0.1")
    policy = FetchPolicy()
    assert policy.allowed_hosts == ("intranet.example.com", "10.0.0.0/8", "127.0.0.1")
    assert Fetcher(tmp_path, FetchPolicy(timeout_s=5)).fetch(f"{server[0]}/photo.jpg").path  # loopback, any port
    _answers(monkeypatch, "192.168.1.5")
    assert vet("http://intranet.example.com:8080/a.jpg", policy).address == "192.168.1.5"  # by name
    with pytest.raises(UrlRefused, match="company network"):
        vet("http://elsewhere.example.com/a.jpg", policy)  # same address, name not listed
    _answers(monkeypatch, "10.20.30.40")
    assert vet("http://photos.example.com/a.jpg", policy).address == "10.20.30.40"  # by network


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 form of 169.254.169.254
        "http://metadata.internal/computeMetadata/v1/",
    ],
)
def test_link_local_is_refused_whatever_the_allow_list_says(monkeypatch, url):
    _answers(monkeypatch, "169.254.169.254")  # what metadata.internal answers in a cloud
    policy = FetchPolicy(allowed_hosts=("metadata.internal", "0.0.0.0/0", "::/0", "169.254.0.0/16", "fe80::/10"))
    with pytest.raises(UrlRefused, match="company network"):
        vet(url, policy)


def test_old_switch_no_longer_lifts_the_checks(tmp_path, monkeypatch, server):
    monkeypatch.setenv("CATALOG_LENS_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.delenv(fetch_mod.ALLOWED_HOSTS_ENV, raising=False)
    assert "company network" in Fetcher(tmp_path, FetchPolicy(timeout_s=2)).fetch(f"{server[0]}/photo.jpg").error


def test_redirect_to_metadata_is_refused_for_an_allowed_host(tmp_path, server):
    policy = _local(allowed_hosts=("127.0.0.1", "169.254.0.0/16"))
    assert "company network" in Fetcher(tmp_path, policy).fetch(f"{server[0]}/metadata").error


@pytest.mark.parametrize("path", ["/trickle-headers", "/trickle-body"])
def test_one_total_deadline_per_url_against_a_trickling_server(tmp_path, server, path):
    """A byte every 50 ms never trips a per-read timeout; the total deadline (retries included) must."""
    fetcher = Fetcher(tmp_path, _local(timeout_s=1.5, retries=2))
    started = time.monotonic()
    result = fetcher.fetch(server[0] + path)
    elapsed = time.monotonic() - started
    assert result.error == "the download took longer than 1.5 s"
    assert elapsed < 3.5  # generous: one deadline, not one per try (before: 4.5 s, or 20 s for headers)
    assert server[1].counts[path] == 1  # the deadline is spent: no retry
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_deadline_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(fetch_mod.TIMEOUT_ENV, "7.5")
    assert FetchPolicy().timeout_s == 7.5
    monkeypatch.setenv(fetch_mod.TIMEOUT_ENV, "soon")
    assert FetchPolicy().timeout_s == fetch_mod.DEFAULT_TIMEOUT_S == 30


def test_cancel_cuts_running_downloads_and_fetches_no_queued_url(tmp_path, server):
    base, state = server
    urls = [f"{base}/trickle-body/{i}" for i in range(40)]
    fetcher = Fetcher(tmp_path, _local(timeout_s=60, workers=4, per_host=4))
    started = time.monotonic()
    results = list(fetcher.fetch_many(urls, should_cancel=lambda: time.monotonic() - started > 0.5))
    elapsed = time.monotonic() - started
    assert elapsed < 5  # before: each running download went on to its end (20 s)
    assert results and all(r.error == "cancelled" for r in results)  # every URL read got its result
    assert sum(state.counts.values()) <= 4  # only those already running were ever requested


def test_fetch_many_gives_one_result_per_url(fetcher, server):
    base = server[0]
    urls = [f"{base}/photo.jpg", f"{base}/photo.png", f"{base}/missing", "file:///etc/passwd", f"{base}/photo.jpg?x=1"]
    seen = []
    results = list(fetcher.fetch_many(urls, on_result=seen.append))
    assert sorted(r.url for r in results) == sorted(urls) and seen == results
    assert sum(r.path is not None for r in results) == 3


def test_fetch_many_respects_per_host_cap(tmp_path, server):
    base, state = server
    urls = [f"{base}/busy/{i}" for i in range(12)]
    results = list(Fetcher(tmp_path, _local(per_host=2, workers=8)).fetch_many(urls))
    assert len(results) == 12 and all(r.path for r in results)
    assert 1 <= state.max_active <= 2


def test_fetch_many_stops_reading_urls_when_cancelled(tmp_path, server):
    base, state = server
    cancel = threading.Event()
    read = []

    def urls():
        for i in range(100):
            read.append(i)
            yield f"{base}/busy/{i}"

    results = []
    for result in Fetcher(tmp_path, _local(per_host=1, workers=2)).fetch_many(urls(), should_cancel=cancel.is_set):
        results.append(result)
        cancel.set()
    assert len(results) == len(read) < 100  # every URL read got exactly one result
    assert sum(state.counts.values()) < 5


def test_https_connects_to_the_vetted_address_with_the_host_name_for_tls(monkeypatch):
    calls = {}

    class FakeContext:
        verify_mode, check_hostname = ssl.CERT_REQUIRED, True

        def wrap_socket(self, sock, *, server_hostname):
            calls["sni"] = server_hostname
            return sock

    monkeypatch.setattr(socket, "create_connection", lambda addr, timeout: calls.setdefault("addr", addr))
    conn = fetch_mod._PinnedHTTPSConnection(
        "93.184.216.34", 443, server_name="cdn.example", timeout=1, context=FakeContext()
    )
    conn.connect()
    assert calls == {"addr": ("93.184.216.34", 443), "sni": "cdn.example"}
