"""The ``ecif`` command line: a thin layer over the library (every command calls one library function).

Commands that report something accept ``--json``.  Long commands show progress bars, stop cleanly on
Ctrl-C, and resume from their cache when run again with the same arguments.

Each command's options sit next to its handler, by concern: ``data`` (demo-data, validate,
train-demo), ``runs`` (features, finetune, score), ``streaming`` (extract-features, score-features)
and ``review`` (demo, detect, trace, mispredictions, edit, export, app); ``options`` holds the options
several commands share, ``output`` what every command prints.
"""

from __future__ import annotations

import argparse
import json
import sys

from ecif.cli import data, review, runs, streaming
from ecif.cli.runs import _delta_sweep_lines  # noqa: F401  (tests import it from here)

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecif", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    # The order `ecif --help` lists the commands in.
    for module in (data, runs, streaming, review):
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ecif.data import ManifestError
    from ecif.progress import Cancelled

    args = build_parser().parse_args(argv)

    def fail(error: BaseException, message: str, code: int = 1, prefix: str = "error: ") -> int:
        """One line on stderr; with ``--json`` also ``{"error", "kind", "file"}`` on stdout for scripts."""
        message = " ".join(message.split())
        tqdm = sys.modules.get("tqdm")
        for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
            bar.close()  # a progress bar left open would share the error's line
        if getattr(args, "json", False):
            file = getattr(error, "path", None) or getattr(error, "filename", None)
            if file is None and isinstance(error, ManifestError):
                file = getattr(args, "manifest", None)
            payload = {"error": message, "kind": type(error).__name__, "file": None if file is None else str(file)}
            print(json.dumps(payload))
        print(f"{prefix}{message}", file=sys.stderr)
        return code

    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt as error:
        return fail(error, "interrupted; run the same command again to resume from the cache", 130, "\n")
    except Cancelled as error:
        return fail(error, str(error), 130, "cancelled: ")
    except (ManifestError, FileNotFoundError, KeyError, ValueError) as error:
        return fail(error, str(error))
    except SystemExit as error:  # a command's own refusal, e.g. "not a scored run"
        if isinstance(error.code, str):
            return fail(error, error.code)
        raise
    except Exception as error:  # a clear one-line error for known library failures
        from ecif.models.open_clip_models import ModelLoadError

        if isinstance(error, ModelLoadError):
            return fail(error, str(error))
        raise
