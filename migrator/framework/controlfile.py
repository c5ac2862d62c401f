"""Autotest control files: scenario files that make and run their instance themselves.

Autotest's multi-host example (``../shared/seeds``) ends like this::

    class TestMultihostMigration(virt_utils.MultihostMigration):
        def __init__(self, test, params, env):
            super().__init__(test, params, env)

        def migration_scenario(self):
            ...

    mig = TestMultihostMigration(test, params, env)
    mig.run()

autoserv executed such a file once per machine set (each pair, or all machines with
``-a all``). ``migrate-run`` does the same: it executes the file once per scenario instance,
with these names already set:

* ``test``: the instance to be (:class:`ControlTest`: its ``hosts``, ``name``, ``outputdir``);
* ``params``: the config as Autotest's params (:class:`~.params.Params`:
  ``params.get("hosts")``, dotted keys);
* ``env``: the instance's VMs (``env.get_vm("vm1")``, also from ``def`` callbacks);
* ``virt_utils``: a namespace holding :class:`MultihostMigration`, as the seeds spell it.

``TestX(test, params, env)`` then makes the instance, and ``mig.run()`` only says it is to
run: ``migrate-run`` runs every instance together, once all are made. A file that defines the
class without those last lines gets the same: ``migrate-run`` makes ``TestX(test, params,
env)`` itself.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .context import RunContext
from .params import Params

if TYPE_CHECKING:
    from .env import Env
    from .multihost import MultihostMigration


class ControlTest:
    """Autotest's ``test`` for one execution of a control file: one scenario instance."""

    def __init__(self, context: RunContext, hosts: list[str], name: str,
                 outputdir: Path | None = None):
        from .env import instance_env
        self.context, self.hosts, self.name = context, list(hosts), name
        #: where the run's results go (Autotest's ``test.outputdir``)
        self.outputdir = outputdir
        self.params = Params(context.config, self.hosts)
        self.env: Env = instance_env(context, name)
        self.instances: list[MultihostMigration] = []
        #: the file is being executed (``mig.run()`` only sets :attr:`run_asked`)
        self.loading = True
        self.run_asked = False

    def __repr__(self) -> str:
        return f"<ControlTest {self.name} {self.hosts}>"

    def namespace(self) -> dict[str, Any]:
        """The names a control file finds set."""
        from .multihost import MultihostMigration
        return {"test": self, "params": self.params, "env": self.env,
                "virt_utils": types.SimpleNamespace(MultihostMigration=MultihostMigration)}

    def adopt(self, instance: "MultihostMigration", args: tuple) -> "Env":
        """``TestX(test, params, env)``: the instance's Env.

        :raise ConfigError: not this file's own ``params`` and ``env``, or a second instance
            from one execution.
        """
        cls = type(instance).__name__
        if len(args) != 2 or args[0] is not self.params or args[1] is not self.env:
            raise ConfigError(f"{cls}(test, params, env): pass the control file's own test, "
                              "params and env")
        if self.instances:
            raise ConfigError(f"{cls}(test, params, env): a control file makes one instance "
                              f"each time it runs; this one made a second")
        self.instances.append(instance)
        return self.env
