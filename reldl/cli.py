"""The `reldl` command line.

Each command is a `cmd_*(args) -> int` function registered by one `_command(...)` call in `build_parser()`.
Exit status: 0 ok, 1 SQL or reldl error, 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb

import reldl
from reldl import shell

EXAMPLES = """\
examples:
  reldl demo                          extract JSON from 300 reviews with the shipped model, check accuracy,
                                      then train a logistic regression in SQL
  reldl sql my.db -c "CREATE MODEL m OPTIONS (model_type = 'mlp', label = 'y', epochs = 5) AS SELECT * FROM t"
                                      train a model inside the database (relational autodiff; SGD/momentum/Adam)
  reldl sql my.db -c "SELECT llm_generate(prompt, max_tokens := 32) FROM reviews"
  reldl sql my.db -c "SELECT llm_generate(prompt, n := 4, temperature := 0.8, seed := 1) FROM reviews"
                                      4 samples per row (a LIST), decoded as one tree sharing the prompt's KV;
                                      beam_width := 3 gives beams best first
  reldl sql my.db -c "CREATE MODEL fast OPTIONS (model_type='llm', base='m', sparsity=0.9) AS SELECT text FROM docs"
                                      a contextual-sparsity variant of an LLM, calibrated on the rows (DejaVu / TEAL)
  reldl sql my.db -c "CREATE MODEL big OPTIONS (model_type = 'llm', path = '/ckpt', offload = 'auto')"
                                      weights / KV cache across GPU, CPU and disk by a FlexGen-style policy
  reldl sql my.db -c "CREATE MODEL t OPTIONS (model_type='llm', base='m', finetune='lora') AS SELECT * FROM ex"
                                      fine-tune on prompt, completion columns (Adam on the CPU; resumes after a kill)
  reldl sql my.db < script.sql        run a script (SQL and .commands), printing each result
  reldl sql my.db                     interactive shell (.help lists its commands)
  reldl models my.db
  reldl calibrate my.db               measure the planner's cost constants and the offload hardware (PCIe,
                                      disk, GPU/CPU rates) here and store them in my.db, whose EXPLAIN and
                                      offload = 'auto' then use them (without my.db: printed, not stored)
"""


def cmd_sql(args: argparse.Namespace) -> int:
    """Run SQL: a query (-c), a script on stdin, or an interactive shell."""
    with contextlib.closing(reldl.connect(args.database, read_only=args.read_only)) as conn:
        if args.query is not None:
            shell.run_query(conn.cursor(), args.query, sys.stdout, args.max_rows, args.max_width)
        elif not sys.stdin.isatty():
            shell.run_input(conn, sys.stdin.read(), sys.stdout, args.max_rows, args.max_width)
        else:
            print(f"reldl {reldl.__version__} (DuckDB {duckdb.__version__}) on {args.database}; .help for help")
            with shell.readline_history():
                return shell.Shell(conn, max_rows=args.max_rows, max_width=args.max_width).run()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the models registered in a database (SHOW MODELS)."""
    read_only = args.database != ":memory:"  # never create a database file just to list its models
    with contextlib.closing(reldl.connect(args.database, read_only=read_only)) as conn:
        shell.run_query(conn.cursor(), "SHOW MODELS", sys.stdout, max_rows=0)
    return 0


CALIBRATE_DATABASE = (
    "DuckDB database file to store the measurements in (table reldl.calibration), where that database's EXPLAIN "
    "and CREATE MODEL ... offload = 'auto' read them; without it they are measured and printed, not stored"
)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure the planner's cost constants and the offload hardware on this machine; store them in DATABASE."""
    from reldl.calibrate import calibrate

    with contextlib.closing(reldl.connect(args.database)) as conn:
        calibrate(conn.duckdb_connection)
    if _in_memory(args.database):  # the measurements died with the in-memory database: say how to keep them
        print(
            "Note: not stored (in-memory database); run `reldl calibrate my.db` to store them in my.db, whose EXPLAIN "
            "and offload = 'auto' use them",
            file=sys.stderr,
        )
    else:
        print(f"stored in {args.database} (table reldl.calibration)")
    return 0


def _in_memory(database: str) -> bool:
    return not database or database.startswith(":memory:")


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end: LLM extraction over a table with SQL, checked against ground truth."""
    from reldl.demo.run import run

    if args.rows < 1:
        raise reldl.ProgrammingError("--rows must be at least 1")
    return run(args.dir, rows=args.rows, device=args.device)


def _command(sub, name: str, func: Callable[[argparse.Namespace], int], **kw) -> argparse.ArgumentParser:
    """Register a subcommand; its one-line help is the first line of `func`'s docstring."""
    summary = (func.__doc__ or "").strip().splitlines()[0]
    parser = sub.add_parser(name, help=summary, description=summary, **kw)
    parser.set_defaults(func=func)
    return parser


def _database(
    parser: argparse.ArgumentParser, text: str = "DuckDB database file (default: an in-memory database)"
) -> None:
    parser.add_argument("database", nargs="?", default=":memory:", metavar="DATABASE", help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reldl",
        description="In-database deep learning on DuckDB: LLM generation and scoring from SQL, and training models "
        "in SQL (CREATE MODEL ... AS SELECT: relational autodiff).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"reldl {reldl.__version__} (DuckDB {duckdb.__version__})"
    )
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)

    p = _command(sub, "sql", cmd_sql)
    _database(p)
    p.add_argument("-c", "--command", dest="query", metavar="QUERY", help="run QUERY and print the last result")
    p.add_argument("--read-only", action="store_true", help="open the database read-only")
    p.add_argument(
        "--max-rows",
        type=int,
        default=shell.MAX_ROWS,
        metavar="N",
        help=f"print at most N rows of a result, 0 for all (default {shell.MAX_ROWS})",
    )
    p.add_argument(
        "--max-width",
        type=int,
        default=shell.MAX_WIDTH,
        metavar="N",
        help=f"wrap cells wider than N columns onto more lines, 0 for never (default {shell.MAX_WIDTH}); "
        "values are never cut off, EXPLAIN prints as plain text",
    )

    _database(_command(sub, "models", cmd_models))

    _database(_command(sub, "calibrate", cmd_calibrate), CALIBRATE_DATABASE)

    p = _command(sub, "demo", cmd_demo)
    p.add_argument("--dir", type=Path, help="folder for the demo database (default: a new temporary folder)")
    p.add_argument("--rows", type=int, default=300, help="reviews to process (default 300)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `reldl` console script and of `python -m reldl`; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed what it had to
        return e.code if isinstance(e.code, int) else 0
    try:
        return args.func(args)
    except reldl.Error as e:
        shell.print_error(e)
        return 1
    except (KeyboardInterrupt, RuntimeError) as e:
        if not shell.interrupted(e):
            shell.print_internal_error(e)
            return 1
        print("Error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # noqa: BLE001 - a bug in reldl: one line, no traceback
        shell.print_internal_error(e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
