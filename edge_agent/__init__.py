"""The fedmq edge agent: the device daemon that trains locally and uploads model deltas."""
