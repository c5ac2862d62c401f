"""``migrate-run report RUN_DIR...``: (re)make ``report.html`` of finished runs from their
records (``run.json``, ``migrations/``): for runs made before the report existed, or after
a change of the template."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .common import Parser, fail, setup_logging


def main(argv: list[str]) -> int:
    p = Parser(prog="migrate-run report",
               description="Write RUN_DIR/report.html (verdict, tables, failures, plots) from "
                           "a finished run's records; prints its path.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run's results directory (results/<run-id>)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    from ..report.html import write_html
    try:
        for d in map(Path, args.run_dirs):       # all checked before any is written
            if not (d / "run.json").is_file():
                raise ConfigError(f"{d}: not a run's results directory (no run.json)")
        for d in map(Path, args.run_dirs):
            print(write_html(d))
    except ConfigError as exc:
        return fail("migrate-run report", exc, args.verbose)
    return 0
