"""Local MQTT brokers that fedmq starts as child processes, for tests, benchmarks and simulations.

"Broker" means the MQTT server throughout fedmq.  This package runs one on a free
loopback port: :class:`~fedmq.broker.mosquitto.MosquittoBroker` (persistent and
restartable, from ``broker_config/mosquitto/dev.conf.template``) or, where Mosquitto is
not installed, :class:`~fedmq.broker.embedded.EmbeddedBroker` (amqtt, the ``simulate``
extra).  With :class:`~fedmq.broker.mosquitto.ProductionMosquittoConfig` the Mosquitto
broker runs the plant's ``production.conf.template`` instead (mutual TLS, ACL, CRL), so
tests check what a plant broker enforces.  Nothing in production imports it: connecting
to a broker is :mod:`fedmq.transport`, whose ``[broker]`` configuration table is
:mod:`fedmq.transport.broker_config`.
"""
