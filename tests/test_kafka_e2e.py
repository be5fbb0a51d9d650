"""Kafka between the services, end to end: real processes, a real broker, PostgreSQL.

FT publishes to a private Tansu broker (tests/_kafka.py); Core reads the topic
(``--source kafka``) and the recorder writes it into PostgreSQL
(``--source kafka``, a consumer group); Core's history routes read it back. Then
the recorder is killed with SIGKILL mid-stream and started again: once FT has
drained, the table holds exactly the quotes FT says the broker acknowledged.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from _kafka import TansuBroker, tansu_broker
from _postgres import Postgres
from _procs import QuotopiaProcess
from _services import DEADLINE, ft_args, http_get, recorder_args, scrape
from _stored import rows, sample_total
from _waiting import wait_until

pytestmark = pytest.mark.e2e

#: Core's start line with the Kafka source; group 1 is its port.
CORE_KAFKA_READY = r"Core listening on http://127\.0\.0\.1:(\d+), feed from Kafka topic quotes at"
FT_READY = r"FT listening on 127\.0\.0\.1:(\d+) \("
RECORDER_METRICS = r"recorder metrics on http://127\.0\.0\.1:(\d+)/metrics"
TICK = 0.05


@contextmanager
def ft(broker: TansuBroker) -> Iterator[QuotopiaProcess]:
    # Tansu refuses aiokafka's idempotent producer (tests/test_kafka_harness.py).
    with QuotopiaProcess(
        *ft_args("--kafka", broker.bootstrap, "--no-kafka-idempotence", tick=TICK)
    ) as process:
        process.wait_for_line(FT_READY, DEADLINE)
        yield process


@contextmanager
def recorder(broker: TansuBroker, database: str) -> Iterator[tuple[QuotopiaProcess, int]]:
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
    with QuotopiaProcess(*args) as process:
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
                samples = scrape(port)
                assert sample_total(samples, "quotopia_recorder_kafka_commits_total") > 0
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
