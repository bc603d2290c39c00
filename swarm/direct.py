"""Direct inference streams: framed protobufs over TLS on TCP, beside hivemind P2P.

A generation sends one small message per token to every hop. Through hivemind each message crosses
two p2pd daemons (the sender's and the receiver's) on top of the network; a direct TLS connection to
the peer skips both, which is most of a hop's cost when the network is fast (one machine, a LAN).

hivemind P2P stays the control plane. A peer's `dllm.v1.info` reply, which arrives over the P2P
connection authenticated by the peer id, names its direct endpoint and the SHA-256 of its TLS
certificate; the client accepts that certificate and no other, so nobody between them can read or
alter the stream. A peer that cannot be reached directly (NAT, firewall, `--no-direct`) is served over
P2P exactly as before: both transports feed the same handler, so they answer the same bytes.

Framing: a 4-byte big-endian length, then a serialized ExpertRequest/ExpertResponse. A zero length
ends the stream cleanly (the peer frees the session); a dropped connection keeps the session until it
idles out, as a broken P2P stream does.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import os
import ssl
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from chain.errors import UnavailableError
from swarm.protocol import ProtocolError

_HEADER = struct.Struct(">I")
END_OF_STREAM = _HEADER.pack(0)

# The largest reply a client reads (a failover replay of a long context on a wide model is big).
MAX_RESPONSE_BYTES = 2**30

M = TypeVar("M", bound=Message)


class DirectStreamError(UnavailableError, ConnectionError):
    """A direct stream could not be opened, broke, or violated the framing."""


class FrameTooLargeError(DirectStreamError):
    """A frame announced more bytes than the reader accepts."""


class MalformedFrameError(DirectStreamError):
    """A frame's bytes are not the protobuf message expected."""


class DirectEndpointError(ProtocolError):
    """A peer advertised a direct endpoint that does not follow the schema."""


@dataclass(frozen=True)
class DirectEndpoint:
    """Where a peer accepts direct streams, and the certificate it must present there."""

    host: str
    port: int
    tls_sha256: bytes

    def to_info(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "tls_sha256": self.tls_sha256.hex()}

    @classmethod
    def from_info(cls, value: Any) -> DirectEndpoint:
        """Parses the `direct` field of a peer's info reply; raises DirectEndpointError if malformed."""
        if not isinstance(value, dict):
            raise DirectEndpointError(f"direct endpoint must be a map, got {type(value).__name__}")
        host, port, digest = value.get("host"), value.get("port"), value.get("tls_sha256")
        try:
            if not isinstance(host, str):  # ip_address would take an int as an address
                raise ValueError(host)
            ipaddress.ip_address(host)
        except ValueError:
            raise DirectEndpointError(f"direct endpoint host must be an IP address, got {host!r}") from None
        if type(port) is not int or not 0 < port < 65536:
            raise DirectEndpointError(f"direct endpoint port must be in 1..65535, got {port!r}")
        try:
            fingerprint = bytes.fromhex(digest) if isinstance(digest, str) else b""
        except ValueError:
            fingerprint = b""
        if len(fingerprint) != 32:
            raise DirectEndpointError("direct endpoint tls_sha256 must be 64 hex digits")
        return cls(host, port, fingerprint)


@dataclass(frozen=True)
class TlsIdentity:
    """A peer's self-signed TLS certificate and key, made fresh at every start."""

    cert_pem: bytes
    key_pem: bytes
    sha256: bytes  # of the DER certificate: what clients pin

    @classmethod
    def generate(cls) -> TlsIdentity:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dllm-peer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        return cls(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest(),
        )

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        # ssl loads keys only from files: a private directory that lives for the call.
        with tempfile.TemporaryDirectory(prefix="dllm-tls-") as folder:
            cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
            for path, data in ((cert, self.cert_pem), (key, self.key_pem)):
                with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                    f.write(data)
            context.load_cert_chain(cert, key)
        return context


def client_context() -> ssl.SSLContext:
    """TLS 1.3 without CA checks: the certificate is pinned by its digest after the handshake instead."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def connect(endpoint: DirectEndpoint, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Opens a TLS connection to `endpoint` and checks that the peer presented the pinned certificate."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port, ssl=client_context(), server_hostname=""), timeout
        )
    except (TimeoutError, OSError, ssl.SSLError) as e:
        raise DirectStreamError(
            f"cannot open a direct stream to {endpoint.host}:{endpoint.port}: {type(e).__name__}: {e}"
        ) from e
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    if der is None or hashlib.sha256(der).digest() != endpoint.tls_sha256:
        writer.close()
        raise DirectStreamError(
            f"{endpoint.host}:{endpoint.port} presented another TLS certificate than the "
            "peer announced over P2P; not using it"
        )
    return reader, writer


def encode_frame(message: Message) -> bytes:
    body = message.SerializeToString()
    if not body:  # an empty message would read as the end of the stream
        body = b"\x1a\x00"  # field 3 (metadata) set to b"": parses to the same message, non-empty on the wire
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader, message_type: type[M], max_bytes: int) -> M | None:
    """The next message, or None at a clean end of stream; DirectStreamError if broken or malformed."""
    try:
        (length,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as e:
        raise DirectStreamError(f"the direct stream closed: {type(e).__name__}") from e
    if length == 0:
        return None
    if length > max_bytes:
        raise FrameTooLargeError(f"a frame of {length} bytes exceeds the {max_bytes}-byte limit")
    try:
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as e:
        raise DirectStreamError(f"the direct stream closed mid-frame: {type(e).__name__}") from e
    message = message_type()
    try:
        message.ParseFromString(body)
    except DecodeError as e:
        raise MalformedFrameError(f"a frame is not a valid {message_type.__name__}: {e}") from e
    return message
