"""`merge-service`: the command line (DESIGN.md section 3). Exit codes: 0 ok, 1 invalid input,
2 runtime failure. User errors print a message, never a traceback (set
MERGE_SERVICE_DEBUG=1 to see one)."""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pydantic import ValidationError

from merge_service.errors import InvalidInputError, MergeCancelled, MergeServiceError

if TYPE_CHECKING:
    from merge_service.engine import Progress
    from merge_service.spec import JobSpec

EXIT_OK, EXIT_INVALID, EXIT_FAILED = 0, 1, 2


def _progress_bar(quiet: bool) -> tuple[Callable[[Progress], None], Callable[[], None]]:
    """A tqdm bar per stage on stderr; returns (callback, close)."""
    from tqdm import tqdm

    stage: str | None = None
    bar: tqdm | None = None

    def close() -> None:
        nonlocal bar
        if bar is not None:
            bar.close()
            bar = None

    def callback(p: Progress) -> None:
        nonlocal stage, bar
        if quiet or p.stage not in {"merging", "reverting"}:
            return
        if bar is None or stage != p.stage:
            close()
            stage = p.stage
            # disable=None: no bar when stderr is not a terminal (logs, CI)
            bar = tqdm(total=p.total, desc=p.stage, unit="tensor", file=sys.stderr,
                       dynamic_ncols=True, leave=False, disable=None)
        if p.current:
            bar.set_postfix_str(p.current[-48:], refresh=False)
        bar.update(p.done - bar.n)

    return callback, close


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _load(args: argparse.Namespace) -> JobSpec:
    """The spec of `merge`/`validate` with `--out` applied. A spec with unknown fields is an
    error that also lists what preflight finds in the rest of it (every problem at once)."""
    from merge_service.engine import prepare
    from merge_service.errors import SpecError
    from merge_service.settings import Settings
    from merge_service.spec import load_spec

    def with_out(spec: JobSpec) -> JobSpec:
        if args.out is None:
            return spec
        return spec.model_copy(update={"output": spec.output.model_copy(
            update={"destination": args.out})})

    try:
        return with_out(load_spec(args.spec))
    except SpecError as exc:
        if exc.partial is None:
            raise
        try:
            prepare(with_out(exc.partial), overwrite=args.overwrite, hub=Settings().hub,
                    weights=False).close()
        except InvalidInputError as rest:
            raise exc.with_problems_of_partial(rest.problems) from None
        raise


