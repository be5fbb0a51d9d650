"""The tracing layer: off by default, the OTEL_* variables, span structure, Kafka
context propagation, and delivery to a real OTLP/HTTP receiver from real processes.

In-process tests use :func:`~quotopia.telemetry.tracing.capture_spans` (the SDK's
in-memory exporter); the subprocess tests send OTLP/HTTP to tests/_otlp.py's
receiver, as a service would to a collector.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import anyio
import pytest
from _otlp import ReceivedSpan, otlp_receiver
from anyio.streams.memory import MemoryObjectReceiveStream
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from quotopia import __version__
from quotopia.telemetry import tracing

#: A tracer fetched once, at import, as a service module would.
TRACER = tracing.tracer(__name__)

#: Bound on a subprocess that imports the SDK, makes two spans and exits.
PROCESS_DEADLINE = 30


@pytest.fixture(autouse=True)
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No OTEL_* variable from the developer's shell; tracing off after each test."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    yield
    tracing.shutdown_tracing()
    assert not tracing.enabled()


def otel_free_env(**overrides: str) -> dict[str, str]:
    """The environment for a subprocess: no OTEL_* but ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(overrides)
    return env


def finished(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


# --- off by default -----------------------------------------------------------------


def test_off_by_default() -> None:
    assert tracing.configure_tracing("ft") is False
    assert not tracing.enabled()
    with TRACER.start_as_current_span("ft.tick") as span:
        assert not span.is_recording()
        assert tracing.kafka_headers() == []
    assert tracing.kafka_headers() == []
    assert tracing.links_from_kafka_headers([[("traceparent", b"00-" + b"1" * 32)]]) == []


def test_off_does_not_load_the_sdk() -> None:
    code = """
import sys
from quotopia.telemetry import tracing
assert not tracing.configure_tracing("ft")
tracing.tracer("t").start_span("nothing").end()
tracing.shutdown_tracing()
print(sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")))
"""
    done = run_python(code, env=otel_free_env())
    assert done.stdout.strip() == "[]"


def test_the_console_exporter_writes_spans_to_stdout() -> None:
    code = """
from quotopia.telemetry import tracing
assert tracing.configure_tracing("core")
tracing.tracer("t").start_span("GET /quotes/{symbol}").end()
tracing.shutdown_tracing()
"""
    done = run_python(code, env=otel_free_env(OTEL_TRACES_EXPORTER="console"))
    assert '"name": "GET /quotes/{symbol}"' in done.stdout
    assert '"service.name": "quotopia-core"' in done.stdout


# --- the environment ----------------------------------------------------------------

ENDPOINT = "http://127.0.0.1:4318"


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": " OTLP , console "}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{ENDPOINT}/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, True),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.25",
                "OTEL_BSP_MAX_QUEUE_SIZE": "4096",
                "OTEL_BSP_SCHEDULE_DELAY": "500",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",
                "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            },
            True,
        ),
    ],
)
def test_when_tracing_is_on(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], on: bool) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tracing.configure_tracing("ft") is on
    assert tracing.enabled() is on
    tracing.shutdown_tracing()
    assert not tracing.enabled()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "none,otlp"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "lots"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
        ({"OTEL_BSP_SCHEDULE_DELAY": "0"}, "OTEL_BSP_SCHEDULE_DELAY"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "100"}, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "-1"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"}, "OTEL_EXPORTER_OTLP_COMPRESSION"),
    ],
)
def test_a_bad_value_is_a_one_line_value_error(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    # Every variable is checked even with tracing off: a typo shows at start-up.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=named) as error:
        tracing.configure_tracing("ft")
    assert "\n" not in str(error.value)
    assert not tracing.enabled()


@pytest.mark.parametrize(
    ("env", "service", "extra"),
    [
        ({}, "quotopia-recorder", {}),
        ({"OTEL_SERVICE_NAME": "recorder-eu"}, "recorder-eu", {}),
        (
            {"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,deployment.environment.name=ci"},
            "from-attrs",
            {"deployment.environment.name": "ci"},
        ),
        (
            {"OTEL_SERVICE_NAME": "wins", "OTEL_RESOURCE_ATTRIBUTES": "service.name=loses"},
            "wins",
            {},
        ),
    ],
)
def test_the_resource(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], service: str, extra: dict[str, str]
) -> None:
    """What a collector receives as the resource of a span."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with otlp_receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        assert tracing.configure_tracing("recorder")
        TRACER.start_span("probe").end()
        tracing.shutdown_tracing()
        [span] = receiver.wait_for(lambda spans: len(spans) == 1)
    assert span.service_name == service
    assert span.resource["service.version"] == __version__
    assert extra.items() <= span.resource.items()


def test_the_sampler_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert tracing.configure_tracing("ft")
    with TRACER.start_as_current_span("ft.tick") as span:
        assert not span.is_recording()
        # Not sampled, still propagated: the consumer side samples the same way.
        [(name, value)] = tracing.kafka_headers()
    assert name == "traceparent"
    assert int(value[-2:], 16) & 1 == 0  # the flags' "sampled" bit


# --- spans in memory ----------------------------------------------------------------


def test_parent_and_child() -> None:
    with tracing.capture_spans() as exporter:
        assert tracing.enabled()
        with (
            TRACER.start_as_current_span("ft.tick") as tick,
            TRACER.start_as_current_span("send quotes", kind=SpanKind.PRODUCER),
        ):
            pass
    assert not tracing.enabled()
    spans = finished(exporter)
    send = spans["send quotes"]
    assert send.parent is not None
    assert send.parent.span_id == tick.get_span_context().span_id
    assert send.context is not None
    assert send.context.trace_id == tick.get_span_context().trace_id
    assert send.kind is SpanKind.PRODUCER
    assert spans["ft.tick"].parent is None
    assert spans["ft.tick"].resource.attributes["service.name"] == "quotopia-test"


def test_a_tracer_follows_the_installed_provider() -> None:
    with tracing.capture_spans() as first:
        TRACER.start_span("one").end()
        with tracing.capture_spans() as second:
            TRACER.start_span("two").end()
        TRACER.start_span("three").end()
    TRACER.start_span("four").end()
    assert list(finished(first)) == ["one", "three"]
    assert list(finished(second)) == ["two"]


def test_the_global_provider_follows_too() -> None:
    with tracing.capture_spans() as exporter:
        trace.get_tracer("elsewhere").start_span("global").end()
    assert list(finished(exporter)) == ["global"]


def test_kafka_headers_link_the_consumer_to_the_producer() -> None:
    with tracing.capture_spans() as exporter:
        with TRACER.start_as_current_span("send quotes", kind=SpanKind.PRODUCER) as send:
            headers = tracing.kafka_headers()
        producer = send.get_span_context()
        assert [name for name, _ in headers] == ["traceparent"]

        received = tracing.context_from_kafka_headers(headers)
        assert received is not None
        assert (received.trace_id, received.span_id) == (producer.trace_id, producer.span_id)
        assert received.is_remote

        # A batch: three records of one producer span, and one without headers.
        links = tracing.links_from_kafka_headers([headers, headers, None, headers])
        assert [link.context for link in links] == [received]
        with (
            TRACER.start_as_current_span(
                "process quotes",
                context=tracing.batch_parent(links),
                kind=SpanKind.CONSUMER,
                links=links,
            ),
            TRACER.start_as_current_span("INSERT quotes", kind=SpanKind.CLIENT),
        ):
            pass

    spans = finished(exporter)
    process = spans["process quotes"]
    assert process.parent is not None
    assert process.parent.span_id == producer.span_id
    assert [link.context.span_id for link in process.links] == [producer.span_id]
    insert = spans["INSERT quotes"]
    assert insert.parent is not None
    assert process.context is not None
    assert insert.parent.span_id == process.context.span_id
    assert {s.context.trace_id for s in spans.values() if s.context} == {producer.trace_id}


def test_a_batch_from_two_producers_is_a_root_with_two_links() -> None:
    with tracing.capture_spans() as exporter:
        with TRACER.start_as_current_span("send quotes") as first:
            a = tracing.kafka_headers()
        with TRACER.start_as_current_span("send quotes") as second:
            b = tracing.kafka_headers()
        links = tracing.links_from_kafka_headers([a, b, a])
        # A root even inside another span: the batch's parent is not the loop's.
        with (
            TRACER.start_as_current_span("consumer loop"),
            TRACER.start_as_current_span(
                "process quotes", context=tracing.batch_parent(links), links=links
            ),
        ):
            pass
    process = finished(exporter)["process quotes"]
    assert process.parent is None
    assert [link.context.span_id for link in process.links] == [
        first.get_span_context().span_id,
        second.get_span_context().span_id,
    ]


def test_work_handed_to_another_task_carries_its_span() -> None:
    """FT's tick → buffer → sender: the send's parent is the tick, or, for a
    batch of several ticks, it links to each."""
    with tracing.capture_spans() as exporter:
        assert tracing.current_span_context() is None  # outside any span
        buffered = []
        for _ in range(2):
            with TRACER.start_as_current_span("ft.tick"):
                buffered.append(tracing.current_span_context())
        one = tracing.links_to(buffered[:1] * 3)
        both = tracing.links_to([*buffered, None, *buffered])
        TRACER.start_span("send one", context=tracing.batch_parent(one), links=one).end()
        TRACER.start_span("send both", context=tracing.batch_parent(both), links=both).end()
    spans = finished(exporter)
    first, second = (c.span_id for c in buffered if c is not None)
    assert spans["send one"].parent is not None
    assert spans["send one"].parent.span_id == first
    assert spans["send both"].parent is None
    assert [link.context.span_id for link in spans["send both"].links] == [first, second]
    assert tracing.current_span_context() is None
    assert tracing.links_to(buffered) == []  # off


def test_kafka_headers_of_a_given_context() -> None:
    with tracing.capture_spans():
        with TRACER.start_as_current_span("ft.tick") as tick:
            captured = otel_context.get_current()
        assert tracing.kafka_headers() == []  # no span is current any more
        [(_, value)] = tracing.kafka_headers(captured)
    span_context = tick.get_span_context()
    trace_id, span_id = format_trace_id(span_context.trace_id), format_span_id(span_context.span_id)
    version, *ids, flags = value.decode().split("-")
    assert (version, ids) == ("00", [trace_id, span_id])
    assert int(flags, 16) & 1 == 1  # sampled


@pytest.mark.parametrize(
    "headers",
    [
        None,
        [],
        [("key", None)],
        [("traceparent", None)],
        [("traceparent", b"not a traceparent")],
        [("traceparent", b"00-00000000000000000000000000000000-0000000000000000-01")],
        [("Traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
    ],
)
def test_headers_without_a_valid_context(headers: tracing.KafkaHeaders | None) -> None:
    assert tracing.context_from_kafka_headers(headers) is None


def test_a_tracestate_travels_too() -> None:
    headers: tracing.KafkaHeaders = [
        ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("tracestate", b"vendor=value"),
    ]
    received = tracing.context_from_kafka_headers(headers)
    assert received is not None
    assert received.trace_state.get("vendor") == "value"
    with tracing.capture_spans():
        parent = trace.set_span_in_context(trace.NonRecordingSpan(received), Context())
        with TRACER.start_as_current_span("process quotes", context=parent):
            assert dict(tracing.kafka_headers())["tracestate"] == b"vendor=value"


def test_an_http_server_span_continues_the_callers_trace() -> None:
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    asgi_headers = [(b"host", b"localhost"), (b"traceparent", caller.encode())]
    with tracing.capture_spans() as exporter, TRACER.start_as_current_span("outer"):
        TRACER.start_span(
            "GET /quotes/{symbol}",
            context=tracing.context_from_http_headers(asgi_headers),
            kind=SpanKind.SERVER,
        ).end()
        TRACER.start_span(
            "GET /quotes", context=tracing.context_from_http_headers([]), kind=SpanKind.SERVER
        ).end()
    spans = finished(exporter)
    continued = spans["GET /quotes/{symbol}"]
    assert continued.parent is not None
    assert continued.parent.is_remote
    assert (
        format_trace_id(continued.parent.trace_id),
        format_span_id(continued.parent.span_id),
    ) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    )
    assert spans["GET /quotes"].parent is None  # a new trace, not the current span's


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.mark.anyio
async def test_context_across_tasks() -> None:
    """A task started before a span does not see it; a context sent to it does."""

    async def worker(receive: MemoryObjectReceiveStream[Context]) -> None:
        with receive:
            captured = await receive.receive()
        with TRACER.start_as_current_span("orphan"):
            pass
        with TRACER.start_as_current_span("send quotes", context=captured):
            pass

    with tracing.capture_spans() as exporter:
        send, receive = anyio.create_memory_object_stream[Context](0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, receive)
            with send, TRACER.start_as_current_span("ft.tick") as tick:
                await send.send(otel_context.get_current())
        spans = finished(exporter)
    assert spans["orphan"].parent is None
    assert spans["orphan"].context is not None
    assert spans["orphan"].context.trace_id != tick.get_span_context().trace_id
    parent = spans["send quotes"].parent
    assert parent is not None
    assert parent.span_id == tick.get_span_context().span_id


@pytest.mark.anyio
async def test_a_cancelled_span_is_not_an_error() -> None:
    with tracing.capture_spans() as exporter:
        with anyio.move_on_after(0), TRACER.start_as_current_span("feed session"):
            await anyio.sleep_forever()
        with pytest.raises(RuntimeError), TRACER.start_as_current_span("failed"):
            raise RuntimeError("boom")
    spans = finished(exporter)
    assert spans["feed session"].status.status_code is StatusCode.UNSET
    assert spans["failed"].status.status_code is StatusCode.ERROR


# --- real processes and a real OTLP/HTTP receiver ------------------------------------

PARENT_AND_CHILD = """
import json
from opentelemetry.trace import SpanKind
from quotopia.telemetry import tracing

