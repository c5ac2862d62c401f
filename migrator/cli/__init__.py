"""Command-line entry points, one module per command family: ``migrate-lab`` (:mod:`.lab`),
``migrate-run`` and its subcommands (:mod:`.run`, :mod:`.recover`), ``migrate-syncserver``
(:mod:`.sync`). User mistakes get one line and exit 2 (:mod:`.common`)."""

import atexit
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
    (``os._exit`` does neither). The atexit handlers run and the streams are flushed first;
    with a libvirt connection still open (a call abandoned to its timeout) the usual exit
    is taken."""
    code = run_main()
    conn = sys.modules.get("migrator.hypervisor.libvirt_conn")
    if conn is not None and conn.open_connections():
        # a libvirt call still running (abandoned to its timeout: the run said UNRESOLVED):
        # the interpreter's usual exit, which lets it end rather than cut its connection
        sys.exit(code)
    try:
        atexit._run_exitfuncs()     # what libraries registered (logging's shutdown,
        sys.stdout.flush()          # which flushes its handlers), not the teardown
        sys.stderr.flush()
    finally:
        os._exit(code)


__all__ = ["lab_main", "run_command", "run_main", "syncserver_main"]
