"""What every command shares: one-line usage errors (exit 2), logging, failure lines,
timestamps, ``-p KEY=VALUE`` overrides.

User mistakes get one line on stderr and exit status 2; failures of the lab or a host get one
line and exit status 1 (``-v`` adds the traceback); Ctrl-C exits 130 after cleanup.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback

from ..errors import ConfigError


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record comes, not the one
    there when it was made: the live view (:mod:`migrator.report.live`) redirects stderr
    above its bars, and a warning written past it would land inside them."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=[CurrentStderr()])


def fail(prog: str, exc: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(exc)
    code = 2 if isinstance(exc, ConfigError) else 1
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return code


def stamp(t0: float):
    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.2f}s] {msg}", flush=True)
    return say


def overrides(params: list[str]) -> dict:
    """``-p`` values are YAML scalars: ``100`` is a number, ``true`` a boolean."""
    import yaml
    out = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-p {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def load_setup(args):
    """The config (``-c``, ``-p``) and the inventory (``-i``) of a command's ``args``.

    :raise ConfigError: a bad config, key or value; :raise InventoryError: no inventory."""
    from ..config import Config, load_any_inventory
    return Config.load(args.config, overrides(args.param)), load_any_inventory(args.inventory)


def add_setup_options(p: argparse.ArgumentParser, inventory: bool = True) -> None:
    """``-i`` (with ``inventory``), ``-c``, ``-p``, ``-v``: what every command that reads the
    config (and the inventory) takes, for :func:`load_setup`."""
    if inventory:
        p.add_argument("-i", "--inventory", help="inventory file (default: "
                       "$MIGRATOR_INVENTORY, else the default lab's)")
    p.add_argument("-c", "--config", help="config file (YAML)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set one config key, dotted (-p journal.state_dir=DIR); overrides "
                        "the config file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
