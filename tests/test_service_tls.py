"""TLS to each service (portal/service_tls.py): the key and certificate made at launch, and the pin every
connection of the portal checks before it sends anything (the proxy's pool, the load generator)."""
import asyncio
import hashlib
import ssl
import stat

import pytest

from portal.http1 import RequestFailed
from portal.proxy.upstream import UpstreamPool
from portal.service_tls import CERT_FILE, KEY_FILE, WrongCertificate, check_peer, make_certificate


def test_the_certificate_and_key_are_private_and_the_pin_is_the_certificates(tmp_path):
    pin = make_certificate(tmp_path, "abc123")
    for name in (CERT_FILE, KEY_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    der = ssl.PEM_cert_to_DER_cert((tmp_path / CERT_FILE).read_text())
    assert pin == hashlib.sha256(der).hexdigest()
    assert make_certificate(tmp_path / ".." / tmp_path.name, "abc123") != pin  # a new key each launch


async def _serve(cert_dir, handler):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_dir / CERT_FILE, cert_dir / KEY_FILE)
    return await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)


def test_the_pool_sends_nothing_to_a_server_with_another_certificate(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    pin = make_certificate(ours, "ours")
    make_certificate(theirs, "theirs")
    received = {"impostor": b"", "real": b""}

    def handler(name):
        async def handle(reader, writer):
            try:
                received[name] += await reader.read(65536)
            except (ConnectionError, ssl.SSLError):
                pass
            writer.close()
        return handle

    async def main():
        impostor = await _serve(theirs, handler("impostor"))
        real = await _serve(ours, handler("real"))
        pool = UpstreamPool()
        try:
            with pytest.raises(RequestFailed) as failed:
                await pool.connect("127.0.0.1", impostor.sockets[0].getsockname()[1], 5, pin)
            assert failed.value.kind == "impostor"
            conn, reused = await pool.connect("127.0.0.1", real.sockets[0].getsockname()[1], 5, pin)
            assert not reused
            conn.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.2)
            conn.close()
        finally:
            impostor.close()
            real.close()

    asyncio.run(main())
    assert received == {"impostor": b"", "real": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"}


def test_a_plain_http_server_is_not_taken_for_the_service(tmp_path):
    pin = make_certificate(tmp_path, "ours")

    async def handler(reader, writer):
        await reader.read(100)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    async def main():
        plain = await asyncio.start_server(handler, "127.0.0.1", 0)
        try:
            with pytest.raises(RequestFailed) as failed:
                await UpstreamPool().connect("127.0.0.1", plain.sockets[0].getsockname()[1], 5, pin)
            assert failed.value.kind == "impostor"
        finally:
            plain.close()

    asyncio.run(main())


def test_check_peer_wants_the_pinned_certificate():
    with pytest.raises(WrongCertificate):
        check_peer(None, "00" * 32)
