"""Safety at the edge (DESIGN.md "Safety at the edge"): which requests the server answers
at all, and the headers every answer carries.

Every request passes three checks, in this order, before its handler runs
(:func:`install` puts :func:`middleware` inside :func:`server.errors.json_errors`, so
each refusal is a JSON error and no handler, file or log is touched):

1. **Host** (:meth:`Edge.answers_to`): the ``Host`` header must name this server, else
   ``421 misdirected_request`` (RFC 9110 §15.5.20, 421 Misdirected Request: "the server
   is unable or unwilling to produce an authoritative response for the target URI"). This
   defeats DNS rebinding: a page of ``attacker.example`` whose name is rebound to
   127.0.0.1 reaches this port, but its requests still say ``Host: attacker.example``.
   Answered: loopback names (``localhost``, any ``127.x.y.z``, ``[::1]``), the
   ``--host`` address (unless it is ``0.0.0.0`` or ``::``), the hosts of every
   ``--public-origin``, and an IP literal equal to the local address the connection
   arrived on: rebinding needs a *name* the attacker controls, and a page whose origin is
   our own IP address was served by us. So ``--host 0.0.0.0`` answers
   ``http://192.168.1.5:8080/`` on the LAN with no more flags; a name (``chat.lan``, a
   public one behind nginx) needs ``--public-origin``. A port in ``Host`` is not
   compared here (the origin check below compares it). A request with no ``Host``
   (HTTP/1.0) passes: browsers always send one.
2. **Same origin for unsafe methods** (anything but GET, HEAD, OPTIONS): a
   ``Sec-Fetch-Site`` other than ``same-origin`` or ``none`` (W3C Fetch Metadata
   Request Headers; another port of 127.0.0.1 is ``same-site``), or an ``Origin`` that is
   not ours, is ``403 cross_site``. Ours: ``<scheme>://<Host>`` of the request itself,
   and every ``--public-origin``; ``Origin: null`` is never ours. A request with neither
   header (curl, scripts) passes. This is the CSRF defence of the OWASP Cross-Site
   Request Forgery Prevention Cheat Sheet ("Fetch Metadata headers", "Verifying origin
   with standard headers"), with or without accounts.
3. **JSON bodies**: an unsafe request *with a body* whose ``Content-Type`` is not
   ``application/json`` (parameters such as ``charset`` allowed) is
   ``415 unsupported_media_type`` (RFC 9110 §15.5.16). A cross-site form or ``no-cors``
   fetch can only send ``text/plain``, form-encoded or multipart bodies without a CORS
   preflight (Fetch Standard, "CORS-safelisted request-header"), and this server grants
   no preflight. A request without a body (create with defaults, stop) needs no
   ``Content-Type``.

Every answer gets :data:`HEADERS` (``X-Content-Type-Options: nosniff``, the page's
Content-Security-Policy with CSP Level 3 ``frame-ancestors 'none'`` and, for browsers
without it, ``X-Frame-Options: DENY`` (RFC 7034), ``Referrer-Policy: no-referrer``) and
``Server: chatledger`` with no versions, from ``on_response_prepare``
(:func:`secure_headers`), so streamed answers (SSE, files) and the router's own 404/405
get them too.

Not covered: aiohttp answers a request it cannot parse (a malformed request line or
header) with its own plain-text ``400`` before any application code runs; aiohttp 3.14
has no supported hook for that answer (aio-libs/aiohttp issue 3287), so it carries
neither JSON nor these headers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from .errors import ApiError
from .origins import DEFAULT_PORTS, Origin, format_origin, parse_host, parse_origin

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "HEADERS",
    "SAFE_METHODS",
    "SERVER",
    "Edge",
    "Origin",
    "format_origin",
    "install",
    "middleware",
    "parse_host",
    "parse_origin",
    "secure_headers",
]

SAFE_METHODS: Final = frozenset({hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS})
"""Methods that change nothing (RFC 9110 §9.2.1); every other one is checked as unsafe."""

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
    "object-src 'none'"
)
"""The page's policy (DESIGN.md): its own files only, no inline script or style, never
framed (CSP Level 3 ``frame-ancestors``), no ``<base>``, no plugins."""

HEADERS: Final[Mapping[str, str]] = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
"""Headers of every answer (a handler that set one of them keeps its own)."""

SERVER: Final = "chatledger"
"""The ``Server`` header: the product, no version of it, of Python or of aiohttp."""

_UNSPECIFIED: Final = frozenset({"0.0.0.0", "::", ""})


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone is no part
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return address


@dataclass(frozen=True, slots=True)
class Edge:
    """What this server answers to (see the module's docstring).

    :ivar names: host names and IP literals (lower case, IPv6 without brackets) answered
        besides the loopback ones and the connection's own address.
    :ivar origins: origins besides ``<scheme>://<Host>`` whose unsafe requests are ours.
    """

    names: frozenset[str]
    origins: frozenset[Origin]

    @classmethod
    def of(cls, *, host: str, public_origins: Iterable[str]) -> Edge:
        """The edge of a server listening on ``host`` (``--host``) and served under
        ``public_origins`` (``--public-origin`` values).

        :raises ValueError: a public origin is not ``http(s)://host[:port]``.
        """
        origins = set()
        for text in public_origins:
            origin = parse_origin(text.rstrip("/"))
            if origin is None:
                raise ValueError(f"not an origin (http(s)://host[:port]): {text!r}")
            origins.add(origin)
        names = {host for _, host, _ in origins}
        listening = parse_host(host) or parse_host(f"[{host}]")  # an IPv6 --host: no []
        if host not in _UNSPECIFIED and listening is not None:
            names.add(listening[0])
        return cls(names=frozenset(names), origins=frozenset(origins))

    def answers_to(self, host: str, local: str | None = None) -> bool:
        """Whether a request with ``Host: <host>`` is ours.

        :param host: the ``Host`` header (a port in it is ignored).
        :param local: the local address of the connection the request came on.
        """
        parsed = parse_host(host)
        if parsed is None:
            return False
        name = parsed[0]
        if name == "localhost" or name in self.names:
            return True
        address = _ip(name)
        if address is None:
            return False
        return address.is_loopback or (local is not None and address == _ip(local))

    def is_ours(self, origin: str, *, scheme: str, host: str | None) -> bool:
        """Whether an ``Origin`` header names this server.

        :param origin: the header's value.
        :param scheme: the request's scheme (``http``, ``https``).
        :param host: the request's ``Host`` header (``None``: absent).
        """
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        if parsed in self.origins:
            return True
        own = parse_host(host) if host is not None else None
        if own is None or scheme not in DEFAULT_PORTS:
            return False
        return parsed == (scheme, own[0], own[1] or DEFAULT_PORTS[scheme])

    def check(self, request: web.BaseRequest) -> None:
        """Refuse ``request`` if it fails a check of the module's docstring.

        :raises ApiError: ``421 misdirected_request``, ``403 cross_site`` or
            ``415 unsupported_media_type``.
        """
        host = request.headers.get(hdrs.HOST)
        if host is not None and not self.answers_to(host, _local_address(request)):
            raise ApiError(
                421,
                "misdirected_request",
                "this server does not answer to that host name (see --public-origin)",
            )
        if request.method in SAFE_METHODS:
            return
        sites = request.headers.getall("Sec-Fetch-Site", [])
        origins = request.headers.getall(hdrs.ORIGIN, [])
        if any(site.strip().lower() not in ("same-origin", "none") for site in sites) or not all(
            self.is_ours(origin, scheme=request.scheme, host=host) for origin in origins
        ):
            raise ApiError(
                403, "cross_site", "requests that change something must come from this page"
            )
        if request.body_exists and not (
            hdrs.CONTENT_TYPE in request.headers and request.content_type == "application/json"
        ):
            raise ApiError(
                415,
                "unsupported_media_type",
                "the request body must be Content-Type: application/json",
            )


def _local_address(request: web.BaseRequest) -> str | None:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return sockname[0] if isinstance(sockname, tuple) and sockname else None


def middleware(edge: Edge) -> Middleware:
    """The aiohttp middleware that runs :meth:`Edge.check` before every handler (the
    router's 404/405 included). Its refusals are :class:`~server.errors.ApiError`: put it
    inside :func:`~server.errors.json_errors`."""

    @web.middleware
    async def safety_at_the_edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        edge.check(request)
        return await handler(request)

    return safety_at_the_edge


async def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: add :data:`HEADERS` and set ``Server`` to :data:`SERVER`
    (aiohttp has set its own ``Python/x aiohttp/y`` by then)."""
    headers = response.headers
    for name, value in HEADERS.items():
        headers.setdefault(name, value)
    headers[hdrs.SERVER] = SERVER


def install(app: web.Application, settings: Settings) -> None:
    """Guard ``app`` as the module's docstring says, for ``settings.host`` and
    ``settings.public_origins``. Call it after the application was made with
    :func:`~server.errors.json_errors` as its middleware, before it starts.

    :raises ValueError: a public origin is not ``http(s)://host[:port]``.
    """
    edge = Edge.of(host=settings.host, public_origins=settings.public_origins)
    app.middlewares.append(middleware(edge))
    app.on_response_prepare.append(secure_headers)
