"""FT's HTTP/2 fast paths (quotopia.ft.h2fast) against h2 itself.

Two server connections are brought to the same state by the same conversation
with an h2 client; then one handles each input the stock way (h2's
``receive_data`` / ``send_data``) and the other through the fast path, falling
back to h2 when the fast path declines, as FT does. After every step both must
have written the same bytes and hold the same flow-control windows and states.
The frames come from hyperframe (h2's own encoder) or are built by hand where
hyperframe refuses to encode them (a zero increment).
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

import pytest
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.events import WindowUpdated
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame, PingFrame, RstStreamFrame, SettingsFrame
from hypothesis import event, given, settings
from hypothesis import strategies as st

from quotopia.ft.h2fast import answer_control_frames, data_frame

STREAM = 1
REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/QuoteService/StreamQuotes"),
    (":authority", "ft"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def server(window: int = 65_535, max_frame: int = 16_384) -> H2Connection:
    """A server with one server-streaming call open: the request in, headers out.

    ``window`` and ``max_frame`` are the client's settings, so the server's
    outbound limits."""
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings(
        {SettingCodes.INITIAL_WINDOW_SIZE: window, SettingCodes.MAX_FRAME_SIZE: max_frame}
    )
    client.send_headers(STREAM, REQUEST, end_stream=True)
    h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
    h2.initiate_connection()
    h2.receive_data(client.data_to_send())
    client.receive_data(h2.data_to_send())
    h2.receive_data(client.data_to_send())
    h2.send_headers(STREAM, [(":status", "200"), ("content-type", "application/grpc")])
    h2.data_to_send()
    assert h2.state_machine.state is ConnectionState.SERVER_OPEN
    return h2


def state(h2: H2Connection) -> tuple[object, ...]:
    streams = {
        sid: (s.state_machine.state, s.outbound_flow_control_window)
        for sid, s in h2.streams.items()
    }
    return h2.state_machine.state, h2.outbound_flow_control_window, streams


def window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame, by hand (hyperframe will not encode a zero increment)."""
    return struct.pack(">HBBBLL", 0, 4, 0x8, 0, stream_id, increment)


def ping(opaque: bytes, ack: bool = False) -> bytes:
    frame = PingFrame(0, opaque_data=opaque)
    if ack:
        frame.flags.add("ACK")
    return frame.serialize()


@dataclass
class Stock:
    """Receive the h2 way, as grpclib does: everything through receive_data."""

    h2: H2Connection

    def receive(self, data: bytes) -> tuple[bytes, list[int]]:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            return b"error:" + self.h2.data_to_send(), []
        grown = [e.stream_id for e in events if isinstance(e, WindowUpdated)]
        return self.h2.data_to_send(), list(dict.fromkeys(grown))


@dataclass
class Fast:
    h2: H2Connection
    taken: int = 0

    def receive(self, data: bytes) -> tuple[bytes, list[int]]:
        answer = answer_control_frames(self.h2, data)
        if answer is None:
            return Stock(self.h2).receive(data)
        self.taken += 1
        return answer.reply, list(answer.windows_updated)


def test_a_ping_and_a_window_update_take_the_fast_path_with_h2_s_answer() -> None:
    chunk = ping(b"12345678") + window_update(0, 100) + window_update(STREAM, 100)
    stock, fast = Stock(server()), Fast(server())
    expected = stock.receive(chunk)
    assert expected[0] == ping(b"12345678", ack=True)
    assert fast.receive(chunk) == expected
    assert fast.taken == 1
    assert state(fast.h2) == state(stock.h2)


