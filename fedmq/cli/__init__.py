"""The ``fedmq`` operator command line (server extra: typer, rich)."""
