"""Exit codes of ``fedmq serve`` / ``fedmq export`` (sysexits.h values).

Distinct codes let systemd tell "fix the configuration" from "restart me"::

    RestartPreventExitStatus=78 74
"""

OK = 0
RUNTIME_FAILURE = 70  # EX_SOFTWARE: an unexpected failure; a restart resumes from the state dir
STATE_FAILURE = 74  # EX_IOERR: the state directory is unusable or corrupt; needs an operator
CONFIG_ERROR = 78  # EX_CONFIG: bad federation.toml, environment or bundle; fix and restart