common = st.one_of(
    st.builds(ping, st.binary(min_size=8, max_size=8)),
    st.builds(window_update, st.sampled_from([0, STREAM]), st.integers(1, 70_000)),
)
rare = st.one_of(
    st.builds(ping, st.binary(min_size=8, max_size=8), st.just(True)),
    st.builds(
        window_update,
        st.sampled_from([0, STREAM, 3, 0x80000000 | STREAM]),
        st.sampled_from([0, 2**31 - 1, 2**31]),
    ),
    st.just(SettingsFrame(0, settings={SettingCodes.MAX_CONCURRENT_STREAMS: 10}).serialize()),
    st.just(b"\x00\x00\x07\x06\x00\x00\x00\x00\x00" + bytes(7)),  # a PING of 7 bytes
)
#: Frames after which the stream or the connection is over.
final = st.sampled_from(
    [
        RstStreamFrame(STREAM, error_code=8).serialize(),
        GoAwayFrame(0, last_stream_id=0, error_code=0).serialize(),
    ]
)
#: What arrives in one read: mostly whole frames of the common kinds.
chunks = st.lists(
    st.lists(st.one_of(*[common] * 20, rare, final), min_size=1, max_size=4).map(b"".join),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(chunks, st.one_of(*[st.just([])] * 3, st.lists(st.integers(0, 200), min_size=1, max_size=3)))
def test_any_frames_any_chunks_leave_the_same_bytes_and_state(
    reads: list[bytes], cuts: list[int]
) -> None:
    """Reads of whole frames, or (with ``cuts``) the same bytes cut anywhere."""
    if cuts:
        wire = b"".join(reads)
        points = sorted({min(cut, len(wire)) for cut in cuts} | {0, len(wire)})
        reads = [wire[a:b] for a, b in itertools.pairwise(points) if b > a]
    stock, fast = Stock(server()), Fast(server())
    for chunk in reads:
        assert fast.receive(chunk) == stock.receive(chunk)
        assert state(fast.h2) == state(stock.h2)
        if stock.h2.state_machine.state is ConnectionState.CLOSED:
            break
    event("the fast path took a chunk" if fast.taken else "h2 took every chunk")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(common, min_size=1, max_size=6).map(b"".join), min_size=1, max_size=8))
def test_reads_of_pings_and_window_updates_all_take_the_fast_path(reads: list[bytes]) -> None:
    """What real clients send while they read a stream: every read is answered on
    the fast path, and still exactly as h2 answers it."""
    stock, fast = Stock(server()), Fast(server())
    for chunk in reads:
        assert fast.receive(chunk) == stock.receive(chunk)
        assert state(fast.h2) == state(stock.h2)
    assert fast.taken == len(reads)


@dataclass
class Send:
    data: bytes


@dataclass
class Grow:
    stream_id: int
    increment: int


@dataclass
class End:
    """The server sends trailers: the stream is closed for sending."""


def stock_send(h2: H2Connection, data: bytes) -> bytes | None:
    try:
        h2.send_data(STREAM, data)
    except ProtocolError:
        return None
    return h2.data_to_send()


steps = st.lists(
    st.one_of(
        st.builds(Send, st.binary(min_size=1, max_size=300)),
        st.builds(Grow, st.sampled_from([0, STREAM]), st.integers(1, 400)),
        st.just(End()),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 600), st.sampled_from([16_384, 16_385]), steps)
def test_data_frames_are_h2_s_own_bytes_within_the_same_windows(
    window: int, max_frame: int, script: list[Send | Grow | End]
) -> None:
    stock, fast = server(window, max_frame), server(window, max_frame)
    for step in script:
        if isinstance(step, Send):
            frame = data_frame(fast, STREAM, step.data)
            assert frame == stock_send(stock, step.data)
            event("a frame sent" if frame is not None else "a frame declined")
        elif isinstance(step, Grow):
            for h2 in (stock, fast):
                h2.receive_data(window_update(step.stream_id, step.increment))
                h2.data_to_send()
        else:
            for h2 in (stock, fast):
                if not h2.streams[STREAM].state_machine.trailers_sent:
                    h2.send_headers(STREAM, [("grpc-status", "0")], end_stream=True)
                    h2.data_to_send()
        assert state(fast) == state(stock)


def test_a_frame_too_big_for_the_window_or_the_client_is_declined() -> None:
    h2 = server(window=10)
    before = state(h2)
    assert data_frame(h2, STREAM, bytes(11)) is None
    assert data_frame(h2, 3, b"x") is None  # no such stream
    assert state(h2) == before
    frame = data_frame(h2, STREAM, bytes(10))
    assert frame == b"\x00\x00\x0a\x00\x00\x00\x00\x00\x01" + bytes(10)
    assert h2.streams[STREAM].outbound_flow_control_window == 0


@pytest.mark.parametrize(
    "chunk",
    [
        ping(b"12345678", ack=True),  # grpclib's keepalive wants to see it
        ping(b"12345678")[:-1],  # half a frame
        window_update(0, 0),
        window_update(0, 2**31 - 1),  # overflows the connection's window
        window_update(3, 1),  # a stream that does not exist
        ping(b"12345678") + SettingsFrame(0).serialize(),
    ],
)
def test_what_h2_must_see_is_left_to_h2(chunk: bytes) -> None:
    h2 = server()
    before = state(h2)
    assert answer_control_frames(h2, chunk) is None
    assert state(h2) == before
