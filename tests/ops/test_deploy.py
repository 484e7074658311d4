"""Running it as a service: TLS on the listener (reloaded on SIGHUP), the client address behind trusted
proxies, the systemd unit and the container image."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import anthropic
import pytest

from apertis_proxy.settings import Settings, check
from tests.support.processes import ServeProcess, wait_for

HAIKU = "claude-haiku-4-5-20251001"
MESSAGE = {"model": HAIKU, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "docs" / "deploy"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A test CA and two server certificates for 127.0.0.1 it signed (a.pem and b.pem, keys a.key, b.key)."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=apertis test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    for name in ("a", "b"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=server {name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def install_cert(pki: Path, workdir: Path, name: str) -> tuple[str, str]:
    """Copy certificate `name` to the fixed paths the server is configured with."""
    shutil.copy(pki / f"{name}.pem", workdir / "server.pem")
    shutil.copy(pki / f"{name}.key", workdir / "server.key")
    return str(workdir / "server.pem"), str(workdir / "server.key")


def served_certificate_cn(port: int, pki: Path) -> str:
    """Open a new TLS connection, verified against the test CA; the server certificate's CN."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            subject = dict(item[0] for item in tls.getpeercert()["subject"])
    return subject["commonName"]


def sdk_client(base_url: str, key: str, pki: Path) -> anthropic.AsyncAnthropic:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    return anthropic.AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0,
                                    http_client=anthropic.DefaultAsyncHttpxClient(verify=context))