assert tracing.configure_tracing("ft")
tracer = tracing.tracer("quotopia.ft")
with tracer.start_as_current_span("ft.tick") as tick:
    with tracer.start_as_current_span(
        "send quotes", kind=SpanKind.PRODUCER, attributes={"messaging.system": "kafka"}
    ):
        headers = tracing.kafka_headers()
tracing.shutdown_tracing()
print(json.dumps({"headers": [[k, v.decode()] for k, v in headers]}))
"""

CONSUMER = """
import json, sys
from opentelemetry.trace import SpanKind
from quotopia.telemetry import tracing

headers = [(k, v.encode()) for k, v in json.loads(sys.argv[1])]
assert tracing.configure_tracing("recorder")
tracer = tracing.tracer("quotopia.recorder")
links = tracing.links_from_kafka_headers([headers, headers])
with tracer.start_as_current_span(
    "process quotes", context=tracing.batch_parent(links), kind=SpanKind.CONSUMER, links=links
):
    with tracer.start_as_current_span("INSERT quotes", kind=SpanKind.CLIENT):
        pass
tracing.shutdown_tracing()
"""


def run_python(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_DEADLINE,
        check=True,
    )


def by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {span.name: span for span in spans}


def test_processes_deliver_one_trace_to_an_otlp_receiver() -> None:
    """FT-like and recorder-like processes: tick → send → (Kafka headers) →
    process → insert, one trace, as a collector receives it."""
    with otlp_receiver() as receiver:
        env = otel_free_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        producer = run_python(PARENT_AND_CHILD, env=env)
        headers = json.loads(producer.stdout)["headers"]
        run_python(CONSUMER, json.dumps(headers), env=env)
        spans = by_name(receiver.wait_for(lambda spans: len(spans) >= 4))

    tick, send = spans["ft.tick"], spans["send quotes"]
    process, insert = spans["process quotes"], spans["INSERT quotes"]
    assert tick.parent_span_id is None
    assert (tick.kind, send.kind, process.kind, insert.kind) == (
        "INTERNAL",
        "PRODUCER",
        "CONSUMER",
        "CLIENT",
    )
    assert send.parent_span_id == tick.span_id
    assert process.parent_span_id == send.span_id
    assert process.links == ((send.trace_id, send.span_id),)
    assert insert.parent_span_id == process.span_id
    assert {s.trace_id for s in spans.values()} == {tick.trace_id}
    assert send.attributes == {"messaging.system": "kafka"}
    assert (tick.service_name, process.service_name) == ("quotopia-ft", "quotopia-recorder")
    assert tick.resource["service.version"] == __version__
    assert (tick.scope, process.scope) == ("quotopia.ft", "quotopia.recorder")


SHUTDOWN = """
import sys, time
from quotopia.telemetry import tracing

assert tracing.configure_tracing("ft")
tracing.tracer("t").start_span("lost").end()
if sys.argv[1] == "explicit":
    tracing.shutdown_tracing(timeout=1.0)
# else: the atexit hook shuts down, within the default bound
"""


@pytest.mark.parametrize(
    ("collector", "how"), [("silent", "explicit"), ("silent", "atexit"), ("refused", "explicit")]
)
def test_shutdown_is_bounded_when_the_collector_is_down(collector: str, how: str) -> None:
    """The exporter's own timeout is 60 s here; the process must exit well before
    (subprocess.run's timeout is the deadline)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        if collector == "silent":
            # The kernel completes the handshake; nothing ever reads or answers.
            listener.listen(8)
        else:
            listener.close()  # nothing listens on the port: connection refused
        env = otel_free_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
            OTEL_EXPORTER_OTLP_TIMEOUT="60",
        )
        done = subprocess.run(
            [sys.executable, "-c", SHUTDOWN, how],
            env=env,
            capture_output=True,
            text=True,
            timeout=15,
        )
    assert done.returncode == 0, done.stderr
    assert "spans not exported within" in done.stderr
