"""``self.params``: the run's config as one scenario instance sees it, read the Autotest way.

::

    self.params.get("hosts")                        # this instance's hosts, in order
    self.params.get("migration.bandwidth_mibs")     # a config key, dotted
    self.params.get("rounds", 3)                    # scenario.rounds (-p scenario.rounds=5)
    self.params.migration.downtime_limit_ms         # the Config's attributes, as before

A key that is not a config section is looked up under ``scenario`` (free-form values set
with ``-p scenario.KEY=VALUE`` or the config file's ``scenario:`` mapping), where Autotest
users keep what its flat ``params`` held. The config's own sections come first: Autotest's
``params.get("vms")`` (a string of names) is migrator's ``vms`` mapping here; read such a
key as ``params.get("scenario.vms")``. Params are read-only: the config is the run's.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ..config import Config

_MISSING = object()


class Params:
    """The run's :class:`Config` plus this instance's hosts; attribute access is the
    Config's own."""

    def __init__(self, config: Config, hosts: list[str]):
        self._config, self._hosts = config, list(hosts)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):        # copy/pickle probe before __init__ ran
            raise AttributeError(name)
        return getattr(self._config, name)

    def __repr__(self) -> str:
        return f"<Params hosts={self._hosts}>"

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (dotted for nested keys), or ``default`` if it is not set.

        ``"hosts"`` is this instance's host names, in order. A first component that is not
        a config section is a key under ``scenario``.
        """
        value = self._lookup(key)
        return default if value is _MISSING or value is None else value

    def __getitem__(self, key: str) -> Any:
        value = self._lookup(key)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return self._lookup(key) is not _MISSING

    def _lookup(self, key: str) -> Any:
        if key == "hosts":
            return list(self._hosts)
        parts = key.split(".")
        node: Any = self._config
        if parts[0] not in type(self._config).model_fields:
            node = self._config.scenario
        for part in parts:
            if isinstance(node, BaseModel) and part in type(node).model_fields:
                node = getattr(node, part)
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return _MISSING
        return node
