"""Hosts and origins as the edge compares them (RFC 6454 "The Web Origin Concept", RFC
9110 §7.2 ``Host``): pure parsing, no aiohttp, so that the settings (``--public-origin``)
and the CLI load without the web server."""

from __future__ import annotations

import ipaddress
import re
from typing import Final

__all__ = ["DEFAULT_PORTS", "Origin", "format_origin", "parse_host", "parse_origin"]

DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_HOST: Final = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_.-]+))(?::(?P<port>[0-9]{1,5}))?"
)
_ORIGIN: Final = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>.*)")

Origin = tuple[str, str, int]
"""An origin (RFC 6454) as compared here: scheme (``http``/``https``), host (lower case;
IPv6 without brackets), port (the scheme's default when none is given)."""


def parse_host(text: str) -> tuple[str, int | None] | None:
    """Split a ``Host`` header (or an origin's authority) into host and port.

    :param text: ``name``, ``name:port``, ``1.2.3.4:port``, ``[v6]`` or ``[v6]:port``.
    :returns: the host in lower case (IPv6 without brackets) and the port (``None`` when
        absent); ``None`` when ``text`` is none of those forms or the port is not 1-65535.
    """
    match = _HOST.fullmatch(text.strip())
    if match is None:
        return None
    port = match["port"]
    if port is not None and not 0 < int(port) <= 65535:
        return None
    if match["ipv6"] is not None:
        try:
            host = str(ipaddress.IPv6Address(match["ipv6"]))
        except ValueError:
            return None
    else:
        host = match["name"].lower()
    return host, int(port) if port is not None else None


def parse_origin(text: str) -> Origin | None:
    """An ``Origin`` header or ``--public-origin`` value as an :data:`Origin`.

    :param text: exactly ``http(s)://host[:port]``: no path, query, fragment or user.
    :returns: ``None`` for anything else, ``null`` included.
    """
    match = _ORIGIN.fullmatch(text.strip())
    if match is None:
        return None
    scheme = match["scheme"].lower()
    authority = parse_host(match["authority"])
    if scheme not in DEFAULT_PORTS or authority is None:
        return None
    host, port = authority
    return scheme, host, port if port is not None else DEFAULT_PORTS[scheme]


def format_origin(origin: Origin) -> str:
    """``origin`` as a browser writes it in ``Origin``: the port only when not the
    scheme's default, IPv6 in brackets."""
    scheme, host, port = origin
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" if port == DEFAULT_PORTS[scheme] else f"{scheme}://{shown}:{port}"
