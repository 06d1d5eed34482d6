"""ImageFetcher against a real local HTTP(S) server: SSRF guard, limits, error kinds."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import time
from pathlib import Path

import pytest

from pipeline.embedder.fetch import FetchPolicy, ImageFetcher, parse_allow_list
from pipeline.errors import PoisonRecord, TransientError
from tests.httpserver import drip, flaky, http_server, huge, not_found, redirect, respond, slow

__all__ = ["http_server"]  # the fixture is used by name

LOCAL = ("127.0.0.1/32",)
BODY = b"\xff\xd8\xff" + b"jpeg-ish" * 10


def fetcher(**overrides: object) -> ImageFetcher:
    """A fetcher with small limits so failure paths finish in well under a second."""
    values: dict[str, object] = {
        "connect_timeout_s": 1.0,
        "read_timeout_s": 0.4,
        "total_timeout_s": 1.0,
        "max_bytes": 64 * 1024,
        "allow_list": LOCAL,
    }
    values.update(overrides)
    return ImageFetcher(FetchPolicy(**values))  # type: ignore[arg-type]


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Answer getaddrinfo for the given names (one answer list per call); returns the names looked up."""
    real = socket.getaddrinfo
    looked_up: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host not in answers:
            return real(host, port, *args, **kwargs)
        looked_up.append(host)
        calls = looked_up.count(host)
        addrs = answers[host][min(calls, len(answers[host])) - 1].split(",")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0)) for a in addrs
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


# --- the SSRF guard ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1/x.jpg", "address 127.0.0.1 is loopback"),
        ("http://localhost/x.jpg", "is loopback"),
        ("http://169.254.169.254/latest/meta-data/", "address 169.254.169.254 is the cloud metadata endpoint"),
        ("http://10.1.2.3/x.jpg", "address 10.1.2.3 is private"),
        ("http://192.168.0.10/x.jpg", "is private"),
        ("http://[::1]/x.jpg", "address ::1 is loopback"),
        ("http://[::ffff:127.0.0.1]/x.jpg", "::ffff:127.0.0.1 is loopback (embeds IPv4 127.0.0.1)"),
        ("http://[::ffff:10.0.0.1]/x.jpg", "is private (embeds IPv4 10.0.0.1)"),
        ("http://[fe80::1]/x.jpg", "is link-local"),
        ("http://[fd12::1]/x.jpg", "is private"),
        ("http://100.64.1.1/x.jpg", "carrier-grade NAT"),
        ("http://0.0.0.0/x.jpg", "is unspecified"),
        ("http://224.0.0.1/x.jpg", "is multicast"),
        ("http://2130706433/x.jpg", "address 127.0.0.1 is loopback"),  # decimal-encoded IPv4
        ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata hostname"),
    ],
)
def test_internal_addresses_are_blocked(url: str, expected: str) -> None:
    with fetcher(allow_list=()) as f, pytest.raises(PoisonRecord) as err:
        f.fetch(url)
    assert err.value.reason == "fetch_blocked"
    assert expected in str(err.value)
    assert "FACEMATCH_FETCH_ALLOW_LIST" in str(err.value)


def test_block_message_names_host_but_not_query_token() -> None:
    with fetcher(allow_list=()) as f, pytest.raises(PoisonRecord) as err:
        f.fetch("http://127.0.0.1/img.jpg?X-Amz-Signature=sekrit")
    assert "host 127.0.0.1" in str(err.value)
    assert "sekrit" not in str(err.value)


def test_any_private_answer_blocks_a_mixed_dns_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"mixed.test": ["93.184.216.34,10.0.0.5"]})
    with fetcher(allow_list=()) as f, pytest.raises(PoisonRecord, match="address 10.0.0.5 is private") as err:
        f.fetch("http://mixed.test/x.jpg")
    assert err.value.reason == "fetch_blocked"


def test_allow_listed_local_server_is_fetched(http_server) -> None:  # type: ignore[no-untyped-def]
    site = http_server({"/face.jpg": BODY})
    with fetcher() as f:
        assert f.fetch(site.url("/face.jpg")) == BODY


def test_allow_list_by_hostname(http_server) -> None:  # type: ignore[no-untyped-def]
    site = http_server({"/face.jpg": BODY})
    with fetcher(allow_list=("localhost",)) as f:
        assert f.fetch(site.url("/face.jpg").replace("127.0.0.1", "localhost")) == BODY


