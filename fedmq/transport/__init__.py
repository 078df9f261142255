"""MQTT IO: the only place fedmq touches the network."""
