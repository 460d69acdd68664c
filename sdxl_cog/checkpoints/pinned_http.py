"""HTTP GET to an address already looked up and checked, not to whatever the name resolves to later.

A host name that is checked at one lookup and connected to at another can answer differently in between
(DNS rebinding: a public address for the check, then a private one for the connection). So the caller
resolves once (`addresses`), judges those addresses, and `get` connects to the one it chose. The URL,
the Host header, TLS's server name (SNI) and the certificate check all keep the name, exactly as for an
ordinary request; only the TCP connection is made to the given address. It is done with requests'
transport-adapter API and urllib3's `server_hostname`/`assert_hostname` pool settings, no monkey-patching.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

DEFAULT_PORTS = {"http": 80, "https": 443}


def addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address `host` resolves to now (one lookup; socket.gaierror if it does not resolve)."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    # An IPv6 link-local answer carries its interface as "%eth0"; the address itself is what is judged.
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


class _PinnedAdapter(HTTPAdapter):
    """Verifies TLS against `hostname` while the request's URL names the address it connects to."""

    def __init__(self, hostname: str):
        self._hostname = hostname
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs):
        # urllib3 uses these for HTTPS pools only (and drops them for plain HTTP).
        kwargs.update(server_hostname=self._hostname, assert_hostname=self._hostname)
        super().init_poolmanager(*args, **kwargs)


def get(url: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address, timeout: float) -> requests.Response:
    """GET `url` (streamed, redirects not followed) over a connection to `address`."""
    parts = urlsplit(url)
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    literal = f"[{address}]" if address.version == 6 else str(address)
    pinned_url = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
    host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    session = requests.Session()
    session.mount(f"{parts.scheme}://", _PinnedAdapter(parts.hostname))
    try:
        return session.get(
            pinned_url, headers={"Host": host_header}, stream=True, allow_redirects=False, timeout=timeout
        )
    finally:
        # The response keeps its own connection; the session's pools close once it is done with.
        session.close()
