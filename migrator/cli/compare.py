"""``migrate-run compare``: did this build get worse?

::

    migrate-run compare RUN_A RUN_B               # B against A
    migrate-run compare --baseline save NAME RUN  # keep RUN as baseline NAME
    migrate-run compare --baseline NAME RUN       # RUN against baseline NAME

Exit 0: no regression; 1: a regression (each named in the table); 2: bad input (a
directory with no run, an unknown baseline), before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..errors import ConfigError
from .common import Parser, add_setup_options, fail, overrides, setup_logging


def main(argv: list[str]) -> int:
    p = Parser(prog="migrate-run compare",
               description="Compare two runs' migrations (matched by scenario, route and VM): "
                           "per metric the medians with min–max, the ratio and a verdict "
                           "(compare.* in the config); exit 1 on a regression.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="results directories: RUN_A RUN_B, or with --baseline one RUN")
    p.add_argument("--baseline", metavar="NAME",
                   help="compare RUN against baseline NAME; '--baseline save NAME RUN': keep "
                        "RUN as baseline NAME (in compare.baselines_dir)")
    add_setup_options(p, inventory=False)        # -c, -p (compare.*), -v
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    from ..report import baseline as bl
    try:
        config = Config.load(args.config, overrides(args.param))
        root = Path(config.compare.baselines_dir)
        if args.baseline == "save":
            if len(args.runs) != 2:
                raise ConfigError("--baseline save NAME RUN: one name, one run")
            name, run = args.runs[0], bl.load(args.runs[1])
            bl.baseline_dir(root, name)                  # a plain name, before anything
            print(f"baseline {name}: {bl.save_baseline(run, root, name)} (run {run.run_id})")
            return 0
        if args.baseline:
            if len(args.runs) != 1:
                raise ConfigError("--baseline NAME RUN: one baseline, one run")
            where = bl.baseline_dir(root, args.baseline)
            if not (where / "run.json").is_file():
                raise ConfigError(f"no baseline {args.baseline!r} in {root} (save one with "
                                  f"--baseline save {args.baseline} RUN)")
            a, b = bl.load(where), bl.load(args.runs[0])
        else:
            if len(args.runs) != 2:
                raise ConfigError("compare RUN_A RUN_B (or --baseline NAME RUN)")
            a, b = bl.load(args.runs[0]), bl.load(args.runs[1])
    except ConfigError as exc:
        return fail("migrate-run compare", exc, args.verbose)
    rows = bl.compare(a, b, config.compare)
    print(bl.table(a, b, rows))
    return 1 if any(r.verdict == "REGRESSION" for r in rows) else 0
