"""``fedmq monitor``: watch a federation from its control topics, read-only.

- :mod:`~fedmq.monitor.state`: :class:`~fedmq.monitor.state.MonitorState` folds decoded
  control messages (round announcement, agent statuses, aggregator status) into a
  snapshot: pure, the clock passed in.
- :mod:`~fedmq.monitor.view`: the snapshot as a rich renderable (the live view).
- :mod:`~fedmq.monitor.live`: the MQTT part: subscribe to the control topics (never
  to blobs, updates or acks), feed the state, redraw, or settle and print once.
"""
