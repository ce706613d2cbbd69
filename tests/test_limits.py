"""What a caller can make a real portal hold: connections, threads, memory, disk, event-loop time.

Slow callers (headers or a page's body that never finish) must not take Flask's threads, and are closed after
client_read_timeout; bodies have a limit per route (1 MiB for pages and the REST API, max_upload_mb for proxied
requests), refused at once by Content-Length and counted when chunked; gateway uploads spool in a private folder
of PILOTFISH_HOME with a cap; headers have a size limit; a large JSON body to the gateway does not stall the
streams of its worker; and every file the portal writes is private to its user.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import time

import psutil
import pytest
import requests

from tests.conftest import REPO, wait_for

UPSTREAM = f"{sys.executable} {REPO / 'tests' / 'support' / 'openai_upstream.py'}"
CLIENT_TIMEOUT = 3
MAX_UPLOAD_MB = 5
SPOOL_LIMIT_MB = 3


@pytest.fixture(scope="module")
def portal(start_module_portal):
    return start_module_portal("local", workers=2, client_read_timeout=CLIENT_TIMEOUT, max_upload_mb=MAX_UPLOAD_MB,
                               spool_limit_mb=SPOOL_LIMIT_MB, runtimes={"text-generation": {"command": UPSTREAM}})


def workers_of(portal):
    return psutil.Process(portal.proc.pid).children()


def vm_rss(pid: int) -> int:
    """Resident memory of a process in bytes, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def connect(portal) -> socket.socket:
    return socket.create_connection(("127.0.0.1", portal.port), timeout=10)


def answer_of(sock: socket.socket, timeout: float) -> bytes:
    """What the portal sends before it closes the connection (or within `timeout`); b"" if it just closed."""
    sock.settimeout(max(0.1, timeout))
    data = b""
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                return data
            data += part
    except ConnectionResetError:
        return data
    except socket.timeout:
        return data + b"<still open>"


