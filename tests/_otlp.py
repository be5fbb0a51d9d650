"""A tiny OTLP/HTTP trace receiver for tests: what a collector would see.

:func:`otlp_receiver` serves ``POST /v1/traces`` on ``127.0.0.1`` (an
OS-assigned port) in a thread, decodes each body, an OTLP
``ExportTraceServiceRequest`` in protobuf (gzip or deflate too), with the classes
of ``opentelemetry-proto``, and keeps every span as a :class:`ReceivedSpan`: its
name, kind, ids in hex, parent, links, attributes and its resource's
``service.name``. A process under test points at it with
``OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint``.

It answers ``200`` with an empty ``ExportTraceServiceResponse``; OTLP/JSON gets
``415`` and any other path ``404``, so a misconfigured exporter fails loudly in
its own log rather than silently here.

Resource handling: leaving the ``with`` block stops the server and joins its
thread.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from _waiting import DEADLINE, wait_until
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

__all__ = ["OtlpReceiver", "ReceivedSpan", "otlp_receiver"]

Attribute = str | bool | int | float | tuple["Attribute", ...] | None


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it; ids are lowercase hex, as W3C writes them."""

    name: str
    #: ``INTERNAL``, ``SERVER``, ``CLIENT``, ``PRODUCER``, ``CONSUMER`` (or ``UNSPECIFIED``).
    kind: str
    trace_id: str
    span_id: str
    #: None for a root span.
    parent_span_id: str | None
    #: ``(trace_id, span_id)`` of each linked span.
    links: tuple[tuple[str, str], ...]
    attributes: dict[str, Attribute]
    service_name: str
    resource: dict[str, Attribute]
    scope: str


class OtlpReceiver:
    """The spans received so far, and where to send more."""

    def __init__(self, port: int) -> None:
        #: The base URL, for ``OTEL_EXPORTER_OTLP_ENDPOINT``.
        self.endpoint = f"http://127.0.0.1:{port}"
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()

    def spans(self) -> list[ReceivedSpan]:
        """Every span received, in the order they arrived."""
        with self._lock:
            return list(self._spans)

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans() if s.name == name]

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = DEADLINE
    ) -> list[ReceivedSpan]:
        """Wait until ``predicate(spans)`` holds; return the spans then."""

        def probe() -> list[ReceivedSpan] | None:
            spans = self.spans()
            return spans if predicate(spans) else None

        return wait_until(probe, timeout, what="spans at the OTLP receiver")

    def _add(self, spans: Sequence[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """Run a receiver for the ``with`` block (see the module's docstring)."""
    server = _Server(("127.0.0.1", 0), _Handler)
    receiver = server.receiver = OtlpReceiver(server.server_address[1])
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="otlp-receiver", daemon=True
    )
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(DEADLINE)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: OtlpReceiver


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path != "/v1/traces":
            self._answer(404, b"not an OTLP traces path", "text/plain")
            return
        if self.headers.get("content-type", "") != "application/x-protobuf":
            self._answer(415, b"only OTLP/HTTP protobuf", "text/plain")
            return
        encoding = self.headers.get("content-encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        self.server.receiver._add(_decode(request))
        self._answer(
            200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf"
        )

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the test's output is for the test, not for each POST


def _decode(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = resource.get("service.name")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        links=tuple(
                            (link.trace_id.hex(), link.span_id.hex()) for link in span.links
                        ),
                        attributes=_attributes(span.attributes),
                        service_name=service if isinstance(service, str) else "",
                        resource=resource,
                        scope=scope_spans.scope.name,
                    )
                )
    return spans


def _attributes(pairs: Sequence[KeyValue]) -> dict[str, Attribute]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Attribute:
    match value.WhichOneof("value"):
        case "string_value":
            return value.string_value
        case "bool_value":
            return value.bool_value
        case "int_value":
            return value.int_value
        case "double_value":
            return value.double_value
        case "array_value":
            return tuple(_value(v) for v in value.array_value.values)
        case _:
            return None
