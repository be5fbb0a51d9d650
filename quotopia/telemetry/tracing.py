"""Tracing: the OpenTelemetry SDK, set up the same way in every service.

Off by default. :func:`configure_tracing` reads the standard ``OTEL_*``
environment variables once, at start-up, and turns tracing on when they name an
exporter or an OTLP endpoint; spans then go through the SDK's batch processor to
an OTLP/HTTP (protobuf) exporter. docs/tracing.md lists the variables and the
spans each service emits.

- Hot paths ask :func:`enabled` (a module-level flag) before doing any tracing
  work, so that tracing off costs one function call per tick or batch.
- :func:`tracer` returns a tracer that follows whichever provider is installed
  when a span starts, so a tracer fetched once, at import, still works after the
  provider changes (each test installs its own with :func:`capture_spans`).
  OpenTelemetry's global provider can be set only once per process; this module
  sets it once, to a provider that defers to the same state, so code that calls
  ``opentelemetry.trace.get_tracer`` gets the same spans.
- Kafka carries the W3C trace context (``traceparent``, ``tracestate``) in each
  record's headers: :func:`kafka_headers` on the producer side,
  :func:`context_from_kafka_headers`, :func:`links_from_kafka_headers` and
  :func:`batch_parent` on the consumer side.
- Tests: :func:`capture_spans` (the SDK's in-memory exporter) or
  :func:`use_provider`; tests/_otlp.py is an OTLP/HTTP receiver for real
  processes.

Tasks and context: OpenTelemetry keeps the current span in a ``contextvars``
variable, and both trio and asyncio give each new task a *copy* of the context
of the code that started it (trio at ``start_soon``/``start``, asyncio at task
creation; trio-asyncio's ``aio_as_trio`` runs the asyncio side in the calling
trio task's context). So:

- a span that is current when a task is started is that task's parent span;
- a span started later in the starting task, or in any other task, is not: a
  long-lived task (FT's Kafka publisher, Core's feed supervisor) started at
  start-up sees no span at all, and a span it starts is a root;
- a span started in a child task is never seen by its parent or its siblings.

Work handed from one task to another through a stream or a buffer therefore
carries its context explicitly: the sender captures :func:`current_span_context`
(None while off) with the work, and the receiver makes it the parent of its
span (:func:`batch_parent` of :func:`links_to`) or links to it. Keep
``start_as_current_span`` blocks inside one task and never across a ``yield`` of
an async generator: the context it restores on exit must be the one it was
entered in. A span ended by cancellation (trio's ``Cancelled``, asyncio's
``CancelledError``: not ``Exception``) keeps an unset status, not an error.

Error handling: :func:`configure_tracing` raises :class:`ValueError` with a
one-line message for a value it does not accept; nothing else here raises for
configuration. Export failures (a collector down) are logged by the SDK, never
raised into a service.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Link, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from quotopia import __version__

# The SDK is imported where it is used: it takes some 40 ms to import, which a
# service with tracing off (the default) never needs to spend; the API takes 5.
if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util import types
    from opentelemetry.util._decorator import _AgnosticContextManager

__all__ = [
    "SHUTDOWN_TIMEOUT",
    "KafkaHeaders",
    "batch_parent",
    "capture_spans",
    "check_environment",
    "configure_tracing",
    "context_from_http_headers",
    "context_from_kafka_headers",
    "current_span_context",
    "enabled",
    "kafka_headers",
    "links_from_kafka_headers",
    "links_to",
    "shutdown_tracing",
    "tracer",
    "use_provider",
]

logger = logging.getLogger("quotopia.telemetry")

#: Kafka record headers as aiokafka takes them on ``send`` and gives them on a
#: ``ConsumerRecord`` (a header's value may be null on the wire).
KafkaHeaders = Sequence[tuple[str, bytes | None]]

#: How long :func:`shutdown_tracing` waits for the last spans, by default.
SHUTDOWN_TIMEOUT = 2.0

# The state every tracer consults when a span starts. One provider at a time;
# `_owned` is the one configure_tracing built, which shutdown_tracing shuts down.
_enabled = False
_provider: trace.TracerProvider | None = None
_owned: TracerProvider | None = None
_global_installed = False
_atexit_registered = False
_lock = threading.Lock()


def enabled() -> bool:
    """Whether tracing is on: the check hot paths make before any tracing work."""
    return _enabled


def tracer(name: str) -> trace.Tracer:
    """A tracer named ``name`` (the module's ``__name__``, by convention).

    It starts its spans with the provider installed at that moment, so it can be
    fetched once, at import; while tracing is off its spans are non-recording.
    """
    return _Tracer(name)


# ---------------------------------------------------------------------------
# Configuration from the environment

_EXPORTERS = ("otlp", "console")
_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_POSITIVE_INTEGERS = (
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
)
# In seconds, as this SDK reads them (the specification says milliseconds).
_POSITIVE_SECONDS = ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
_COMPRESSIONS = ("none", "gzip", "deflate")
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_PROTOCOLS = ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")


def check_environment() -> bool:
    """Check the ``OTEL_*`` variables as :func:`configure_tracing` will, without
    setting anything up; return whether tracing would be on. Raises the same
    one-line ValueError for a bad value."""
    return bool(_check_environment())


def configure_tracing(service: str, attributes: Mapping[str, str | int] | None = None) -> bool:
    """Set tracing up from the ``OTEL_*`` environment variables; return whether it is on.

    ``service`` is the short name (``ft``, ``core``, ``recorder``); the resource's
    ``service.name`` is ``quotopia-{service}`` unless ``OTEL_SERVICE_NAME`` or
    ``OTEL_RESOURCE_ATTRIBUTES`` says otherwise. ``attributes`` are more resource
    attributes of this process (``quotopia.worker`` for one of ``core --workers``),
    under the environment's too. Tracing is on when
    ``OTEL_TRACES_EXPORTER`` names exporters (``otlp``, ``console``, comma
    separated) or, with it unset, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; never with
    ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true``.

    Call it once, from the command's entry point (not from ``serve()``), after
    logging is set up and before the service's task tree starts. A second call
    replaces the first set-up (and shuts its provider down).

    Raises :class:`ValueError` with a one-line message for a value it does not
    accept (an unknown exporter or sampler, a protocol other than OTLP/HTTP
    protobuf, an endpoint that is not an http(s) URL, a number that is not one);
    every variable is checked, whether tracing ends up on or not.
    """
    exporters = _check_environment()
    if not exporters:
        _install(None, None)
        return False
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=_resource(service, attributes), shutdown_on_exit=False)
    for name in exporters:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    _install(provider, provider)
    global _atexit_registered
    if not _atexit_registered:
        # A command that exits without calling shutdown_tracing still flushes,
        # within the same bound (the SDK's own atexit hook is not bounded).
        atexit.register(shutdown_tracing)
        _atexit_registered = True
    described = ", ".join(f"otlp to {_traces_endpoint()}" if e == "otlp" else e for e in exporters)
    logger.info("tracing on: %s, as %s", described, provider.resource.attributes["service.name"])
    return True


def shutdown_tracing(timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Flush the spans not yet exported and shut the exporters down; tracing is off after.

    Returns within about ``timeout`` seconds whatever the collector does. The
    SDK's shutdown blocks until its batch worker's last export ends, and an
    export to a collector that is down or silent lasts up to the exporter's
    timeout (``OTEL_EXPORTER_OTLP_TIMEOUT``, 10 s by default) with retries; so
    the shutdown runs in a daemon thread, joined for ``timeout``. If it is not
    done by then the spans still queued are dropped (with a warning), and the
    thread, being a daemon, does not hold the process's exit. A no-op when tracing
    was not configured, so it is safe to call twice.
    """
    with _lock:
        owned = _owned
        if owned is not None:
            _set_state(None, None)
    if owned is not None:
        _shutdown_bounded(owned, timeout)


# ---------------------------------------------------------------------------
# Propagation: the W3C trace context in Kafka record headers and HTTP requests


def kafka_headers(context: Context | None = None) -> list[tuple[str, bytes]]:
    """``traceparent`` (and ``tracestate``) of the span current in ``context``
    (default: the current context), as aiokafka header tuples.

    Empty while tracing is off or when there is no valid span: nothing is added
    to the records then.
    """
    if not _enabled:
        return []
    headers: list[tuple[str, bytes]] = []
    _PROPAGATOR.inject(headers, context, setter=_SETTER)
    return headers


def context_from_kafka_headers(headers: KafkaHeaders | None) -> SpanContext | None:
    """The producer's span context carried in a record's headers, or None.

    None when the headers carry no ``traceparent`` or an invalid one. Pure: it
    answers the same whether tracing is on or off.
    """
    if not headers:
        return None
    context = _PROPAGATOR.extract(headers, context=Context(), getter=_GETTER)
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def links_from_kafka_headers(records: Iterable[KafkaHeaders | None]) -> list[Link]:
    """One link per distinct producer span among ``records``' headers, in order.

    For a consumer span that handles a batch (the recorder's ``process quotes``):
    the records of one producer batch share one span, so a batch of thousands of
    records usually yields a link or two. Empty while tracing is off.
    """
    if not _enabled:
        return []
    return links_to(context_from_kafka_headers(headers) for headers in records)


def current_span_context() -> SpanContext | None:
    """The current span's context, to hand to another task with the work it
    belongs to (see the module's docstring); None while off or outside a span."""
    if not _enabled:
        return None
    span_context = trace.get_current_span().get_span_context()
    return span_context if span_context.is_valid else None


def links_to(span_contexts: Iterable[SpanContext | None]) -> list[Link]:
    """One link per distinct span among ``span_contexts`` (Nones skipped), in
    order: for a span that handles work from many spans, such as FT's ``send
    quotes`` for a batch holding the quotes of several ticks. Empty while off."""
    if not _enabled:
        return []
    seen: set[tuple[int, int]] = set()
    links: list[Link] = []
    for span_context in span_contexts:
        if span_context is None:
            continue
        key = (span_context.trace_id, span_context.span_id)
        if key not in seen:
            seen.add(key)
            links.append(Link(span_context))
    return links


def batch_parent(links: Sequence[Link]) -> Context:
    """The ``context=`` for a span that handles a batch of work from ``links``.

    With exactly one link (the batch came from one producer span, the usual case)
    that span becomes the parent, so one trace shows a quote's whole path: FT's
    tick, the send, the processing, the insert. With none or several there is no
    one parent, and the context is empty: the span is a root of its own trace,
    whatever span is current, and links to each (the messaging semantic
    conventions' rule for batches).
    """
    if len(links) != 1:
        return Context()
    return trace.set_span_in_context(trace.NonRecordingSpan(links[0].context), Context())


def context_from_http_headers(headers: Iterable[tuple[bytes, bytes]]) -> Context:
    """The ``context=`` for an HTTP server span: the caller's ``traceparent`` (and
    ``tracestate``) from a request's headers, as an ASGI scope lists them
    (lowercase names, bytes); an empty context, a new trace, without them."""
    carrier = [(name.decode("latin-1"), value) for name, value in headers if name in _W3C]
    if not carrier:
        return Context()
    return _PROPAGATOR.extract(carrier, context=Context(), getter=_GETTER)


# ---------------------------------------------------------------------------
# Tests


@contextmanager
def use_provider(provider: trace.TracerProvider) -> Iterator[trace.TracerProvider]:
    """Install ``provider`` for the ``with`` block (tracing on), then restore the
    previous state. The caller owns ``provider`` and shuts it down."""
    with _lock:
        saved = (_provider, _owned)
        _set_state(provider, saved[1])
        _install_global()
    try:
        yield provider
    finally:
        with _lock:
            _set_state(*saved)


@contextmanager
def capture_spans(service: str = "quotopia-test") -> Iterator[InMemorySpanExporter]:
    """Tracing on for the ``with`` block, every span kept in memory.

    Each span is exported as it ends (a simple processor, no batching), sampled
    always, and the resource's ``service.name`` is ``service``, whatever the
    environment says. ``exporter.get_finished_spans()`` lists them.
    """
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        sampler=ALWAYS_ON,
        resource=Resource({SERVICE_NAME: service, SERVICE_VERSION: __version__}),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        with use_provider(provider):
            yield exporter
    finally:
        provider.shutdown()


# ---------------------------------------------------------------------------
# Implementation


class _Tracer(trace.Tracer):
    """Starts each span with the tracer of the provider installed at that moment."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._for: trace.TracerProvider | None = None
        self._delegate: trace.Tracer = _NOOP

    def _current(self) -> trace.Tracer:
        provider = _provider
        if provider is not self._for:
            self._delegate = _NOOP if provider is None else provider.get_tracer(self._name)
            self._for = provider
        return self._delegate

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        return self._current().start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )

    def start_as_current_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _AgnosticContextManager[trace.Span]:
        return self._current().start_as_current_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
            end_on_exit,
        )


class _GlobalProvider(trace.TracerProvider):
    """OpenTelemetry's global provider, set once: tracers that follow this module."""

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace.Tracer:
        return _Tracer(instrumenting_module_name)


class _HeaderSetter(Setter[list[tuple[str, bytes]]]):
    def set(self, carrier: list[tuple[str, bytes]], key: str, value: str) -> None:
        carrier.append((key, value.encode("latin-1")))


class _HeaderGetter(Getter[KafkaHeaders]):
    def get(self, carrier: KafkaHeaders, key: str) -> list[str] | None:
        values = [v.decode("latin-1") for k, v in carrier if k == key and v is not None]
        return values or None

    def keys(self, carrier: KafkaHeaders) -> list[str]:
        return [k for k, _ in carrier]


# W3C trace context only, whatever OTEL_PROPAGATORS says: it is the contract
# between Quotopia's own producers and consumers, not a per-deployment choice.
_PROPAGATOR = TraceContextTextMapPropagator()
_SETTER = _HeaderSetter()
_GETTER = _HeaderGetter()
_NOOP = trace.NoOpTracer()
_W3C = (b"traceparent", b"tracestate")


def _set_state(provider: trace.TracerProvider | None, owned: TracerProvider | None) -> None:
    global _enabled, _provider, _owned
    _provider, _owned, _enabled = provider, owned, provider is not None


def _install(provider: trace.TracerProvider | None, owned: TracerProvider | None) -> None:
    with _lock:
        previous = _owned
        _set_state(provider, owned)
        if provider is not None:
            _install_global()
    if previous is not None and previous is not owned:
        _shutdown_bounded(previous, SHUTDOWN_TIMEOUT)


def _install_global() -> None:
    global _global_installed
    if not _global_installed:
        trace.set_tracer_provider(_GlobalProvider())
        _global_installed = True


def _shutdown_bounded(provider: TracerProvider, timeout: float) -> None:
    worker = threading.Thread(
        target=provider.shutdown, name="quotopia-tracing-shutdown", daemon=True
    )
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        logger.warning("tracing: spans not exported within %gs of shutdown were dropped", timeout)


def _resource(service: str, attributes: Mapping[str, str | int] | None) -> Resource:
    from opentelemetry.sdk.resources import (
        SERVICE_NAME,
        SERVICE_VERSION,
        OTELResourceDetector,
        Resource,
    )

    # Resource.create puts its arguments over the environment's attributes;
    # merging the environment's again puts it back on top, as the specification
    # orders it: OTEL_SERVICE_NAME, then OTEL_RESOURCE_ATTRIBUTES, then ours.
    defaults: dict[str, str | int] = {
        SERVICE_NAME: f"quotopia-{service}",
        SERVICE_VERSION: __version__,
        **(attributes or {}),
    }
    return Resource.create(defaults).merge(OTELResourceDetector().detect())


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    # It pulls in requests and the protobuf classes: another 25 ms of imports.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # It reads OTEL_EXPORTER_OTLP_[TRACES_]{ENDPOINT,HEADERS,TIMEOUT,COMPRESSION,...}.
    return OTLPSpanExporter()


def _traces_endpoint() -> str:
    if endpoint := _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return endpoint
    base = _env("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return f"{base.removesuffix('/')}/v1/traces"


def _env(name: str) -> str:
    """A variable's value, stripped; unset and empty are the same (as the
    specification has it)."""
    return os.environ.get(name, "").strip()


def _check_environment() -> tuple[str, ...]:
    """Check every variable this module and the SDK read; return the exporters to
    run, none when tracing is off."""
    disabled = _env("OTEL_SDK_DISABLED").lower()
    if disabled not in ("", "true", "false"):
        raise ValueError(f"OTEL_SDK_DISABLED={disabled!r}: expected true or false")
    names = tuple(n.strip().lower() for n in _env("OTEL_TRACES_EXPORTER").split(",") if n.strip())
    for name in names:
        if name not in (*_EXPORTERS, "none"):
            raise ValueError(
                f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}"
                f" (expected {', '.join(_EXPORTERS)} or none)"
            )
    if "none" in names and len(names) > 1:
        raise ValueError("OTEL_TRACES_EXPORTER: 'none' cannot be combined with other exporters")
    for variable in _PROTOCOLS:
        protocol = _env(variable)
        if protocol not in ("", "http/protobuf"):
            raise ValueError(
                f"{variable}={protocol!r}: only http/protobuf is supported (OTLP/HTTP, port 4318)"
            )
    for variable in _ENDPOINTS:
        url = _env(variable)
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
            raise ValueError(f"{variable}={url!r}: expected an http:// or https:// URL")
    for variable in _POSITIVE_INTEGERS:
        _check_number(variable, int)
    for variable in _POSITIVE_SECONDS:
        _check_number(variable, float)
    for variable in ("OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"):
        compression = _env(variable).lower()
        if compression and compression not in _COMPRESSIONS:
            raise ValueError(f"{variable}={compression!r}: expected {', '.join(_COMPRESSIONS)}")
    # The SDK's defaults: a queue of 2048 spans, batches of 512.
    queue = int(_env("OTEL_BSP_MAX_QUEUE_SIZE") or 2048)
    if int(_env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") or 512) > queue:
        raise ValueError("OTEL_BSP_MAX_EXPORT_BATCH_SIZE must not exceed OTEL_BSP_MAX_QUEUE_SIZE")
    _check_sampler()

    if disabled == "true" or names == ("none",):
        return ()
    if names:
        return tuple(dict.fromkeys(names))
    return ("otlp",) if any(_env(v) for v in _ENDPOINTS) else ()


def _check_number(variable: str, kind: type[int] | type[float]) -> None:
    text = _env(variable)
    if not text:
        return
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise ValueError(f"{variable}={text!r}: expected a positive {kind.__name__}")


def _check_sampler() -> None:
    sampler = _env("OTEL_TRACES_SAMPLER").lower()
    if sampler and sampler not in _SAMPLERS:
        raise ValueError(
            f"OTEL_TRACES_SAMPLER: unknown sampler {sampler!r} (expected {', '.join(_SAMPLERS)})"
        )
    text = _env("OTEL_TRACES_SAMPLER_ARG")
    if sampler.endswith("traceidratio") and text:  # unset: a ratio of 1
        try:
            ratio = float(text)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(
                f"OTEL_TRACES_SAMPLER_ARG={text!r}: expected a ratio from 0 to 1 for {sampler}"
            )
