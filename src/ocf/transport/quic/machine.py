"""aioquic's sans-IO ``QuicConnection`` with the two things libp2p needs changed.

- **Mutual authentication.** libp2p's TLS has the server ask for the client's
  certificate; aioquic keeps that switch on its TLS context (off by default),
  which exists only once the first Initial arrives, so we turn it on there.
  With ``verify_mode=CERT_NONE`` aioquic checks only that each side holds its
  certificate's key; :mod:`.tls` then checks the libp2p extension.
- **Small TLS buffers.** See ``CRYPTO_OUT``: idle connections are the
  budget that matters for a node with hundreds of peers.
- **Receive credit follows the application.** aioquic raises a stream's
  flow-control limit as data *arrives*, so a peer could make us buffer
  without bound while nobody reads. Here a stream's limit is what the
  application has consumed plus one window, as yamux's is, so an unread
  stream stops its sender after one window.
"""

from __future__ import annotations

from typing import ClassVar

from aioquic.buffer import Buffer
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream


#: TLS output per epoch: our whole server flight with the certificate is about 1.5 KiB.
CRYPTO_OUT = 4096
CRYPTO_AFTER = 256


class Libp2pQuicConnection(QuicConnection):
    """A QUIC connection with libp2p's mutual TLS and consumption-based stream credit."""

    #: Interning table for aioquic's per-handler epoch sets: a handful of distinct values, ever.
    _shared_epochs: ClassVar[dict[frozenset[object], frozenset[object]]] = {}

    def __init__(self, *, stream_window: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        # aioquic builds a fresh frozenset of allowed epochs for each of its ~30 frame
        # handlers in every connection; equal sets are shared instead (idle memory).
        handlers = self._QuicConnection__frame_handlers  # type: ignore[attr-defined]
        for frame_type, (handler, epochs) in handlers.items():
            handlers[frame_type] = (handler, self._shared_epochs.setdefault(epochs, epochs))
        self.stream_window = stream_window
        #: bytes of each stream the application has read (the driver adds to it)
        self.consumed: dict[int, int] = {}

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True
        # aioquic sizes each epoch's TLS output buffer for certificate chains of a
        # web server (16 KiB x 3, kept for the connection's life); a libp2p flight
        # (one small self-signed certificate) takes about 1.5 KiB.
        self._crypto_buffers = {epoch: Buffer(capacity=CRYPTO_OUT) for epoch in self._crypto_buffers}

    def shrink_after_handshake(self) -> None:
        """The handshake is done: TLS writes nothing more that needs room (no session tickets here)."""
        self._crypto_buffers = {epoch: Buffer(capacity=CRYPTO_AFTER) for epoch in self._crypto_buffers}

    def credit_due(self, stream_id: int) -> bool:
        """True when enough was read on ``stream_id`` that a MAX_STREAM_DATA should go out now."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.max_stream_data_local:
            return False
        target = self.consumed.get(stream_id, 0) + self.stream_window
        return target - stream.max_stream_data_local_sent >= self.stream_window // 2

    def forget_stream(self, stream_id: int) -> None:
        self.consumed.pop(stream_id, None)

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream) -> None:
        sid = stream.stream_id
        if sid is None or not stream.max_stream_data_local or stream.receiver.is_finished:
            return  # our own unidirectional streams, or nothing more will arrive
        target = self.consumed.get(sid, 0) + self.stream_window
        if target - stream.max_stream_data_local >= self.stream_window // 2:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(sid)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local
