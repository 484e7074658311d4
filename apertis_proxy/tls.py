"""TLS on the listening sockets: `[server] tls_cert` and `tls_key`.

The certificate and key are loaded into a fresh `ssl.SSLContext` at start-up
and again on SIGHUP; the listener asks for the current context for every new
connection, so a renewed certificate takes effect without a restart while
connections already open keep the one they started with.  A reload that fails
(a missing file, a key that does not match) is logged and the previous
certificate stays in use.
"""
from __future__ import annotations

import logging
import ssl

log = logging.getLogger("apertis_proxy.tls")


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A server-side context for HTTP/1.1 over TLS 1.2 or newer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    context.set_alpn_protocols(["http/1.1"])
    return context


class ServerCertificate:
    """The listener's current SSL context, reloadable from the same files."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        try:
            self.context = server_context(cert_path, key_path)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load tls_cert {cert_path} / tls_key {key_path}: {exc}") from None
        self.reloads = 0

    def __call__(self) -> ssl.SSLContext:
        return self.context

    def reload(self) -> bool:
        try:
            context = server_context(self.cert_path, self.key_path)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate not reloaded, the previous one stays in use: %s", exc)
            return False
        self.context = context
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert_path)
        return True
