"""Command-line entry points, one module per command family: ``migrate-lab`` (:mod:`.lab`),
``migrate-run`` and its subcommands (:mod:`.run`, :mod:`.recover`), ``migrate-syncserver``
(:mod:`.sync`). User mistakes get one line and exit 2 (:mod:`.common`)."""

import logging
import os
import sys

from .lab import lab_main
from .run import run_main
from .sync import syncserver_main


def run_command() -> None:
    """The ``migrate-run`` program: :func:`run_main`, then out at once. Everything the run
    owns is closed and written by then (hosts, VMs, records, report, journal); what is left is
    the interpreter tearing down a thousand modules one by one, 0.14 s measured (issue 22),
    and waiting for non-daemon threads, among them any libvirt call abandoned to its timeout
    (``os._exit`` does neither). Streams and log handlers are flushed first."""
    code = run_main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
    finally:
        os._exit(code)


__all__ = ["lab_main", "run_command", "run_main", "syncserver_main"]