def test_redirect_from_allowed_host_to_blocked_host_is_refused(http_server) -> None:  # type: ignore[no-untyped-def]
    site = http_server({"/to-metadata": redirect("http://169.254.169.254/latest/")})
    site.routes["/to-lo2"] = redirect(site.url("/x").replace("127.0.0.1", "127.0.0.2"))
    with fetcher() as f:
        for path, address in (("/to-metadata", "169.254.169.254"), ("/to-lo2", "127.0.0.2")):
            with pytest.raises(PoisonRecord, match=f"address {address} is") as err:
                f.fetch(site.url(path))
            assert err.value.reason == "fetch_blocked"


def test_redirects_are_followed_up_to_the_limit(http_server) -> None:  # type: ignore[no-untyped-def]
    site = http_server({"/a": redirect("/b"), "/b": redirect("/c", 301), "/c": BODY, "/loop": redirect("/loop")})
    with fetcher(max_redirects=2) as f:
        assert f.fetch(site.url("/a")) == BODY
        with pytest.raises(PoisonRecord) as err:
            f.fetch(site.url("/loop"))
    assert err.value.reason == "too_many_redirects"
    assert site.calls["/loop"] == 3  # the first request plus two redirects


def test_dns_rebinding_cannot_swap_the_address_after_the_check(http_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The name is resolved once; the connection goes to that address, not to a second answer."""
    site = http_server({"/face.jpg": BODY})
    port = site.base_url.rsplit(":", 1)[1]
    looked_up = fake_dns(monkeypatch, {"rebind.test": ["127.0.0.1", "10.0.0.1"]})
    with fetcher() as f:
        assert f.fetch(f"http://rebind.test:{port}/face.jpg") == BODY
    assert looked_up == ["rebind.test"]
    assert site.requests[-1].headers["Host"] == f"rebind.test:{port}"


# --- HTTP status and network failures ----------------------------------------------------------


def test_http_status_codes_map_to_error_kinds(http_server) -> None:  # type: ignore[no-untyped-def]
    site = http_server(
        {
            "/gone": not_found(),
            "/forbidden": respond(b"no", 403),
            "/busy": respond(b"", 429, headers={"Retry-After": "7"}),
            "/down": respond(b"", 503),
        }
    )
    with fetcher() as f:
        with pytest.raises(PoisonRecord) as poison:
            f.fetch(site.url("/gone"))
        assert poison.value.reason == "fetch_http_404"
        assert "host 127.0.0.1 answered HTTP 404" in str(poison.value)
        with pytest.raises(PoisonRecord) as poison:
            f.fetch(site.url("/forbidden"))
        assert poison.value.reason == "fetch_http_403"
        with pytest.raises(TransientError, match="Retry-After: 7") as transient:
            f.fetch(site.url("/busy"))
        assert transient.value.reason == "fetch_http_429"
        with pytest.raises(TransientError) as transient:
            f.fetch(site.url("/down"))
        assert transient.value.reason == "fetch_http_503"


def test_500_is_transient_and_a_retry_succeeds(http_server) -> None:  # type: ignore[no-untyped-def]
    site = http_server({"/flaky.jpg": flaky(BODY, failures=1, status=500)})
    with fetcher() as f:
        with pytest.raises(TransientError) as err:
            f.fetch(site.url("/flaky.jpg"))
        assert err.value.reason == "fetch_http_500"
        assert f.fetch(site.url("/flaky.jpg")) == BODY
    assert site.calls["/flaky.jpg"] == 2


def test_slow_headers_time_out_as_transient(http_server) -> None:  # type: ignore[no-untyped-def]
    site = http_server({"/slow": slow(5.0, BODY)})
    # A total deadline far away: only the 0.4 s read timeout can end this before the body comes at 5 s.
    with fetcher(total_timeout_s=30.0) as f, pytest.raises(TransientError) as err:
        f.fetch(site.url("/slow"))
    assert err.value.reason == "fetch_timeout"
    assert "sent nothing for 0.4s" in str(err.value)


@pytest.mark.parametrize("interval_s", [0.05, 8.0])
def test_dripping_body_stops_at_the_total_deadline(http_server, interval_s: float) -> None:  # type: ignore[no-untyped-def]
    """Each byte arrives within the read timeout, so only the wall-clock deadline can stop it.

    With 8 s gaps a deadline checked only between reads would overshoot to the next
    byte (8 s); the fetcher shrinks the socket timeout to what is left of the deadline.
    The bound is wide on purpose: it tells 0.6 s from 8 s on a loaded machine.
    """
    site = http_server({"/drip": drip(b"x" * 200, interval_s=interval_s)})
    started = time.monotonic()
    with fetcher(total_timeout_s=0.6, read_timeout_s=10.0) as f, pytest.raises(TransientError) as err:
        f.fetch(site.url("/drip"))
    assert err.value.reason == "fetch_timeout"
    assert "total deadline of 0.6s" in str(err.value)
    assert 0.55 < time.monotonic() - started < 4.0


def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with fetcher() as f, pytest.raises(TransientError, match="Connection refused") as err:
        f.fetch(f"http://127.0.0.1:{port}/x.jpg")
    assert err.value.reason == "fetch_connection"


def test_dns_failure_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*_args: object, **_kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with fetcher() as f, pytest.raises(TransientError, match="cannot resolve host images.example") as err:
        f.fetch("http://images.example/x.jpg")
    assert err.value.reason == "fetch_dns"


# --- size cap and URL validation ---------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_byte_cap_is_enforced(http_server, chunked: bool) -> None:  # type: ignore[no-untyped-def]
    # 8 GiB in at most the 1 s total deadline: only a fetcher that stops at the cap ends with image_too_large.
    site = http_server({"/huge": huge(8 * 1024**3, chunked=chunked), "/fits": b"y" * 64 * 1024})
    with fetcher() as f:
        with pytest.raises(PoisonRecord) as err:
            f.fetch(site.url("/huge"))
        assert len(f.fetch(site.url("/fits"))) == 64 * 1024  # exactly at the cap is fine
    assert err.value.reason == "image_too_large"
    assert ("declares 8589934592 bytes" in str(err.value)) is not chunked


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/_x",
        "ftp://example.com/a.jpg",
        "example.com/a.jpg",
        "",
        "http://",
        "http://user:pw@example.com/a.jpg",
        "http://example.com:99999/a.jpg",
        "http://exa mple.com/a.jpg",
        "http://example.com\\@127.0.0.1/a.jpg",
    ],
)
def test_bad_urls_are_invalid(url: str) -> None:
    with fetcher() as f, pytest.raises(PoisonRecord) as err:
        f.fetch(url)
    assert err.value.reason == "invalid_url"


def test_parse_allow_list() -> None:
    entries = parse_allow_list(" 127.0.0.1/32, localhost,10.0.0.0/8,,Images.Internal., ::1 ")
    assert entries == (
        ipaddress.ip_network("127.0.0.1/32"),
        "localhost",
        ipaddress.ip_network("10.0.0.0/8"),
        "images.internal",
        ipaddress.ip_network("::1/128"),
    )
    assert parse_allow_list("") == ()
    with pytest.raises(ValueError, match="neither a CIDR network nor a hostname"):
        parse_allow_list("10.0.0.0/33")


# --- https: pinned address, real hostname for SNI and certificate checks -----------------------


def _make_cert(tmp_path: Path, dns_name: str) -> tuple[str, str]:
    """A self-signed cert for dns_name that also lists 127.0.0.1, so an IP-based check would pass."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names = [x509.DNSName(dns_name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def test_https_is_pinned_with_sni_and_certificate_for_the_hostname(http_server, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert, key = _make_cert(tmp_path, "photos.test")
    site = http_server({"/face.jpg": BODY}, tls=(cert, key))
    port = site.base_url.rsplit(":", 1)[1]
    looked_up = fake_dns(monkeypatch, {"photos.test": ["127.0.0.1", "10.9.9.9"], "evil.test": ["127.0.0.1"]})
    with fetcher(ca_bundle=cert) as f:
        assert f.fetch(f"https://photos.test:{port}/face.jpg") == BODY
        # Same server and address, but the certificate does not name evil.test.
        with pytest.raises(PoisonRecord) as err:
            f.fetch(f"https://evil.test:{port}/face.jpg")
    assert err.value.reason == "fetch_tls"
    assert "host evil.test" in str(err.value)
    assert looked_up == ["photos.test", "evil.test"]
    assert site.sni_names[0] == "photos.test"
    assert site.requests[0].headers["Host"] == f"photos.test:{port}"
