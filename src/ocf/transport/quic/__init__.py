"""QUIC transport (``/udp/P/quic-v1``) on aioquic, with libp2p's TLS handshake.

- :mod:`.tls`: the libp2p certificate (made and checked);
- :mod:`.machine`: aioquic's sans-IO connection with mutual TLS and
  consumption-based stream credit;
- :mod:`.stream` and :mod:`.connection`: the Trio driver, exposing the
  stream and connection interface yamux's have;
- :mod:`.endpoint`: one UDP socket, demultiplexing by connection ID, and the
  hostile-peer gate (retry, handshake budget);
- :mod:`.transport`: listen and dial, as the host uses them.
"""

from .addr import is_quic_addr, quic_multiaddr
from .connection import QuicMuxedConnection
from .stream import QuicStream
from .transport import QuicTransport

__all__ = ["QuicMuxedConnection", "QuicStream", "QuicTransport", "is_quic_addr", "quic_multiaddr"]
