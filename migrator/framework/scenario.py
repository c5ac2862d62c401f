"""Finding a scenario: a Python file defining one ``MultihostMigration`` subclass, or the name
of a ready one in ``scenarios/``."""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from pathlib import Path

from ..errors import ConfigError
from .multihost import MultihostMigration

#: ready scenarios: ``scenarios/`` next to the package (a source checkout or editable
#: install), or where ``$MIGRATOR_SCENARIOS`` points
READY_DIR = Path(os.environ.get("MIGRATOR_SCENARIOS",
                                Path(__file__).resolve().parents[2] / "scenarios"))


def ready_scenarios() -> list[str]:
    return sorted(p.stem for p in READY_DIR.glob("*.py") if not p.name.startswith("_"))


def load_scenario(what: str) -> type[MultihostMigration]:
    """The scenario class in file ``what``, or in the ready scenario named ``what``.

    :raise ConfigError: no such file or scenario, the file does not import, or it defines
        no (or several) ``MultihostMigration`` subclasses.
    """
    path = Path(what)
    if not path.suffix and not path.exists():
        path = READY_DIR / f"{what}.py"
        if not path.is_file():
            raise ConfigError(f"no scenario {what!r}: not a file, and not a ready scenario "
                              f"({', '.join(ready_scenarios()) or 'none found'})")
    elif not path.is_file():
        raise ConfigError(f"scenario file {what} does not exist")
    name = f"migrator_scenario_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"scenario {path} does not load: {type(exc).__name__}: {exc}") \
            from exc
    found = [obj for obj in vars(module).values()
             if inspect.isclass(obj) and issubclass(obj, MultihostMigration)
             and obj is not MultihostMigration and obj.__module__ == name]
    if len(found) != 1:
        what_found = ", ".join(c.__name__ for c in found) or "none"
        raise ConfigError(f"scenario {path} must define exactly one MultihostMigration "
                          f"subclass (found: {what_found})")
    return found[0]
