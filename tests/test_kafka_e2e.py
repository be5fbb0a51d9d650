"""Kafka between the services, end to end: real processes, a real broker, PostgreSQL.

FT publishes to a private Tansu broker (tests/_kafka.py); Core reads the topic
(``--source kafka``) and the recorder writes it into PostgreSQL
(``--source kafka``, a consumer group); Core's history routes read it back. Then
the recorder is killed with SIGKILL mid-stream and started again: once FT has
drained, the table holds exactly the quotes FT says the broker acknowledged; and
the same after PostgreSQL is stopped under it, from its committed offsets.
And the broker itself is killed and restarted under FT, a Core fed over gRPC and
a recorder reading the topic: FT's gRPC stream never pauses, its Kafka buffer
stays within its capacity, and publishing and recording resume.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from _kafka import TansuBroker, tansu_broker
from _otlp import ReceivedSpan, otlp_receiver
from _postgres import Postgres
from _procs import QuotopiaProcess
from _services import (
    DEADLINE,
    FT_METRICS,
    ft_args,
    http_get,
    recorder_args,
    running_core,
    scrape,
)
from _stored import rows, sample_total
from _waiting import wait_until

pytestmark = pytest.mark.e2e

#: Core's start line with the Kafka source; group 1 is its port.
CORE_KAFKA_READY = r"Core listening on http://127\.0\.0\.1:(\d+), feed from Kafka topic quotes at"
FT_READY = r"FT listening on 127\.0\.0\.1:(\d+) \("
RECORDER_METRICS = r"recorder metrics on http://127\.0\.0\.1:(\d+)/metrics"
TICK = 0.05


@contextmanager
def ft(
    broker: TansuBroker, *flags: str, env: dict[str, str] | None = None
) -> Iterator[QuotopiaProcess]:
    # Tansu refuses aiokafka's idempotent producer (tests/test_kafka_harness.py).
    args = ft_args("--kafka", broker.bootstrap, "--no-kafka-idempotence", *flags, tick=TICK)
    with QuotopiaProcess(*args, env=env) as process:
        process.wait_for_line(FT_READY, DEADLINE)
        yield process


@contextmanager
def recorder(
    broker: TansuBroker, database: str, env: dict[str, str] | None = None
) -> Iterator[tuple[QuotopiaProcess, int]]:
    args = recorder_args(
        1,  # FT's address: unused with --source kafka
        database,
        "--source",
        "kafka",
        "--kafka",
        broker.bootstrap,
        "--kafka-session-timeout",
        "2",
    )
    with QuotopiaProcess(*args, env=env) as process:
        port = int(process.wait_for_line(RECORDER_METRICS, DEADLINE)[1])
        process.wait_for_line(r"recording quotes from Kafka topic quotes", DEADLINE)
        yield process, port


def test_ft_kafka_core_and_recorder_into_postgresql(postgres_server: Postgres) -> None:
    postgres_server.psql("CREATE DATABASE kafka_e2e")
    database = postgres_server.url.rsplit("/", 1)[0] + "/kafka_e2e"
    with tansu_broker() as broker, ft(broker) as feed:
        core_args = [
            "core",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--source",
            "kafka",
            "--kafka",
            broker.bootstrap,
            "--db",
            database,
        ]
        with QuotopiaProcess(*core_args) as core:
            core_port = int(core.wait_for_line(CORE_KAFKA_READY, DEADLINE)[1])
            # Core serves the topic's prices, in the API's own shapes.
            wait_until(lambda: http_get(core_port, "/readyz")[0] == 200, DEADLINE, what="ready")
            status, body = http_get(core_port, "/quotes")
            assert status == 200
            assert set(body) == {"SBER", "BTC", "ETH"}

            with recorder(broker, database) as (first, port):
                wait_until(lambda: len(rows(database)) >= 150, DEADLINE, what="150 rows")
                # Offsets are committed just after the database commit, so wait for it.
                wait_until(
                    lambda: sample_total(scrape(port), "quotopia_recorder_kafka_commits_total") > 0,
                    DEADLINE,
                    what="an offset commit",
                )
                first.signal(signal.SIGKILL)
                first.wait(DEADLINE)
            # Quotes go on reaching the topic while no recorder runs.
            with recorder(broker, database) as (_second, port):
                before = len(rows(database))
                wait_until(lambda: len(rows(database)) >= before + 60, DEADLINE, what="rows again")
                # FT drains: every quote it made reaches the broker, or is counted dropped.
                feed.signal(signal.SIGTERM)
                assert feed.wait(DEADLINE) == 0
                (stopped,) = [line for line in feed.output().splitlines() if "FT stopped" in line]
                sent = int(stopped.split("Kafka: ")[1].split(" quotes sent")[0])
                assert "0 dropped" in stopped

                def all_stored() -> bool:
                    return len(rows(database)) >= sent

                wait_until(all_stored, DEADLINE, what=f"all {sent} quotes stored")
                stored = rows(database)
                # Exactly what the broker acknowledged: none lost to the SIGKILL,
                # none stored twice by the re-read that followed it.
                assert len(stored) == len(set(stored)) == sent
                samples = scrape(port)
                assert sample_total(samples, "quotopia_recorder_missed_quotes_total") == 0

            # Core's history routes read what the recorder wrote.
            status, page = http_get(core_port, "/quotes/BTC/history?limit=5")
            assert status == 200, page
            assert len(page["quotes"]) == 5


def test_postgresql_stopped_under_the_kafka_recorder_it_resumes_from_its_offsets(
    postgres_server: Postgres,
) -> None:
    """PostgreSQL stopped under a recorder reading the topic: its batches fail and
    are retried, it says so on /readyz, and it commits no offset past what the
    database holds. Killed then (its buffer is lost) and started again once
    PostgreSQL is back, the new recorder catches up from the committed offsets:
    the table ends with every quote the broker acknowledged, each once."""
    postgres_server.psql("CREATE DATABASE kafka_pg_outage")
    database = postgres_server.url.rsplit("/", 1)[0] + "/kafka_pg_outage"
    commits, failed = "quotopia_recorder_kafka_commits_total", "quotopia_recorder_batches_total"

    def failures(port: int) -> float:
        return scrape(port)[(failed, (("outcome", "failed"),))]

    with tansu_broker() as broker, ft(broker) as feed:
        with recorder(broker, database) as (first, port):
            wait_until(lambda: len(rows(database)) >= 30, DEADLINE, what="30 rows")
            wait_until(lambda: sample_total(scrape(port), commits) > 0, DEADLINE, what="a commit")
            postgres_server.stop()
            try:
                unavailable = (503, {"status": "database unavailable"})
                wait_until(lambda: http_get(port, "/readyz") == unavailable, DEADLINE, what="503")
                wait_until(lambda: failures(port) >= 2, DEADLINE, what="failed batches")
                committed = sample_total(scrape(port), commits)
                wait_until(lambda: failures(port) >= 4, DEADLINE, what="more failed batches")
                # Nothing written, so nothing committed: the offsets wait for the database.
                assert sample_total(scrape(port), commits) == committed
                first.signal(signal.SIGKILL)
                first.wait(DEADLINE)
            finally:
                postgres_server.start()
        with recorder(broker, database) as (second, port):
            feed.signal(signal.SIGTERM)
            assert feed.wait(DEADLINE) == 0
            (stopped,) = [line for line in feed.output().splitlines() if "FT stopped" in line]
            sent = int(stopped.split("Kafka: ")[1].split(" quotes sent")[0])
            assert "0 dropped" in stopped
            wait_until(lambda: len(rows(database)) >= sent, DEADLINE, what=f"all {sent} stored")
            stored = rows(database)
            assert len(stored) == len(set(stored)) == sent
            assert sample_total(scrape(port), "quotopia_recorder_missed_quotes_total") == 0
            second.signal(signal.SIGTERM)
            assert second.wait(DEADLINE) == 0
    bad = [line for line in second.stderr_lines if " ERROR " in line or "Traceback" in line]
    assert not bad, second.output()


#: FT's Kafka buffer in the broker test: a third of a second of quotes at TICK.
SMALL_BUFFER = 20


def test_a_broker_killed_and_restarted_under_ft_core_and_the_recorder(tmp_path: Path) -> None:
    """The broker SIGKILLed under a running stack: FT goes on ticking to its gRPC
    subscriber (a Core fed over gRPC, whose quotes keep arriving), its Kafka buffer
    fills to its capacity and never past it (the oldest dropped, counted), nothing
    is logged at ERROR. Restarted (empty: memory storage), FT reconnects and
    publishes again, and the recorder joins the new topic and records again."""
    database = f"sqlite:///{tmp_path / 'quotes.db'}"
    with (
        tansu_broker() as broker,
        ft(broker, "--kafka-buffer", str(SMALL_BUFFER)) as feed,
    ):
        ft_port = int(feed.wait_for_line(FT_READY, DEADLINE)[1])
        metrics_port = int(feed.wait_for_line(FT_METRICS, DEADLINE)[1])
        with running_core(ft_port) as core, recorder(broker, database) as (rec, _port):

            def ft_figures() -> dict[str, float]:
                samples = scrape(metrics_port)
                figures = {
                    name: sample_total(samples, f"quotopia_ft_kafka_{name}")
                    for name in ("connected", "buffer_quotes", "quotes_sent_total")
                }
                figures["dropped"] = sample_total(samples, "quotopia_ft_kafka_quotes_dropped_total")
                # Bounded, at every look: never more than --kafka-buffer waiting.
                assert figures["buffer_quotes"] <= SMALL_BUFFER, figures
                return figures

            def core_received() -> float:
                return sample_total(scrape(core.port), "quotopia_core_quotes_received_total")

            wait_until(lambda: len(rows(database)) >= 30, DEADLINE, what="30 rows")
            broker.kill()
            sent_before = ft_figures()["quotes_sent_total"]
            received_before = core_received()

            def buffer_overflowing() -> dict[str, float] | None:
                figures = ft_figures()
                return figures if figures["dropped"] > 0 and not figures["connected"] else None

            down = wait_until(buffer_overflowing, DEADLINE, what="FT's buffer full, dropping")
            assert down["buffer_quotes"] == SMALL_BUFFER
            # FT's gRPC side never waited for the broker: Core got quotes all along.
            assert core_received() - received_before >= 3 * SMALL_BUFFER
            stored_before = len(rows(database))

            broker.restart()

            def publishing() -> dict[str, float] | None:
                figures = ft_figures()
                resumed = figures["connected"] and figures["quotes_sent_total"] > sent_before
                return figures if resumed else None

            wait_until(publishing, DEADLINE, what="FT publishing again")
            wait_until(
                lambda: len(rows(database)) >= stored_before + 30,
                DEADLINE,
                what="the recorder recording again",
            )
            up = ft_figures()
            stored = rows(database)
            assert len(stored) == len(set(stored))
            for process in (rec, core.process):
                process.signal(signal.SIGTERM)
                assert process.wait(DEADLINE) == 0
        feed.signal(signal.SIGTERM)
        assert feed.wait(DEADLINE) == 0
    assert up["buffer_quotes"] < SMALL_BUFFER
    for process in (feed, rec, core.process):
        bad = [line for line in process.stderr_lines if " ERROR " in line or "Traceback" in line]
        assert not bad, process.output()
    (warned,) = [line for line in feed.stderr_lines if "Kafka" in line and "WARNING" in line]
    assert warned


def test_one_trace_from_ft_through_kafka_to_the_database_and_core_s_spans(
    tmp_path: Path,
) -> None:
    """Tracing on in three real processes (OTEL_EXPORTER_OTLP_ENDPOINT to a receiver
    of the test's own): a quote's path is one trace across FT and the recorder,
    ``ft.tick`` → ``send quotes`` → ``process quotes`` → ``INSERT quotes``; Core's
    request is a SERVER span named by its route, with its query as a child; its
    feed session is a span of its own."""
    database = f"sqlite:///{tmp_path / 'quotes.db'}"
    with otlp_receiver() as receiver, tansu_broker() as broker:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with ft(broker, env=env) as feed, recorder(broker, database, env) as (rec, _port):
            wait_until(lambda: len(rows(database)) >= 30, DEADLINE, what="30 rows")
            core_args = ["core", "--host", "127.0.0.1", "--port", "0", "--source", "kafka"]
            core_args += ["--kafka", broker.bootstrap, "--db", database]
            with QuotopiaProcess(*core_args, env=env) as core:
                core_port = int(core.wait_for_line(CORE_KAFKA_READY, DEADLINE)[1])
                wait_until(lambda: http_get(core_port, "/readyz")[0] == 200, DEADLINE, what="ready")
                assert http_get(core_port, "/quotes/BTC/history?limit=3")[0] == 200
                core.signal(signal.SIGTERM)
                assert core.wait(DEADLINE) == 0
            for process in (rec, feed):
                process.signal(signal.SIGTERM)
                assert process.wait(DEADLINE) == 0

        def complete(spans: list[ReceivedSpan]) -> bool:
            names = {s.name for s in spans}
            return {"INSERT quotes", "GET /quotes/{symbol}/history", "receive quotes"} <= names

        spans = receiver.wait_for(complete)
    by_id = {s.span_id: s for s in spans}

    def parent(span: ReceivedSpan) -> ReceivedSpan | None:
        return None if span.parent_span_id is None else by_id.get(span.parent_span_id)

    whole = 0
    for insert in (s for s in spans if s.name == "INSERT quotes"):
        batch = parent(insert)
        assert batch is not None
        assert (batch.name, batch.kind) == ("process quotes", "CONSUMER")
        send = parent(batch)
        if send is None:
            continue  # a batch of several sends: linked, not parented
        tick = parent(send)
        assert (send.name, send.kind, send.service_name) == (
            "send quotes",
            "PRODUCER",
            "quotopia-ft",
        )
        assert tick is not None
        assert tick.name == "ft.tick"
        assert insert.service_name == batch.service_name == "quotopia-recorder"
        assert len({s.trace_id for s in (tick, send, batch, insert)}) == 1
        whole += 1
    assert whole > 0
    (request,) = [s for s in spans if s.name == "GET /quotes/{symbol}/history"]
    assert (request.kind, request.service_name) == ("SERVER", "quotopia-core")
    assert request.attributes["http.response.status_code"] == 200
    queries = [s for s in spans if s.parent_span_id == request.span_id]
    assert [(q.name, q.kind) for q in queries] == [("SELECT quotes", "CLIENT")]
    (session,) = [s for s in spans if s.name == "receive quotes"]
    assert session.service_name == "quotopia-core"
