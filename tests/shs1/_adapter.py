"""Drive one of minibus's sans-io shs1 machines over stdin/stdout, as shs1-test expects.

The harness (npm ``shs1-test``) spawns the adapter, plays the other side over the pipes,
and checks: on an honest peer, exactly the remaining handshake messages and then the
112-byte outcome; on a faulty peer, a non-zero exit with nothing more written.
"""

from __future__ import annotations

import os
import sys

from bus.errors import HandshakeError
from bus.wire.shs import ClientHandshake, ServerHandshake


def _write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(1, view)
        view = view[written:]


def drive(machine: ClientHandshake | ServerHandshake) -> int:
    try:
        while not machine.is_done:
            _write(machine.data_to_send())
            data = os.read(0, machine.bytes_wanted)
            if not data:
                machine.end_of_input()
            machine.receive_data(data)
    except HandshakeError as exc:
        print(f"shs1 adapter: {exc}", file=sys.stderr)
        return 1
    _write(machine.data_to_send() + machine.outcome.to_bytes())
    return 0