def cmd_merge(args: argparse.Namespace) -> int:
    from merge_service.engine import run_merge
    from merge_service.settings import Settings

    spec = _load(args)
    callback, close = _progress_bar(args.quiet)
    try:
        result = run_merge(spec, overwrite=args.overwrite, hub=Settings().hub, progress=callback)
    finally:
        close()
    r = result.report
    summary = r["summary"]
    print(f"merged {len(r['models'])} models with {r['method']['name']} "
          f"({r['space']} space) -> {result.destination}")
    print(f"  tensors: {summary['merged']} merged, {summary['unchanged']} unchanged, "
          f"{summary['copied']} copied from the base")
    print(f"  output: {r['output']['format']}, {r['output']['dtype']}, "
          f"{_human_bytes(r['output']['bytes'])} in {len(result.files)} files")
    print(f"  time: {r['timings_s']['total_s']:.1f} s on {r['device']}; peak RSS "
          f"{_human_bytes(r['peak_memory']['process_peak_rss_bytes'])}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from merge_service.engine import prepare
    from merge_service.settings import Settings

    spec = _load(args)
    # preflight only: Hub weights are read as far as their headers
    prepared = prepare(spec, overwrite=args.overwrite, hub=Settings().hub, weights=False)
    try:
        print(f"ok: {len(prepared.inputs)} models, method {prepared.method.name}, "
              f"{prepared.space} space, device {prepared.device}")
        print(f"  {len(prepared.merged)} tensors to merge, {len(prepared.copied)} copied "
              f"from the base; output {spec.output.format} -> {prepared.destination}")
    finally:
        prepared.close()
    return EXIT_OK


def cmd_revert(args: argparse.Namespace) -> int:
    from merge_service.revert import revert
    from merge_service.settings import Settings

    callback, close = _progress_bar(args.quiet)
    try:
        result = revert(Path(args.artifact), args.task, args.out,
                        overwrite=args.overwrite, hub=Settings().hub, progress=callback)
    finally:
        close()
    print(f"recovered task {args.task!r} -> {result.destination} "
          f"({result.report['timings_s']['total_s']:.1f} s)")
    return EXIT_OK


def cmd_methods(args: argparse.Namespace) -> int:
    from merge_service.methods import catalog

    entries = catalog()
    if args.json:
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    for entry in entries:
        print(f"{entry['name']}  [{', '.join(entry['output_formats'])}]")
        print(f"    {entry['summary']}")
        print(f"    LoRA spaces: {', '.join(entry['spaces'])}"
              + ("" if entry["weights"] else "; no per-model weights"))
        for name, param in entry["params"].items():
            desc = f"  {param['description']}" if param["description"] else ""
            print(f"    {name} = {param['default']!r}{desc}")
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """A usage error is invalid input: exit code 1 (argparse's own is 2, our runtime
    failure). Subcommand parsers are made of the same class."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_INVALID, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="merge-service",
        description="Merge fine-tuned models and LoRA adapters of one base model, or run the "
                    "merge service (REST API, workers, scheduler).",
        epilog="Exit codes: 0 ok, 1 invalid input, 2 runtime failure. "
               "MERGE_SERVICE_DEBUG=1 shows tracebacks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = sub.add_parser("merge", help="validate and run a job spec in this process")
    merge.add_argument("spec", help="job spec (YAML or JSON)")
    merge.add_argument("--out", help="destination directory (overrides output.destination)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output")
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(func=cmd_merge)

    validate = sub.add_parser("validate", help="preflight only: list every problem")
    validate.add_argument("spec", help="job spec (YAML or JSON)")
    validate.add_argument("--out", help="destination directory (overrides output.destination)")
    validate.add_argument("--overwrite", action="store_true",
                          help="an existing destination is not a problem (as for merge)")
    validate.set_defaults(func=cmd_validate)

    revert = sub.add_parser("revert", help="recover one task model from an artifact")
    revert.add_argument("artifact", help="a compressed or reversible artifact directory")
    revert.add_argument("--task", required=True, help="task name (see the artifact's tasks.json)")
    revert.add_argument("--out", required=True, help="directory for the recovered model")
    revert.add_argument("--overwrite", action="store_true", help="replace an existing output")
    revert.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    revert.set_defaults(func=cmd_revert)

    methods = sub.add_parser("methods", help="the method catalog with parameters and defaults")
    methods.add_argument("--json", action="store_true", help="the catalog as JSON")
    methods.set_defaults(func=cmd_methods)

    from api.cli import add_service_commands  # up, api, worker, submit (the service, api/)

    add_service_commands(sub)
    return parser


# Commands that run a job in this process; the service commands (up, api, worker) handle
# SIGTERM themselves.
_JOB_COMMANDS = {"merge", "validate", "revert"}


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    """docker stop, systemd, timeout: leave as Ctrl-C does, so the temporary output is
    removed. Once only: a second SIGTERM must not interrupt that cleanup."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = os.environ.get("MERGE_SERVICE_DEBUG") == "1"
    previous = None
    if args.command in _JOB_COMMANDS and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        return _run(args, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, debug: bool) -> int:
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away is found here, not at interpreter exit
        return code
    except InvalidInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except ValidationError as exc:
        if exc.title != "Settings":
            return _unexpected(exc, debug)
        for err in exc.errors():  # the environment, one variable per line
            name = "MERGE_SERVICE_" + "_".join(str(p) for p in err["loc"]).upper()
            print(f"error: {name}: {err['msg']}", file=sys.stderr)
        return EXIT_INVALID
    except MergeCancelled as exc:
        print(f"cancelled: {exc}; nothing was written", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError as exc:
        if not _reader_gone():  # another pipe than stdout: a failure like any other
            return _unexpected(exc, debug)
        # `merge-service methods | head`: not ours to report; stdout goes to /dev/null so that
        # the interpreter's final flush is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except MergeServiceError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return EXIT_FAILED
    except Exception as exc:
        return _unexpected(exc, debug)


def _unexpected(exc: Exception, debug: bool) -> int:
    """A bug or an environment failure: say so, keep the trace for debug."""
    print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    if debug:
        traceback.print_exc()
    else:
        print("(set MERGE_SERVICE_DEBUG=1 for the traceback)", file=sys.stderr)
    return EXIT_FAILED


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll here, or no real stdout
        return False


if __name__ == "__main__":
    sys.exit(main())
