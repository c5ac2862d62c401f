"""Command-line entry points, one module per command family: ``migrate-lab`` (:mod:`.lab`),
``migrate-run`` and its subcommands (:mod:`.run`, :mod:`.recover`), ``migrate-syncserver``
(:mod:`.sync`). User mistakes get one line and exit 2 (:mod:`.common`)."""

from .lab import lab_main
from .run import run_main
from .sync import syncserver_main

__all__ = ["lab_main", "run_main", "syncserver_main"]