def response_of(sock: socket.socket, timeout: float) -> bytes:
    """One whole answer (head and its Content-Length of body) on a connection that may stay open."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
            dict(line.split(b": ", 1) for line in data.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")[1:]
                 if b": " in line).get(b"content-length", b"0")):
        part = sock.recv(65536)
        if not part:
            break
        data += part
    return data


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def test_slow_bodies_leave_the_pages_and_the_api_answering(portal):
    """250 unauthenticated POST /login that send their headers and never finish the body (more than the 2 x 32
    Flask threads): /health and an authenticated GET /api/services still answer at once; after
    client_read_timeout each slow connection is answered 408 or closed."""
    slow = []
    for _ in range(250):
        sock = connect(portal)
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: portal\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 1000\r\n\r\nusername=")
        slow.append(sock)
    opened = time.monotonic()
    time.sleep(1)
    started = time.monotonic()
    try:
        health = requests.get(portal.url + "/health", timeout=10).status_code
        services = portal.request("GET", "/api/services", timeout=10).status_code
    except requests.RequestException as exc:
        health = services = repr(exc)
    took = time.monotonic() - started
    assert (health, services) == (200, 200) and took < 3, f"/health {health}, /api/services {services} in {took:.1f} s"
    endings = [answer_of(sock, CLIENT_TIMEOUT + 10 - (time.monotonic() - opened)) for sock in slow]
    for sock in slow:
        sock.close()
    still_open = sum(1 for data in endings if data.endswith(b"<still open>"))
    assert still_open == 0, f"{still_open} of {len(slow)} slow connections still open after {CLIENT_TIMEOUT + 10} s"
    assert all(data == b"" or status_of(data) == 408 for data in endings), {data[:40] for data in endings}


def test_slow_and_idle_connections_are_closed(portal):
    """Connections that send half a request head and stop, and connections that send nothing at all, are closed
    after client_read_timeout."""
    partial = [connect(portal) for _ in range(20)]
    for sock in partial:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: portal\r\nX-Slow: ")
    idle = [connect(portal) for _ in range(20)]
    opened = time.monotonic()
    endings = [answer_of(sock, CLIENT_TIMEOUT + 10 - (time.monotonic() - opened)) for sock in partial + idle]
    for sock in partial + idle:
        sock.close()
    assert not any(data.endswith(b"<still open>") for data in endings), [data[:40] for data in endings]
    assert all(data == b"" or status_of(data) == 408 for data in endings), {data[:40] for data in endings}


def test_large_headers_are_refused_and_the_worker_survives(portal):
    """100 KB of headers (100 of 1 KB, then one of 100 KB) are refused (431, or the connection closed) and the
    workers keep serving."""
    pids = sorted(worker.pid for worker in workers_of(portal))
    for head in (b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000) for i in range(100)),
                 b"X-Filler: " + b"a" * 100_000 + b"\r\n"):
        sock = connect(portal)
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: portal\r\n" + head + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = answer_of(sock, 10)
        sock.close()
        assert status_of(data) in (0, 431) and not data.endswith(b"<still open>"), data[:200]
    assert requests.get(portal.url + "/health", timeout=10).status_code == 200
    assert sorted(worker.pid for worker in workers_of(portal)) == pids


def test_a_huge_login_body_is_refused_at_once_without_growing_the_worker(portal):
    """POST /login announcing 200 MB of JSON (and sending it as fast as it can): 413 at once, with a JSON error, and
    no worker grows by more than a few MB."""
    before = {worker.pid: vm_rss(worker.pid) for worker in workers_of(portal)}
    sock = connect(portal)
    size = 200 * 1024 * 1024
    sock.sendall(b"POST /login HTTP/1.1\r\nHost: portal\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % size)
    block = b'{"a": ' + b" " * (1024 * 1024 - 8) + b"1}"

    def write():
        try:
            for _ in range(size // len(block)):
                sock.sendall(block)
        except OSError:
            pass

    writer = threading.Thread(target=write, daemon=True)
    started = time.monotonic()
    writer.start()
    data = response_of(sock, 15)
    took = time.monotonic() - started
    sock.close()
    writer.join(10)
    grown = {pid: (vm_rss(pid) - rss) >> 20 for pid, rss in before.items()}
    assert status_of(data) == 413 and took < 5, (data[:300], took)
    assert "error" in json.loads(data.partition(b"\r\n\r\n")[2])
    assert max(grown.values()) < 8, f"workers grew by {grown} MB"


def chunks(total: int, block: bytes):
    sent = 0
    while sent < total:
        yield block
        sent += len(block)


def test_chunked_bodies_over_the_limit_are_413(portal):
    """Chunked bodies (no Content-Length): 2 MB to the REST API (limit 1 MiB) and 6 MB of valid JSON to the
    gateway (max_upload_mb 5) are refused 413, the gateway's in OpenAI's error shape; so is a Content-Length
    above the limit, before its body is read."""
    api = portal.request("POST", "/api/services", data=chunks(2 << 20, b" " * 65536),
                         headers={"Content-Type": "application/json"})
    assert api.status_code == 413, api.text[:300]
    assert isinstance(api.json()["error"], str)

    def big_json():
        yield b'{"model": "test/tiny", "messages": [{"role": "user", "content": "'
        yield from chunks(6 << 20, b"a" * 65536)
        yield b'"}], "max_tokens": 1}'

    gateway = portal.request("POST", "/v1/chat/completions", data=big_json(), headers={"Content-Type": "application/json"})
    assert gateway.status_code == 413, gateway.text[:300]
    assert gateway.json()["error"]["type"] == "invalid_request_error"

    sock = connect(portal)
    sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: portal\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: %d\r\n\r\n"
                 % (portal.token.encode(), (MAX_UPLOAD_MB + 1) << 20))
    data = response_of(sock, 10)
    sock.close()
    assert status_of(data) == 413, data[:300]
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"


def multipart_head(portal) -> bytes:
    return (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: portal\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: multipart/form-data; boundary=XyZ\r\nTransfer-Encoding: chunked\r\n\r\n"
            % portal.token.encode())


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_uploads_spool_in_a_private_folder_of_the_home_with_a_cap(portal):
    """A gateway upload (multipart, read for its model field) spools to PILOTFISH_HOME/spool (0700), not /tmp; an
    upload larger than the spool's cap (spool_limit_mb) is answered 503."""
    spool = portal.home / "spool"
    sock = connect(portal)
    sock.sendall(multipart_head(portal) + chunk(
        b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\ntest/whisper\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b'Content-Type: audio/wav\r\n\r\n'))
    for _ in range(2 * 16):  # 2 MB: past the 1 MB kept in memory
        sock.sendall(chunk(b"\0" * 65536))

    def spool_files():
        found = []
        for worker in workers_of(portal):
            for fd in os.listdir(f"/proc/{worker.pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{worker.pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(str(spool)) or (target.startswith("/tmp/") and target.endswith("(deleted)")
                                                      and "gunicorn" not in target):
                    found.append(target)
        return found

    files = wait_for(spool_files, timeout=10, what="the upload's spool file")
    sock.close()
    assert all(path.startswith(str(spool) + "/") for path in files), files
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700

    sock = connect(portal)
    sock.sendall(multipart_head(portal))
    try:
        for _ in range(4 * 16):  # 4 MB: within max_upload_mb, beyond the spool's cap
            sock.sendall(chunk(b"\0" * 65536))
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    data = response_of(sock, 10)
    sock.close()
    assert status_of(data) == 503, data[:300]
    assert b"retry-after" in data.lower()


