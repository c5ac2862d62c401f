"""Parameter sweeps: one scenario run for every combination of some config values, repeated,
then compared (QEMU's guestperf ``comparison.py``, from the CLI: ``migrate-run sweep``).

::

    sweep = Sweep.make("ping_pong", axes={"migration.multifd_channels": [1, 2, 4, 8]},
                       fixed={"scenario.rounds": 1}, repeat=3)
    sweep.check(config_file)             # every combination validated before anything runs
    result = await run_sweep(sweep, out_dir, base_args)

Each run is a whole ``migrate-run`` process (its own results directory under
``<sweep>/runs/NNN/``, its own log), as a person would run it by hand, so a sweep measures
what a run costs, start-up included. Runs go repetition by repetition, every setting in
each (1, 2, 4, 8, 1, 2, 4, 8, ...): drift of the machine over the sweep falls on every
setting alike instead of on the last one.

A ready sweep is a YAML file (``configs/sweeps/*.yaml``: ``scenario``, ``params`` (key ->
list of values), ``set`` (fixed keys), ``repeat``, ``description``); ``--sweep NAME``
finds one there by name.

Errors: :class:`~migrator.errors.ConfigError` (exit 2, before anything runs) for an unknown
key, a value the config refuses, an empty value list, a key swept twice, a bad file.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..aio import cancel_and_wait
from ..config import Config
from ..errors import ConfigError
from .process import interrupt, wait_run

#: ready sweeps: ``configs/sweeps/`` of the source tree, or ``$MIGRATOR_SWEEPS``
READY_DIR = Path(os.environ.get("MIGRATOR_SWEEPS",
                                Path(__file__).resolve().parents[2] / "configs" / "sweeps"))


def _scalar(text: str) -> Any:
    """A value as ``-p`` takes it: a YAML scalar (``4`` a number, ``true`` a boolean)."""
    import yaml
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, (dict, list)) else value


def parse_axis(item: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` of ``--param``. :raise ConfigError: no ``=`` or no value."""
    key, sep, values = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--param {item!r}: expected KEY=VALUE[,VALUE...]")
    parts = [v.strip() for v in values.split(",")]
    if not values.strip() or any(not v for v in parts):
        raise ConfigError(f"--param {item!r}: empty value list (give KEY=V1,V2,...)")
    return key, [_scalar(v) for v in parts]


