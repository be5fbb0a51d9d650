"""Kafka between the services: what FT, Core and the recorder agree on.

One topic (``quotes`` unless configured), one record per quote:

- **key**: the symbol, UTF-8 (so every quote of a symbol lands in one partition,
  in order: Kafka orders records within a partition only);
- **value**: the protobuf ``Quote`` of ``proto/quotes.proto``, the very bytes of
  the gRPC message minus its 5-byte length prefix, encoded once per tick;
- **timestamp**: the producer's send time (Kafka's ``CreateTime``).

:mod:`quotopia.bus.topic` holds the pure part (names, keys, the bootstrap list);
:mod:`quotopia.bus.admin` creates the topic and says why a broker call failed.
"""