def test_uploads_refused_after_spooling_give_their_room_back(portal):
    """An upload spooled and then answered by the portal itself (its model is not served) frees its share of the
    spool's cap: uploads after it are not refused as if the spool were full."""
    for _ in range(6):  # 2 MB each, 3 MB cap per worker: a share kept by any of them fills a worker's spool
        answer = requests.post(f"{portal.url}/v1/audio/transcriptions", data={"model": "nobody/here"},
                               files={"file": ("a.wav", b"\0" * (2 << 20), "audio/wav")},
                               headers={"Authorization": f"Bearer {portal.token}"}, timeout=30)
        assert answer.status_code == 404, answer.text[:300]
        assert answer.json()["error"]["code"] == "model_not_found"


def test_files_under_the_home_are_private(portal):
    """After the portal started, wrote its database (-wal, -shm) and ran a service (job folder, logs): no file or
    folder under PILOTFISH_HOME has a permission bit for group or others."""
    service = portal.launch(model="test/tiny").json()
    portal.wait_state(service["id"], "RUNNING", timeout=60)
    assert portal.request("POST", "/api/keys", json={"name": "perm-check"}).status_code in (200, 201)
    names = {path.name for path in portal.home.rglob("*")}
    shared = sorted(f"{oct(stat.S_IMODE(path.lstat().st_mode))} {path.relative_to(portal.home)}"
                    for path in [portal.home, *portal.home.rglob("*")]
                    if not path.is_symlink() and path.lstat().st_mode & 0o077)
    portal.request("POST", f"/api/services/{service['id']}/stop")
    assert shared == []
    assert {"pilotfish.db-wal", "pilotfish.db-shm", "connection.json", "spool"} <= names, sorted(names)


LARGE_BODY_DECODE_SECONDS = 0.5  # the body is grown until decoding it here takes this long, whatever the machine


def large_chat_body(min_decode: float = LARGE_BODY_DECODE_SECONDS):
    """A chat request whose messages' content parts take at least `min_decode` seconds to decode in this process,
    and how long they took: the body grows until they do, so a faster machine gets a larger body."""
    count = 50_000
    while True:
        body = json.dumps({"model": "test/unserved", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]}] * count}).encode()
        started = time.perf_counter()
        json.loads(body)
        decode = time.perf_counter() - started
        if decode >= min_decode:
            return body, decode
        count = int(count * min(8.0, max(1.5, 1.2 * min_decode / decode)))


def test_a_large_json_body_to_the_gateway_does_not_stall_streams(start_portal):
    """While a stream runs through the proxy (a chunk every 50 ms), a JSON body that takes at least half a second
    to decode (measured here, in this process; about 20 MB on the 2-core machine) goes to the gateway on the same
    worker: the largest gap between the stream's chunks stays far below the time it takes to decode that body."""
    body, decode = large_chat_body()
    portal = start_portal("local", workers=1, max_upload_mb=len(body) / 2 ** 20 + 1,
                          runtimes={"text-generation": {"command": UPSTREAM + " --token-delay 0.05"}})
    service = portal.launch(model="test/tiny").json()
    portal.wait_state(service["id"], "RUNNING", timeout=60)

    arrivals = []
    stream = portal.request("POST", f"/services/{service['id']}/v1/chat/completions", stream=True,
                            json={"model": "test/tiny", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 200, "stream": True})
    assert stream.status_code == 200
    big = {}

    def send_big():
        big["sent"] = time.monotonic()
        answer = portal.request("POST", "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        big["status"], big["done"] = answer.status_code, time.monotonic()

    sender = None
    for data in stream.iter_content(chunk_size=None):
        arrivals.append(time.monotonic())
        if len(arrivals) == 10:
            sender = threading.Thread(target=send_big)
            sender.start()
    sender.join(30)
    assert big.get("status") == 404, big  # the body was decoded: the model it names is not served
    window = [b - a for a, b in zip(arrivals, arrivals[1:]) if big["sent"] <= b and a <= big["done"]]
    assert big["done"] < arrivals[-1] and window, "the large request did not overlap the stream"
    print(f"largest gap {max(window):.3f} s while the gateway took the {len(body) / 1e6:.0f} MB body "
          f"in {big['done'] - big['sent']:.2f} s; decoding it takes {decode:.3f} s")
    # A chunk is due every 50 ms; decoding on the worker's event loop would hold one back for about `decode`.
    assert max(window) < 0.05 + decode / 4, f"largest gap {max(window):.3f} s; decoding takes {decode:.3f} s"
