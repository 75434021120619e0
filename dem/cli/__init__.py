"""The ``dem`` command line (also ``python -m dem``).

Each subcommand's options are declared here, but its implementation module is imported only
when that subcommand runs: ``dem merge`` must not pay for importing transformers or datasets.
User errors (:class:`dem.DemError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from dem import DemError, __version__
from dem.cli.merge import _add_merge
from dem.cli.run import _add_run
from dem.cli.sources import _add_sources
from dem.cli.sweep import _add_sweep
from dem.cli.training import _add_training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dem",
        description="DEM: fine-tune per data source, extract distribution vectors, merge them.",
    )
    parser.add_argument("--version", action="version", version=f"dem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_merge, _add_sources, _add_training, _add_run, _add_sweep):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DemError as err:
        # The library names its keyword (overwrite=True); on the command line it is a flag.
        message = str(err).replace("overwrite=True", "--overwrite")
        print(f"dem {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
