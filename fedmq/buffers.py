"""The byte-buffer type every layer accepts (no fedmq imports: it sits beside ``errors``).

Payloads arrive as ``bytes`` from MQTT, grow in ``bytearray`` reassembly buffers and are
sliced as ``memoryview`` to avoid copies; functions that only read bytes take any of them.
"""

from __future__ import annotations

Buffer = bytes | bytearray | memoryview
