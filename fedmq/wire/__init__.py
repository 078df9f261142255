"""The fedmq wire protocol: topics, control messages, tensor codecs, chunked blobs.

Pure and synchronous: nothing here imports asyncio, aiomqtt or onnxruntime, so every
message can be built and parsed in a unit test without a broker (``tests/test_layering.py``
enforces it, with the rest of the layer table in ``docs/architecture.md``).
"""
