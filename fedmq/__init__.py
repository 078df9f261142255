"""fedmq: federated learning for factory edge devices over MQTT."""

# The single source of the version (pyproject reads it).  A constant, not
# importlib.metadata: parsing package metadata costs a device ~3.5 MB of memory.
__version__ = "0.1.0"

__all__ = ["__version__"]
