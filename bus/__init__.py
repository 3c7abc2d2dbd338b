"""minibus: a small plugin bus and name service on trio, with Scuttlebutt's secret handshake.

Layers (dependencies point downward only):

* :mod:`bus.wire` -- sans-io: identities, shs1, box-stream, frame codec.
* :mod:`bus.core` -- sans-io: registry, policy, routing (the broker's decisions).
* :mod:`bus.io` -- trio: :class:`~bus.io.secure.SecureStream` and framed connections.
"""

__version__ = "0.1.0"
