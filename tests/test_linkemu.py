"""Link emulation: bytes unchanged, rate and delay applied, clean close, bad specs refused."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ThreadBackend
from splitflower import cli
from splitflower.errors import ConfigError
from splitflower.experiment import ExperimentConfig
from splitflower.linkemu import LinkEmulator, LinkSpec, parse_link
from splitflower.proxy import ServerModelProxy
from splitflower.scheduling import ImmediateScheduler
from splitflower.server_model import ServerModel
from splitflower.service import SplitService


class _Server:
    """A TCP server on loopback: ``echo`` sends back what it reads; otherwise it reads to
    EOF and answers with the byte count, then closes."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.eof_seen = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            total = 0
            while data := conn.recv(65536):
                total += len(data)
                if self.echo:
                    conn.sendall(data)
            self.eof_seen.set()
            if not self.echo:
                conn.sendall(str(total).encode())

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def echo_server() -> Iterator[_Server]:
    server = _Server(echo=True)
    yield server
    server.close()


def _dial(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=20)


def _receive_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def test_parse_link_reads_rates_and_rtt() -> None:
    spec = parse_link("10mbit/50Mbit/20ms")
    assert spec == LinkSpec(10e6 / 8, 50e6 / 8, 0.020)
    assert parse_link(" 1.5gbit / 800kbit / 0.1s ") == LinkSpec(1.5e9 / 8, 800e3 / 8, 0.1)
    assert parse_link(str(spec)) == spec


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("10mbit/20ms", "has 2 part(s)"),
        ("10mbps/50mbit/20ms", "cannot read the up rate"),
        ("10mbit/fast/20ms", "cannot read the down rate"),
        ("0mbit/50mbit/20ms", "must be positive"),
        ("10mbit/50mbit/20", "cannot read the round-trip time"),
        ("10mbit/50mbit/-1ms", "cannot read the round-trip time"),
    ],
)
def test_bad_link_specs_are_refused_with_the_format(spec: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_link(spec)
    assert complaint in str(caught.value)
    assert "10mbit/50mbit/20ms" in str(caught.value)  # says what a good one looks like


def test_experiment_config_refuses_a_bad_link() -> None:
    with pytest.raises(ConfigError, match="cannot read the down rate"):
        ExperimentConfig(link="10mbit/x/20ms").validate()
    assert ExperimentConfig(link="10mbit/50mbit/20ms").validate().link == "10mbit/50mbit/20ms"


def test_relay_preserves_bytes_both_ways(echo_server: _Server) -> None:
    payload = os.urandom(300_000)
    with LinkEmulator(echo_server.address, parse_link("1gbit/1gbit/2ms")) as link, _dial(link.address) as sock:

        def send_all() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_all)
        sender.start()
        echoed = _receive_all(sock)  # ends when the server's close has crossed the relay
        sender.join()
    assert echoed == payload


def test_transfer_takes_size_over_rate_plus_the_round_trip() -> None:
    server = _Server(echo=False)
    size, spec = 400_000, parse_link("8mbit/100mbit/60ms")  # 1 MB/s up: 0.4 s of serialisation
    try:
        with LinkEmulator(server.address, spec) as link, _dial(link.address) as sock:
            started = time.perf_counter()
            sock.sendall(os.urandom(size))
            sock.shutdown(socket.SHUT_WR)
            reply = _receive_all(sock)
            elapsed = time.perf_counter() - started
    finally:
        server.close()
    assert reply == str(size).encode()
    minimum = size / spec.up_bytes_per_s + spec.rtt_s  # upload, then the answer comes back
    assert elapsed >= minimum, (elapsed, minimum)
    assert elapsed < 3 * minimum, (elapsed, minimum)


def test_close_ends_connections_and_refuses_new_ones(echo_server: _Server) -> None:
    link = LinkEmulator(echo_server.address, parse_link("100mbit/100mbit/2ms")).start()
    address = link.address
    sock = _dial(address)
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    link.close()
    assert sock.recv(1) == b""  # the client sees the connection end
    sock.close()
    with pytest.raises(OSError):
        _dial(address).close()
    assert not [t for t in threading.enumerate() if t.name.startswith("linkemu")]


def test_client_half_close_reaches_the_server() -> None:
    server = _Server(echo=False)
    try:
        with LinkEmulator(server.address, parse_link("100mbit/100mbit/2ms")) as link, _dial(link.address) as sock:
            sock.sendall(b"abc")
            sock.shutdown(socket.SHUT_WR)
            assert _receive_all(sock) == b"3"
        assert server.eof_seen.is_set()
    finally:
        server.close()


class _Echo(ServerModel):
    def __init__(self) -> None:
        super().__init__(nn.Identity())

    def echo(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_proxy_calls_cross_the_emulated_link(service: SplitService) -> None:
    spec = parse_link("100mbit/100mbit/40ms")
    with LinkEmulator(service.address, spec) as link:
        token, _ = service.open_session("client-linked", ImmediateScheduler(_Echo()))
        proxy = ServerModelProxy(link.address, token, max_message_bytes=service.max_message_bytes)
        x = torch.randn(64, 100)
        proxy.echo(x=x)  # connection set-up
        started = time.perf_counter()
        result = proxy.echo(x=x)
        elapsed = time.perf_counter() - started
        proxy.close()
    assert isinstance(result, torch.Tensor) and torch.equal(result, x)
    assert elapsed >= spec.rtt_s  # one round trip at least


def test_a_flower_run_over_an_emulated_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower's simulation on threads: the link sits between the clients and the service either way.
    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", ThreadBackend)
    out = tmp_path / "linked.json"
    command = ["run", "--attempts", "1", "--algorithm", "csl", "--dataset", "synthetic", "--clients", "1"]
    command += ["--rounds", "1", "--train-size", "256", "--test-size", "64", "--link", "200mbit/200mbit/10ms"]
    assert cli.main([*command, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["config"]["link"] == "200mbit/200mbit/10ms"
    first = results["rounds"][0]
    assert first["num_examples"] == 256
    batches = -(-results["config"]["train_size"] // results["config"]["batch_size"])
    # Every blocking call waits one round trip at least, which the client counts as waiting.
    assert first["time"]["communication_wait_s"] + first["time"]["server_compute_s"] >= batches * 0.010