def label(setting: dict[str, Any]) -> str:
    """``multifd_channels=4 bandwidth_mibs=100``: a setting in short (the keys' last part)."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in setting.items()) or "(as is)"


@dataclass
class Sweep:
    scenario: str
    axes: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    repeat: int = 1
    description: str = ""
    name: str = "sweep"

    @classmethod
    def make(cls, scenario: str, axes: dict[str, list[Any]], fixed: dict[str, Any] | None = None,
             repeat: int = 1, description: str = "", name: str = "sweep") -> "Sweep":
        """:raise ConfigError: no axis, an empty value list, a repeat below 1, a key both
        swept and fixed."""
        if not axes:
            raise ConfigError("a sweep needs at least one --param KEY=V1,V2,...")
        for key, values in axes.items():
            if not values:
                raise ConfigError(f"sweep key {key!r}: empty value list")
            if len(set(map(repr, values))) != len(values):
                raise ConfigError(f"sweep key {key!r}: a value is given twice: {values}")
        if repeat < 1:
            raise ConfigError(f"--repeat {repeat}: at least 1")
        both = sorted(set(axes) & set(fixed or {}))
        if both:
            raise ConfigError(f"{', '.join(both)}: both swept (--param) and fixed (-p / set)")
        return cls(scenario, dict(axes), dict(fixed or {}), repeat, description, name)

    @classmethod
    def load(cls, what: str) -> "Sweep":
        """A sweep file, or the name of a ready one. :raise ConfigError: missing or bad."""
        import yaml
        path = Path(what)
        if not path.suffix and not path.exists():
            path = READY_DIR / f"{what}.yaml"
        if not path.is_file():
            ready = sorted(p.stem for p in READY_DIR.glob("*.yaml"))
            raise ConfigError(f"no sweep {what!r}: not a file, and not a ready sweep "
                              f"({', '.join(ready) or 'none'})")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        known = {"scenario", "params", "set", "repeat", "description"}
        if not isinstance(data, dict) or set(data) - known or "params" not in data:
            raise ConfigError(f"{path}: a sweep has 'params' (and 'scenario', 'set', "
                              f"'repeat', 'description'); it has: "
                              f"{', '.join(map(str, data)) if isinstance(data, dict) else data}")
        params, fixed = data["params"], data.get("set") or {}
        if not isinstance(params, dict) or not all(isinstance(v, list) for v in params.values()):
            raise ConfigError(f"{path}: 'params' maps each key to a list of values")
        if not isinstance(fixed, dict):
            raise ConfigError(f"{path}: 'set' maps keys to values")
        repeat, scenario = data.get("repeat", 1), data.get("scenario", "")
        if not isinstance(repeat, int) or isinstance(repeat, bool):
            raise ConfigError(f"{path}: 'repeat' is a whole number, not {repeat!r}")
        if not isinstance(scenario, str):
            raise ConfigError(f"{path}: 'scenario' is a name or a path, not {scenario!r}")
        return cls.make(scenario, params, fixed, repeat, str(data.get("description", "")),
                        path.stem)

    def settings(self) -> list[dict[str, Any]]:
        """Every combination of the axes' values, in the axes' order."""
        keys = list(self.axes)
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.axes.values())]

    def check(self, config_file: str | None) -> None:
        """Every setting makes a valid config (with the config file and the fixed keys).

        :raise ConfigError: naming the setting and the key.
        """
        for setting in self.settings():
            try:
                Config.load(config_file, {**self.fixed, **setting})
            except ConfigError as exc:
                raise ConfigError(f"sweep setting {label(setting)}: {exc}") from None

    def to_json(self) -> dict:
        return {"name": self.name, "scenario": self.scenario, "axes": self.axes,
                "fixed": self.fixed, "repeat": self.repeat, "description": self.description}


@dataclass
class SweepRun:
    """One run of a sweep: a setting, its repetition, and what came of it."""

    index: int
    repeat: int
    setting: dict[str, Any]
    run_dir: str | None = None
    exit_status: int | None = None
    verdict: str = "not run"
    wall_s: float = 0.0
    controller_cpu_s: float = 0.0        #: the migrate-run process's user + system CPU
    migrations: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**self.__dict__, "label": label(self.setting)}


def _migration_figures(run_dir: Path) -> list[dict]:
    """What a comparison needs of each migration of a finished run."""
    run = json.loads((run_dir / "run.json").read_text())
    out = []
    for m in run.get("migrations", []):
        try:
            rec = json.loads((run_dir / "migrations" / f"{m['mig_id']}-{m['vm']}.json")
                             .read_text())
        except (OSError, ValueError):
            continue
        figures = {k: rec.get(k) for k in (
            "mig_id", "vm", "src", "dst", "status", "total_time_ms", "downtime_ms",
            "blackout_ms", "throughput_mbps", "transferred_bytes", "iterations", "run_s",
            "max_cpu_throttle", "postcopy_switched", "migration_cpu_s", "qemu_cpu",
            "xbzrle")}
        figures["xbzrle_pages"] = (rec.get("xbzrle") or {}).get("pages")
        out.append(figures)
    return out


async def run_one(args: list[str], log_path: Path, stop: asyncio.Event,
                  stop_timeout_s: float) -> tuple[int, float]:
    """Run ``migrate-run ARGS`` as a process (output to ``log_path``); return its exit status
    and the CPU seconds it used. When ``stop`` is set, or the caller is cancelled, it is
    interrupted (SIGINT, as Ctrl-C: it rolls back and cleans up) and waited for first
    (:mod:`.process`, as a plan's tests)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "migrator.cli.run", *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True)

    async def interrupt_on_stop() -> None:
        await stop.wait()
        interrupt(proc)

    watcher = asyncio.create_task(interrupt_on_stop())   # owned: ended below
    try:
        status = await wait_run(proc, stop_timeout_s)
    finally:
        await cancel_and_wait(watcher)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return status, cpu


async def run_sweep(sweep: Sweep, out_dir: Path, base_args: list[str],
                    say: Callable[[str], None], stop: asyncio.Event,
                    stop_timeout_s: float = 600.0) -> list[SweepRun]:
    """Run every setting ``sweep.repeat`` times (repetition by repetition); results under
    ``out_dir/runs/NNN/``; ``sweep.json`` rewritten after each run (a sweep stopped midway
    keeps what it did). ``base_args``: the run's other arguments (``-m``, ``-i``, ``-c``).
    Stops early when ``stop`` is set."""
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    settings = sweep.settings()
    runs = [SweepRun(i, rep, s) for i, (rep, s) in enumerate(
        (rep, s) for rep in range(1, sweep.repeat + 1) for s in settings)]
    for run in runs:
        if stop.is_set():
            break
        root = runs_dir / f"{run.index:03d}"
        root.mkdir(exist_ok=True)
        args = [*base_args, "-o", str(root), "--display", "lines", sweep.scenario]
        for key, value in {**sweep.fixed, **run.setting}.items():
            # JSON is YAML: the run reads back exactly the value check() validated
            args += ["-p", f"{key}={json.dumps(value)}"]
        say(f"[{run.index + 1}/{len(runs)}] {label(run.setting)} (repetition {run.repeat})")
        t0 = time.monotonic()
        run.exit_status, run.controller_cpu_s = await run_one(args, root / "output.log", stop,
                                                              stop_timeout_s)
        run.wall_s = time.monotonic() - t0
        dirs = [d for d in root.iterdir() if (d / "run.json").is_file()]
        if dirs:
            run.run_dir = str(dirs[0])
            run.verdict = json.loads((dirs[0] / "run.json").read_text()).get("verdict", "?")
            run.migrations = _migration_figures(dirs[0])
        else:
            run.verdict = "no results"
        done = [m for m in run.migrations if m.get("status") == "completed"]
        say(f"[{run.index + 1}/{len(runs)}] {label(run.setting)}: {run.verdict} (exit "
            f"{run.exit_status}) in {run.wall_s:.1f} s, {len(done)}/{len(run.migrations)} "
            f"migrations completed; log {root / 'output.log'}")
        write_sweep(out_dir, sweep, runs)
        if run.exit_status == 2:       # refused its input: every other run would be too
            say(f"the run refused its input (exit 2), the sweep stops: see "
                f"{root / 'output.log'}")
            break
    return runs


def write_sweep(out_dir: Path, sweep: Sweep, runs: list[SweepRun]) -> Path:
    path = out_dir / "sweep.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"sweep": sweep.to_json(),
                               "runs": [r.to_json() for r in runs]}, indent=1))
    tmp.replace(path)
    return path


__all__ = ["READY_DIR", "Sweep", "SweepRun", "label", "parse_axis", "run_sweep",
           "write_sweep"]
