"""Exit codes of every fedmq command (``fedmq …`` and ``fedmq-agent …``), in one place.

Values come from sysexits.h (``os.EX_*``) so systemd and scripts can tell "fix the
configuration" from "restart me"::

    RestartPreventExitStatus=78 74

    0    OK               done, stopped on request, or the federation finished
    2    USAGE            bad command line (typer/argparse print the usage)
    3    COMPILE_ERROR    ``fedmq compile``: the model or its options cannot be compiled
    70   RUNTIME_FAILURE  an unexpected failure; a restart resumes from the state directory
    74   STATE_FAILURE    the state directory is unusable or corrupt; needs an operator
    75   BUSY             ``fedmq clear``: the aggregator still runs; stop it, or --force
    78   CONFIG_ERROR     bad configuration, environment, bundle or missing extra; fix first
    130  INTERRUPTED      Ctrl-C (128 + SIGINT, as shells report it)
"""

from __future__ import annotations

import os
import signal

OK = os.EX_OK
USAGE = 2  # what click and typer exit with on a bad command line (os.EX_USAGE is 64)
COMPILE_ERROR = 3  # not a crash: the input model is at fault, the message says how
RUNTIME_FAILURE = os.EX_SOFTWARE
STATE_FAILURE = os.EX_IOERR
BUSY = os.EX_TEMPFAIL  # refused for now: what it would change is still in use
CONFIG_ERROR = os.EX_CONFIG
INTERRUPTED = 128 + int(signal.SIGINT)
