"""Download images from untrusted URLs without becoming an SSRF proxy.

Every hop (the first URL and each redirect) is parsed, its hostname resolved
once, and every resolved address vetted; the request then goes to the vetted
IP literal, so a DNS answer that changes between check and connect (rebinding)
cannot redirect us. For https the TLS layer still sends SNI for, and verifies
the certificate against, the original hostname (pinned for both http and https).
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from pipeline.compat import response_socket
from pipeline.errors import PoisonRecord, TransientError

logger = logging.getLogger(__name__)

ALLOW_LIST_ENV = "FACEMATCH_FETCH_ALLOW_LIST"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AllowEntry = ipaddress.IPv4Network | ipaddress.IPv6Network | str

# Names that reach a cloud metadata service even where DNS is "private".
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data"})
_METADATA_ADDRS = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TRANSIENT_4XX = frozenset({408, 429})
_CHUNK = 64 * 1024
# identity: a compressed body would make Content-Length meaningless for the cap.
_HEADERS = {"User-Agent": "FaceMatch-embedder/1", "Accept": "image/*", "Accept-Encoding": "identity"}


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for one download; allow_list entries may be CIDR strings or hostnames."""

    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 20.0  # wall clock for all hops and the body
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3  # 0 refuses every redirect
    allow_list: tuple[AllowEntry, ...] = ()
    allowed_schemes: tuple[str, ...] = ("http", "https")
    ca_bundle: str | None = None  # extra trust root for private object stores

    def __post_init__(self) -> None:
        # Normalize strings once, so callers may pass ("127.0.0.1/32", "localhost") and matching never re-parses.
        entries = tuple(_parse_allow_entry(e) if isinstance(e, str) else e for e in self.allow_list)
        object.__setattr__(self, "allow_list", entries)
        schemes = tuple(s.lower() for s in self.allowed_schemes)
        if not set(schemes) <= {"http", "https"}:
            raise ValueError(f"allowed_schemes {schemes} may only contain http and https")
        object.__setattr__(self, "allowed_schemes", schemes)
        if min(self.connect_timeout_s, self.read_timeout_s, self.total_timeout_s, self.max_bytes) <= 0:
            raise ValueError("fetch timeouts and max_bytes must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")


def parse_allow_list(text: str) -> tuple[AllowEntry, ...]:
    """Parse a comma-separated list like "127.0.0.1/32,localhost,10.0.0.0/8"."""
    return tuple(_parse_allow_entry(item) for item in text.split(",") if item.strip())


def _parse_allow_entry(item: str) -> AllowEntry:
    text = item.strip()
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        pass
    host = _ascii_host(text)
    if not host or any(c in host for c in "/:@[] "):
        raise ValueError(f"allow-list entry {item!r} is neither a CIDR network nor a hostname")
    return host


def _ascii_host(host: str) -> str | None:
    """Lower-case IDNA form without the trailing dot, or None if not encodable."""
    try:
        return host.strip().rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


