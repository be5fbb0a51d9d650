"""FT's two fast paths through h2: a tick's DATA frame out, a client's control frames in.

Under fan-out, every subscriber costs FT the same few HTTP/2 frames per tick: the
DATA frame of the tick's quotes going out, and, coming back from real gRPC clients
(grpc-go, grpcio's C-core), a WINDOW_UPDATE and a PING (their flow-control
bookkeeping and bandwidth estimate), which FT must answer with a PING ACK. h2, the
HTTP/2 state machine under grpclib, handles each of them in general-purpose
Python: frame objects, event objects, state-machine transitions, logging calls.
At 5,000 subscribers that was over half of FT's CPU, more than the socket writes.

The fast paths do the same, for exactly these common frames, in a few arithmetic
operations on h2's own state, and hand everything else to h2:

- :func:`data_frame` builds a DATA frame and takes its size off h2's flow-control
  windows, when h2 would send it as is: the connection and the stream open for
  sending, the frame within both windows and the client's largest frame size.
- :func:`answer_control_frames` takes a chunk of received bytes that is nothing
  but whole PING and WINDOW_UPDATE frames h2 would accept without a remark, adds
  the increments to h2's windows and returns the PING ACKs to send. For anything
  else (a partial frame, another type, a PING ACK, a zero or overflowing increment,
  an unknown or closing stream, a connection not fully open) it changes nothing
  and returns None, and the caller gives the bytes to h2 as before.

The bytes are the ones h2 writes, and h2's state ends up as h2 would leave it;
``tests/test_h2fast.py`` checks both against h2 itself, frame sequence by frame
sequence. This module and :mod:`quotopia.ft.writer` are the only ones that touch
h2's internals, which are not its public API: those tests run both paths on the
installed h2, so a change of h2's internals fails them before it reaches FT.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from grpclib.protocol import H2Protocol
from h2.connection import ConnectionState, H2Connection
from h2.stream import StreamState

__all__ = ["ControlAnswer", "FastControlProtocol", "answer_control_frames", "data_frame"]

#: A frame header: the 24-bit length (as 16 + 8 bits), type, flags, stream id.
_HEADER = struct.Struct(">HBBBL")
_HEADER_SIZE = _HEADER.size  # 9
_DATA, _PING, _WINDOW_UPDATE = 0x0, 0x6, 0x8
_ACK = 0x1
_MAX_WINDOW = 2**31 - 1
#: The stream states in which h2 sends DATA and takes a WINDOW_UPDATE plainly (a
#: server-streaming call sits in HALF_CLOSED_REMOTE once the request has arrived).
_STREAMING = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_PING_ACK_HEADER = _HEADER.pack(0, 8, _PING, _ACK, 0)


def data_frame(h2: H2Connection, stream_id: int, data: bytes) -> bytes | None:
    """Everything to write for a DATA frame of ``data`` on ``stream_id``, or None.

    The bytes are what h2 had queued to send (normally nothing), then the frame;
    the frame's size is taken off the connection's and the stream's windows, as
    ``h2.send_data`` does. None, with nothing changed, when h2 would not send the
    frame as it is: a connection not open, a stream not open for sending (unknown,
    closed, trailers sent), a window or the client's largest frame too small.
    """
    stream = h2.streams.get(stream_id)
    size = len(data)
    if (
        stream is None
        or h2.state_machine.state is not ConnectionState.SERVER_OPEN
        or stream.state_machine.state not in _STREAMING
        or stream.state_machine.trailers_sent
        or size > stream.outbound_flow_control_window
        or size > h2.outbound_flow_control_window
        or size > h2.max_outbound_frame_size
    ):
        return None
    stream.outbound_flow_control_window -= size
    h2.outbound_flow_control_window -= size
    frame = _HEADER.pack(size >> 8, size & 0xFF, _DATA, 0, stream_id) + data
    queued = h2.data_to_send()
    return queued + frame if queued else frame


@dataclass(frozen=True, slots=True)
class ControlAnswer:
    """What :func:`answer_control_frames` did with a chunk of control frames."""

    #: To write to the client, in order: what h2 had queued, then the PING ACKs.
    reply: bytes
    #: The streams whose window grew (0: the connection's), each once, in order.
    windows_updated: tuple[int, ...]


def answer_control_frames(h2: H2Connection, data: bytes) -> ControlAnswer | None:
    """Handle ``data`` if it is only PING and WINDOW_UPDATE frames h2 would take plainly.

    Returns what to send and which windows grew, having added the increments to
    h2's windows; or None, having changed nothing, and then ``data`` is h2's to
    handle (see the module's docstring for what qualifies).
    """
    buffer = h2.incoming_buffer
    if (
        h2.state_machine.state is not ConnectionState.SERVER_OPEN
        or buffer._data
        or buffer._preamble_len
        or buffer._headers_buffer
    ):
        return None
    end = len(data)
    offset = 0
    acks: list[bytes] = []
    # Validate everything first: either the whole chunk is applied, or none of it.
    increments: dict[int, int] = {}
    while offset < end:
        if end - offset < _HEADER_SIZE:
            return None
        high, low, frame_type, flags, stream_id = _HEADER.unpack_from(data, offset)
        length = high << 8 | low
        body = offset + _HEADER_SIZE
        offset = body + length
        if offset > end:
            return None
        if frame_type == _PING:
            if length != 8 or flags or stream_id:
                return None  # an ACK (h2 reports it to grpclib's keepalive), or malformed
            acks += (_PING_ACK_HEADER, data[body:offset])
        elif frame_type == _WINDOW_UPDATE:
            if length != 4:
                return None
            increment = int.from_bytes(data[body:offset], "big") & _MAX_WINDOW
            stream_id &= _MAX_WINDOW
            if not increment:
                return None
            increments[stream_id] = increments.get(stream_id, 0) + increment
        else:
            return None
    for stream_id, increment in increments.items():
        if stream_id:
            stream = h2.streams.get(stream_id)
            if stream is None or stream.state_machine.state not in _STREAMING:
                return None
            window = stream.outbound_flow_control_window
        else:
            window = h2.outbound_flow_control_window
        if window + increment > _MAX_WINDOW:
            return None
    for stream_id, increment in increments.items():
        if stream_id:
            h2.streams[stream_id].outbound_flow_control_window += increment
        else:
            h2.outbound_flow_control_window += increment
    return ControlAnswer(h2.data_to_send() + b"".join(acks), tuple(increments))


class FastControlProtocol(H2Protocol):
    """grpclib's server protocol, with :func:`answer_control_frames` in front of h2.

    What grpclib does after h2 has handled such frames is kept: a WINDOW_UPDATE
    wakes the handlers waiting for room on its stream (every stream, for the
    connection's window); a PING needs nothing more than its ACK.
    """

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        answer = answer_control_frames(connection._connection, data)
        if answer is None:
            super().data_received(data)
            return
        if answer.reply:
            connection._transport.write(answer.reply)
        streams = self.processor.streams
        for stream_id in answer.windows_updated:
            if stream_id:
                if (stream := streams.get(stream_id)) is not None:
                    stream.window_updated.set()
            else:
                for stream in streams.values():
                    stream.window_updated.set()