@needs_openssl
async def test_the_sdk_talks_tls_and_a_reload_serves_the_new_certificate(gateway_env, mock_upstream, pki,
                                                                          tmp_path):
    cert, key_file = install_cert(pki, tmp_path, "a")
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    gw = await gateway_env.start(tls_cert=cert, tls_key=key_file)
    assert gw.base_url.startswith("https://")
    async with sdk_client(gw.base_url, key, pki) as client:
        message = await client.messages.create(**MESSAGE)
        assert message.content
        assert await asyncio.to_thread(served_certificate_cn, gw.port, pki) == "server a"

        # Plain HTTP on the TLS port fails its handshake and nothing else.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        await writer.drain()
        assert not (await reader.read(65536)).startswith(b"HTTP/1.1 200")
        writer.close()

        install_cert(pki, tmp_path, "b")
        gw.reload_certificate()                   # what SIGHUP calls
        assert await asyncio.to_thread(served_certificate_cn, gw.port, pki) == "server b"
        assert (await client.messages.create(**MESSAGE)).content

        # A reload that fails (a key that does not match) keeps the certificate in use.
        shutil.copy(pki / "a.key", tmp_path / "server.key")
        gw.reload_certificate()
        assert await asyncio.to_thread(served_certificate_cn, gw.port, pki) == "server b"
        assert (await client.messages.create(**MESSAGE)).content
    rows = await gateway_env.usage_rows(n=3)
    assert [r["status"] for r in rows] == [200, 200, 200]


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """True when the server closes the connection within `within` seconds without sending anything."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionResetError:
        return True
    except asyncio.TimeoutError:
        return False


@needs_openssl
async def test_tls_handshakes_count_against_the_connection_cap_and_time_out(gateway_env, pki, tmp_path):
    """Connections that never finish their TLS handshake hold a descriptor each: they count against
    max_connections from their first byte, and get header_timeout to finish."""
    cert, key_file = install_cert(pki, tmp_path, "a")
    gw = await gateway_env.start(tls_cert=cert, tls_key=key_file, max_connections=3, header_timeout=1.5)
    stalled = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(3)]
    await asyncio.sleep(0.2)                       # accepted: three handshakes under way
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    assert await closed_by_server(reader, 1.0)     # the fourth is closed before its handshake
    writer.close()
    # The stalled ones are closed once header_timeout has passed; then TLS clients are served again.
    assert [await closed_by_server(r, 10.0) for r, _ in stalled] == [True] * 3
    for _, w in stalled:
        w.close()
    assert await asyncio.to_thread(served_certificate_cn, gw.port, pki) == "server a"


@needs_openssl
async def test_sighup_reloads_the_certificate_of_a_running_server(tmp_path, pki):
    cert, key_file = install_cert(pki, tmp_path, "a")
    config = tmp_path / "apertis.toml"
    config.write_text(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key_file}"\n')
    db = str(tmp_path / "apertis.db")
    async with ServeProcess(tmp_path, db, "--config", str(config), "--workers", "2") as server:
        assert await asyncio.to_thread(served_certificate_cn, server.port, pki) == "server a"
        install_cert(pki, tmp_path, "b")
        server.send_signal(signal.SIGHUP)

        async def renewed() -> bool:
            names = {await asyncio.to_thread(served_certificate_cn, server.port, pki) for _ in range(4)}
            return names == {"server b"}           # both workers
        await wait_for(renewed, 20, "both workers to serve the new certificate")
        assert await server.stop() == 0, server.stderr


def test_tls_settings_are_checked(tmp_path):
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        check(Settings(tls_cert=str(pem)), "test")
    with pytest.raises(ValueError, match="tls_key .* is not a readable file"):
        check(Settings(tls_cert=str(pem), tls_key=str(tmp_path / "missing.key")), "test")
    with pytest.raises(ValueError, match="trusted_proxies: not a network address: 'ten'"):
        check(Settings(trusted_proxies=["10.0.0.0/8", "ten"]), "test")
    with pytest.raises(ValueError, match="trusted_proxies must be a list"):
        check(Settings(trusted_proxies="10.0.0.0/8"), "test")


XFF, FWD = "x-forwarded-for", "forwarded"


@pytest.mark.parametrize("trusted, header, headers, expected", [
    # No proxies configured, or the peer is not one of them: a forged header is ignored.
    ([], XFF, {"x-forwarded-for": "203.0.113.9"}, None),
    (["10.0.0.0/8"], XFF, {"x-forwarded-for": "203.0.113.9"}, None),
    # Through a trusted proxy: the right-most address that is not a trusted proxy.
    (["127.0.0.0/8"], XFF, {"x-forwarded-for": "198.51.100.1, 203.0.113.9"}, "203.0.113.9"),
    (["127.0.0.0/8", "10.0.0.0/8"], XFF, {"x-forwarded-for": "203.0.113.9, 10.1.1.1"}, "203.0.113.9"),
    (["127.0.0.1/32"], FWD, {"forwarded": 'for="[2001:db8::7]:4711";proto=https'}, "2001:db8::7"),
    # Only the header the proxies write is read: the other one is the client's.
    (["127.0.0.1/32"], XFF, {"x-forwarded-for": "198.51.100.1", "forwarded": "for=127.0.0.1"}, "198.51.100.1"),
    (["127.0.0.1/32"], FWD, {"forwarded": "for=198.51.100.1", "x-forwarded-for": "127.0.0.1"}, "198.51.100.1"),
    # A hop that is no address: the client is unknown, not the proxy before it.
    (["127.0.0.1/32"], XFF, {"x-forwarded-for": "unknown"}, "unknown"),
])
async def test_client_address_behind_proxies(gateway_env, mock_upstream, trusted, header, headers, expected):
    key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    gw = await gateway_env.start(trusted_proxies=trusted, forwarded_header=header)
    async with anthropic.AsyncAnthropic(base_url=gw.base_url, api_key=key, max_retries=0,
                                        default_headers=headers) as client:
        await client.messages.create(**MESSAGE)
    (row,) = await gateway_env.usage_rows(n=1)
    if expected is None:
        assert row["client"].startswith("127.0.0.1:")
    else:
        assert row["client"] == expected


def test_the_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    installed = shutil.which("apertis-proxy")
    if installed is None:
        pytest.skip("the apertis-proxy console script is not on PATH")
    # The unit names /opt/apertis-proxy; verify checks that the command exists, so point it at this install.
    unit = (DEPLOY / "apertis-proxy.service").read_text()
    assert "/opt/apertis-proxy/bin/apertis-proxy serve" in unit
    copy = tmp_path / "apertis-proxy.service"
    copy.write_text(unit.replace("/opt/apertis-proxy/bin/apertis-proxy", installed))
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_the_image_builds(tmp_path):
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("no Docker engine is running here (docker info fails)")
    tag = f"apertis-proxy-test:{os.getpid()}"
    built = subprocess.run(["docker", "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(REPO)],
                           capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stderr[-3000:]
    try:
        user = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
                              capture_output=True, text=True, timeout=120)
        assert user.stdout.strip() not in ("", "0")           # not root
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)


def healthcheck_command(port: int) -> str:
    """The Dockerfile's HEALTHCHECK command (shell form, its continuation lines joined), aimed at `port`."""
    text = (DEPLOY / "Dockerfile").read_text()
    start = text.index("HEALTHCHECK")
    block = text[start:text.index("\nENTRYPOINT", start)].replace("\\\n", " ")
    command = block.split(" CMD ", 1)[1].strip()
    assert ":8080/health" in command
    return command.replace(":8080/", f":{port}/")


def run_healthcheck(port: int, python: str) -> int:
    env = {**os.environ, "PATH": f"{Path(python).parent}:{os.environ['PATH']}"}
    return subprocess.run(["/bin/sh", "-c", healthcheck_command(port)], env=env, capture_output=True,
                          timeout=15).returncode


@needs_openssl
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_the_image_healthcheck_passes_over_plain_http_and_over_tls(gateway_env, mock_upstream, pki, tmp_path,
                                                                         tls):
    gateway_env.add_channel("main", mock_upstream)
    extra = dict(zip(("tls_cert", "tls_key"), install_cert(pki, tmp_path, "a"))) if tls else {}
    gw = await gateway_env.start(**extra)
    assert await asyncio.to_thread(run_healthcheck, gw.port, sys.executable) == 0
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert await asyncio.to_thread(run_healthcheck, port, sys.executable) != 0     # nothing listening: unhealthy
