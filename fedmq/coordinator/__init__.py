"""The aggregator's round coordinator: pure, synchronous, no IO (``fedmq serve`` runs it).

- :mod:`~fedmq.coordinator.coordinator`: the state machine's inputs and end-of-input step.
- :mod:`~fedmq.coordinator.lifecycle`: round phases and their legal transitions.
- :mod:`~fedmq.coordinator.rules`: when rounds open and close, sync and FedBuff.
- :mod:`~fedmq.coordinator.round_flow`: executes those decisions and announces rounds.
- :mod:`~fedmq.coordinator.update_desk`, :mod:`~fedmq.coordinator.admission`,
  :mod:`~fedmq.coordinator.intake`, :mod:`~fedmq.coordinator.validation`: an update's
  way from chunks to an ack.
- :mod:`~fedmq.coordinator.release_desk`, :mod:`~fedmq.coordinator.releases`: the
  inference models released to the devices.
- :mod:`~fedmq.coordinator.status_report`: the published aggregator status.
- :mod:`~fedmq.coordinator.actions`: the commands and events it returns.
- :mod:`~fedmq.coordinator.state`, :mod:`~fedmq.coordinator.snapshot`: what is durable.
"""
