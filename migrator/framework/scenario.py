"""Finding a scenario: a Python file defining one ``MultihostMigration`` subclass (or an
Autotest control file that also makes and runs it, :mod:`.controlfile`), or the name of a
ready one in ``scenarios/``."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import sys
import traceback
import types
from pathlib import Path

from ..errors import ConfigError
from .context import RunContext
from .controlfile import ControlTest
from .multihost import MultihostMigration

#: ready scenarios: ``scenarios/`` next to the package (a source checkout or editable
#: install), or where ``$MIGRATOR_SCENARIOS`` points
READY_DIR = Path(os.environ.get("MIGRATOR_SCENARIOS",
                                Path(__file__).resolve().parents[2] / "scenarios"))


def ready_scenarios() -> list[str]:
    return sorted(p.stem for p in READY_DIR.glob("*.py") if not p.name.startswith("_"))


def scenario_path(what: str) -> Path:
    """The file of scenario ``what``: a path, or the name of a ready one.

    :raise ConfigError: no such file or ready scenario.
    """
    path = Path(what)
    if not path.suffix and not path.exists():
        path = READY_DIR / f"{what}.py"
        if not path.is_file():
            raise ConfigError(f"no scenario {what!r}: not a file, and not a ready scenario "
                              f"({', '.join(ready_scenarios()) or 'none found'})")
    elif not path.is_file():
        raise ConfigError(f"scenario file {what} does not exist")
    return path


def load_scenario(what: str) -> type[MultihostMigration]:
    """The scenario class in file ``what``, or in the ready scenario named ``what``.

    :raise ConfigError: no such file or scenario, the file does not import, or it defines
        no (or several) ``MultihostMigration`` subclasses.
    """
    path = scenario_path(what)
    return _the_class(_execute(path, f"migrator_scenario_{path.stem}", {}), path)


def make_instances(what: str, groups: list[list[str]], names: list[str], ctx: RunContext,
                   outputdir: Path | None = None) -> list[MultihostMigration]:
    """One instance of scenario ``what`` per host group, as ``migrate-run`` runs them.

    A scenario file is executed once and its class made per group. An Autotest control
    file (:func:`is_control_file`) is executed once per instance with the control-file names
    set (:mod:`.controlfile`), as autoserv did: one whose last lines make the instance
    (``mig = TestX(test, params, env); mig.run()``) gives that one; otherwise its class is
    made here with Autotest's ``(test, params, env)``.

    :raise ConfigError: as :func:`load_scenario`, or the file made more than one instance,
        or bad hosts or VMs (before anything starts).
    """
    path = scenario_path(what)
    if not is_control_file(path):
        cls = load_scenario(str(path))
        return [cls(group, context=ctx, name=name) for group, name in zip(groups, names)]
    instances = []
    for group, name in zip(groups, names):
        control = ControlTest(ctx, group, name, outputdir)
        module = _execute(path, f"migrator_scenario_{path.stem}_{name}", control.namespace())
        control.loading = False
        cls = _the_class(module, path)
        if control.instances:
            instances.append(control.instances[0])
        elif _takes_autotest_args(cls):
            instances.append(cls(control, control.params, control.env))
        else:
            instances.append(cls(group, context=ctx, name=name))
    return instances


_CONTROL_NAMES = {"test", "params", "env", "virt_utils"}


def is_control_file(path: Path) -> bool:
    """Whether the file is written as an Autotest control file: code that runs when it loads
    (not inside a function) reads ``test``, ``params``, ``env`` or ``virt_utils``, or a
    constructor takes ``(self, test, params, env)``. Undecidable (a syntax error): False,
    and loading it says what is wrong."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (SyntaxError, ValueError, OSError):
        return False

    def loads_at_load_time(node: ast.AST) -> bool:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name == "__init__" and \
                    [a.arg for a in node.args.args[1:4]] == ["test", "params", "env"]:
                return True
            return any(loads_at_load_time(d) for d in node.decorator_list)
        if isinstance(node, ast.Lambda):
            return False
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            return node.id in _CONTROL_NAMES
        return any(loads_at_load_time(child) for child in ast.iter_child_nodes(node))
    return loads_at_load_time(tree)


def _takes_autotest_args(cls: type) -> bool:
    try:
        names = list(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        return False
    return names[1:4] == ["test", "params", "env"]


def _execute(path: Path, name: str, namespace: dict) -> types.ModuleType:
    """Execute scenario file ``path`` as module ``name``, with ``namespace`` set first.

    :raise ConfigError: it raised, naming the file's line.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    vars(module).update(namespace)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        mine = os.path.realpath(path)
        lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__)
                 if os.path.realpath(f.filename) == mine]
        where = f"{path}:{lines[-1]}" if lines else str(path)
        raise ConfigError(f"scenario {where} does not load: {type(exc).__name__}: {exc}") \
            from exc
    return module


def _the_class(module: types.ModuleType, path: Path) -> type[MultihostMigration]:
    """The one MultihostMigration subclass ``module`` defines.

    :raise ConfigError: none, or several.
    """
    found = [obj for obj in vars(module).values()
             if inspect.isclass(obj) and issubclass(obj, MultihostMigration)
             and obj is not MultihostMigration and obj.__module__ == module.__name__]
    if len(found) != 1:
        what_found = ", ".join(c.__name__ for c in found) or "none"
        raise ConfigError(f"scenario {path} must define exactly one MultihostMigration "
                          f"subclass (found: {what_found})")
    return found[0]