def _blocked_reason(addr: IPAddress) -> str | None:
    """Why connecting to addr is unsafe, or None for a public address."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = addr.ipv4_mapped or addr.sixtofour
        if inner is None and addr in _NAT64:
            inner = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if inner is not None:
            reason = _blocked_reason(inner)
            return f"{reason} (embeds IPv4 {inner})" if reason else None
        if addr.is_site_local:
            return "site-local (fec0::/10)"
    checks = (
        (addr.is_unspecified, "unspecified"),
        (addr.is_loopback, "loopback"),
        (addr in _METADATA_ADDRS, "the cloud metadata endpoint"),
        (addr.is_link_local, "link-local"),
        (addr.version == 4 and addr in _CGNAT, "carrier-grade NAT (100.64.0.0/10)"),
        (addr.is_multicast, "multicast"),
        (addr.is_private, "private"),
        (addr.is_reserved, "reserved"),
        (not addr.is_global, "not globally routable"),
    )
    return next((reason for hit, reason in checks if hit), None)


def _shown(addr: IPAddress) -> tuple[str, str]:
    """(how to print addr, the allow-list entry that would admit it), mapped IPv4 kept readable."""
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    return (f"::ffff:{mapped}", f"{mapped}/32") if mapped else (str(addr), f"{addr}/{addr.max_prefixlen}")


def _in_allowed_network(addr: IPAddress, allow_list: tuple[AllowEntry, ...]) -> bool:
    inner = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    return any(not isinstance(e, str) and (addr in e or (inner is not None and inner in e)) for e in allow_list)


@dataclass(frozen=True)
class _Target:
    """One vetted hop: where to connect and what to say in Host/SNI."""

    scheme: str
    host: str  # ASCII hostname or IP literal, for messages, Host and SNI
    port: int
    host_header: str
    path_query: str
    addresses: tuple[IPAddress, ...]

    def url_for(self, addr: IPAddress) -> str:
        literal = f"[{addr}]" if addr.version == 6 else str(addr)
        return urlunsplit((self.scheme, f"{literal}:{self.port}", self.path_query, "", ""))


def _invalid(message: str) -> PoisonRecord:
    return PoisonRecord("invalid_url", message)


def _parse_target(url: str, schemes: tuple[str, ...]) -> tuple[str, str, int, str, str]:
    """(scheme, ascii host, port, Host header, path+query) or PoisonRecord("invalid_url")."""
    if not isinstance(url, str) or not url.strip():
        raise _invalid("image URL is empty")
    # urlsplit silently drops tabs/newlines while other parsers keep them.
    if any(ord(c) < 0x21 or c in "\x7f\\" for c in url):
        raise _invalid("image URL contains whitespace, control characters or backslashes")
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise _invalid(f"URL scheme {parts.scheme or '(none)'!r} is not allowed (allowed: {', '.join(schemes)})")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise _invalid(f"URL for host {parts.hostname} has an invalid port") from None
    if parts.username is not None or parts.password is not None:
        raise _invalid(f"URL for host {parts.hostname} carries credentials; refusing to send them")
    host = _ascii_host(parts.hostname or "")
    if not host:
        raise _invalid("URL has no valid hostname")
    literal = f"[{host}]" if ":" in host else host
    host_header = literal if parts.port is None else f"{literal}:{port}"
    path_query = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port, host_header, path_query


def _resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    literal = _ip_or_none(host)
    if literal is not None:
        return (literal,)
    try:  # no timeout here: the system resolver's own (resolv.conf) bounds it, outside total_timeout_s
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransientError("fetch_dns", f"cannot resolve host {host}: {exc.strerror or exc}") from None
    except UnicodeError:
        raise _invalid(f"hostname {host!r} cannot be resolved (bad IDNA label)") from None
    addrs = tuple(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
    if not addrs:
        raise TransientError("fetch_dns", f"host {host} resolved to no addresses")
    return addrs


def _vet_url(url: str, policy: FetchPolicy) -> _Target:
    """Parse url, resolve its host once and refuse unsafe addresses (PoisonRecord)."""
    scheme, host, port, host_header, path_query = _parse_target(url, policy.allowed_schemes)
    host_allowed = host in policy.allow_list
    if host in _METADATA_HOSTS and not host_allowed:
        raise PoisonRecord(
            "fetch_blocked",
            f"refusing to fetch from host {host}: it is a cloud metadata hostname; "
            f"allow-list it with {ALLOW_LIST_ENV} if this is really intended",
        )
    addresses = _resolve(host, port)
    for addr in addresses:
        reason = _blocked_reason(addr)
        if reason and not host_allowed and not _in_allowed_network(addr, policy.allow_list):
            shown, entry = _shown(addr)
            raise PoisonRecord(
                "fetch_blocked",
                f"refusing to fetch from host {host}: address {shown} is {reason}; allow-list it with "
                f"{ALLOW_LIST_ENV} (e.g. {entry} or {host}) if this is intended",
            )
    return _Target(scheme, host, port, host_header, path_query, addresses)


# Older requests never calls the adapter hook below, so https would be verified against the IP.
if not hasattr(HTTPAdapter, "build_connection_pool_key_attributes"):
    raise ImportError("FaceMatch's image fetcher needs requests>=2.32.3")


class _PinnedAdapter(HTTPAdapter):
    """Connects to the IP literal in the URL but does TLS SNI and cert checks for the Host name."""

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        name = _tls_name(str(request.headers.get("Host") or ""))
        if host_params.get("scheme") == "https" and name:
            # Both keys are part of urllib3's pool key, so pools never mix names.
            pool_kwargs["server_hostname"] = name
            pool_kwargs["assert_hostname"] = name
        return host_params, pool_kwargs


def _tls_name(host_header: str | None) -> str | None:
    """The hostname to use for SNI, or None when the URL named an IP literal anyway."""
    if not host_header or host_header.startswith("["):
        return None
    name = host_header.split(":", 1)[0]
    return None if _ip_or_none(name) else name


def _ip_or_none(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _cause_text(exc: BaseException) -> str:
    """The innermost OS-level reason, without URLs (they may carry tokens)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        reason = getattr(seen.args[0], "reason", None) if seen.args else None
        seen = reason if isinstance(reason, BaseException) else (seen.__cause__ or seen.__context__)
    return type(exc).__name__


def _connect_failed(exc: requests.ConnectionError) -> bool:
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(exc, requests.ConnectTimeout) or isinstance(reason, urllib3.exceptions.NewConnectionError)


def _deadline_error(target: _Target, policy: FetchPolicy) -> TransientError:
    return TransientError(
        "fetch_timeout", f"host {target.host}: total deadline of {policy.total_timeout_s:g}s exceeded"
    )


class ImageFetcher:
    """Downloads image bytes from untrusted URLs under a FetchPolicy (one instance per thread)."""

    def __init__(self, policy: FetchPolicy | None = None) -> None:
        self.policy = policy or FetchPolicy()
        session = requests.Session()
        # Proxies or .netrc from the environment would bypass the address vetting or leak credentials.
        session.trust_env = False
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        adapter = _PinnedAdapter(max_retries=0)  # the runner owns retries
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers.update(_HEADERS)
        self._session = session

    def close(self) -> None:
        """Release pooled connections."""
        self._session.close()

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def fetch(self, url: str) -> bytes:
        """Return the body at url; raise PoisonRecord or TransientError with a precise reason."""
        t0 = time.monotonic()
        deadline = t0 + self.policy.total_timeout_s
        current = url
        for _hop in range(self.policy.max_redirects + 1):
            target = _vet_url(current, self.policy)
            response = self._send(target, deadline)
            try:
                if response.status_code not in _REDIRECTS:
                    _check_status(response, target)
                    body = self._read_body(response, target, deadline)
                    logger.debug("fetched %d bytes from %s in %.3fs", len(body), target.host, time.monotonic() - t0)
                    return body
                location = response.headers.get("Location")
                if not location:
                    code = response.status_code
                    raise PoisonRecord(f"fetch_http_{code}", f"host {target.host} sent a {code} without Location")
                current = urljoin(current, location)
            finally:
                response.close()
        raise PoisonRecord(
            "too_many_redirects",
            f"gave up after {self.policy.max_redirects} redirects; host {target.host} "
            f"redirected again to host {urlsplit(current).hostname}",
        )

    def _send(self, target: _Target, deadline: float) -> requests.Response:
        """GET the vetted target, trying each vetted address until one connects."""
        failure: requests.ConnectionError | None = None
        for addr in target.addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _deadline_error(target, self.policy)
            timeouts = (min(self.policy.connect_timeout_s, remaining), min(self.policy.read_timeout_s, remaining))
            try:
                return self._session.get(
                    target.url_for(addr),
                    headers={"Host": target.host_header},
                    timeout=timeouts,
                    stream=True,
                    allow_redirects=False,
                    verify=self.policy.ca_bundle or True,
                )
            except requests.exceptions.SSLError as exc:
                # A bad certificate will not fix itself within our retry window.
                raise PoisonRecord("fetch_tls", f"TLS with host {target.host} failed: {_cause_text(exc)}") from None
            except requests.ConnectionError as exc:
                if not _connect_failed(exc):
                    raise self._broken(exc, target, deadline) from None
                failure = exc
            except requests.Timeout as exc:  # ReadTimeout: no response headers in time
                raise self._broken(exc, target, deadline) from None
        if failure is None:  # the loop above returns or sets it on every path
            raise RuntimeError(f"no address of {target.host} was tried")
        raise self._broken(failure, target, deadline) from None

    def _broken(self, exc: Exception, target: _Target, deadline: float) -> TransientError:
        """Map a network failure to a TransientError naming the host and the phase."""
        if time.monotonic() >= deadline:
            return _deadline_error(target, self.policy)
        where = f"host {target.host} port {target.port}"
        if isinstance(exc, requests.ConnectTimeout):
            return TransientError("fetch_timeout", f"connecting to {where} timed out")
        if isinstance(exc, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return TransientError("fetch_timeout", f"{where} sent nothing for {self.policy.read_timeout_s:g}s")
        return TransientError("fetch_connection", f"connection to {where} failed: {_cause_text(exc)}")

    def _read_body(self, response: requests.Response, target: _Target, deadline: float) -> bytes:
        """Stream the body, aborting past max_bytes or the wall-clock deadline."""
        cap = self.policy.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            raise PoisonRecord(
                "image_too_large", f"host {target.host} declares {declared} bytes, over the cap of {cap} bytes"
            )
        body = bytearray()
        # read1 returns after one recv, so the deadline is checked between network reads (urllib3>=2.1).
        reader = getattr(response.raw, "read1", response.raw.read)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _deadline_error(target, self.policy)
            _set_read_timeout(response, min(self.policy.read_timeout_s, remaining))
            try:
                chunk = reader(_CHUNK, decode_content=True)
            except urllib3.exceptions.DecodeError:
                raise PoisonRecord("fetch_bad_encoding", f"host {target.host} sent an undecodable body") from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise self._broken(exc, target, deadline) from None
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > cap:
                raise PoisonRecord(
                    "image_too_large", f"body from host {target.host} exceeded the cap of {cap} bytes; download aborted"
                )


def _set_read_timeout(response: requests.Response, timeout: float) -> None:
    """Shrink the socket timeout so one slow recv cannot outlive the overall deadline."""
    sock = response_socket(response.raw)
    if sock is not None:
        sock.settimeout(timeout)


def _check_status(response: requests.Response, target: _Target) -> None:
    """Raise for non-2xx: 5xx, 408 and 429 may pass, other codes never will."""
    code = response.status_code
    if 200 <= code < 300:
        return
    message = f"host {target.host} answered HTTP {code} {response.reason or ''}".rstrip()
    if code >= 500 or code in _TRANSIENT_4XX:
        retry_after = response.headers.get("Retry-After")
        suffix = f" (Retry-After: {retry_after[:32]})" if retry_after else ""
        raise TransientError(f"fetch_http_{code}", message + suffix)
    raise PoisonRecord(f"fetch_http_{code}", message)
