"""``ocf worker --stage NAME -- COMMAND``: run a shell command for each job of a stage.

Each job runs ``COMMAND`` with the job's input on stdin (a string as is,
anything else as JSON) and in the environment (``OCF_JOB_ID``,
``OCF_JOB_STAGE``, ``OCF_JOB_ATTEMPT``, ``OCF_JOB_INPUT``); its stdout is the
job's output (``--output json`` parses it). A non-zero exit fails the job
with its exit code and the end of stderr, and the tracker retries it
elsewhere.

A volunteer's worker is expected to run unattended for days, so it does not
give up easily: leases are heartbeated while the command runs; Ctrl-C and
SIGTERM hand held jobs back at once; a tracker that is down or restarting is
retried with exponential backoff (the worker's token and leases survive a
tracker restart); a failing command is retried on the next job only after a
growing pause, so a broken setup does not burn through a stage's attempts in
milliseconds. A command that cannot run at all (not found, not executable)
stops the worker with one line and exit code 127 or 126, as a shell would.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
from typing import Any

import attrs
import httpx
import trio

from .. import log as logfmt
from ..errors import collapse_groups
from ..jobs.client import Job, TrackerClient, TrackerError, connect
from .jobs import add_tracker_args

MAX_ENV_INPUT = 64 * 1024
#: Statuses that mean "the tracker is not there right now" (a gateway in front of a restarting one).
UNAVAILABLE = frozenset({502, 503, 504})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="Work on a tracker's jobs, running a command per job.",
        description=(
            "Register as a worker of one stage and run COMMAND for each job (input on stdin, output from stdout)."
        ),
        epilog=(
            "example: ocf worker --url http://tracker:8092 --project laion-crawl --stage crawl --nickname alice -- "
            "python crawl.py"
        ),
    )
    add_tracker_args(p)
    p.add_argument("--project", required=True, help="Project to work on.")
    p.add_argument("--stage", required=True, help="Stage name (or number, or letter a-e).")
    p.add_argument(
        "--nickname", default=os.environ.get("USER", "anonymous"), help="Your name on the leaderboard (default: $USER)."
    )
    p.add_argument("--user", help="Account the leaderboard credits (default: the nickname).")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="Jobs leased per request (default: 1).")
    p.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="How stdout becomes the output: the text (trailing newline removed) or parsed JSON (default: text).",
    )
    p.add_argument(
        "--until-empty",
        action="store_true",
        help="Exit when the stage has no pending jobs instead of waiting for more.",
    )
    p.add_argument(
        "--max-backoff",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="Longest pause between retries after the tracker is unreachable or the command fails (default: 60).",
    )
    p.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"), help="Log level (default: info)."
    )
    p.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="The command to run per job, after '--'."
    )
    p.set_defaults(func=run)


class CommandFailed(Exception):
    """The command ran and failed on this job's input: the job fails, the worker goes on."""


class CommandUnusable(Exception):
    """The command cannot run at all: every job would fail, so the worker stops."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@attrs.define
class Tally:
    done: int = 0
    failed: int = 0
    last_error: str = ""

    def summary(self) -> str:
        text = f"ocf worker: completed {self.done} jobs, {self.failed} failed"
        return text + (f" (last error: {self.last_error})" if self.failed else "")


def _check_command(command: list[str]) -> None:
    """Fail before registering when the program cannot be found or run (as a shell: 127 / 126)."""
    program = command[0]
    if os.sep in program:
        if not os.path.exists(program):
            raise CommandUnusable(f"command not found: {program}", 127)
        if os.path.isdir(program) or not os.access(program, os.X_OK):
            raise CommandUnusable(f"command is not executable: {program}", 126)
    elif shutil.which(program) is None:
        raise CommandUnusable(f"command not found: {program} (not on PATH)", 127)


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("ocf worker: error: give the command to run after '--' (see --help)", file=sys.stderr)
        return 2
    if not 1 <= args.batch <= 1000:
        print("ocf worker: error: --batch must be in 1..1000", file=sys.stderr)
        return 2
    if not args.max_backoff > 0:
        print("ocf worker: error: --max-backoff must be positive", file=sys.stderr)
        return 2
    try:
        _check_command(command)
    except CommandUnusable as exc:
        print(f"ocf worker: error: {exc}", file=sys.stderr)
        return exc.exit_code
    logfmt.setup(args.log_level)
    tally = Tally()
    code = 0
    try:
        code = trio.run(_main, args, command, tally)
    except KeyboardInterrupt:
        code = 130
    except CommandUnusable as exc:
        print(f"ocf worker: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except TrackerError as exc:
        print(f"ocf worker: error: {exc}", file=sys.stderr)
        code = 1
    print(tally.summary(), file=sys.stderr)
    return code


async def _main(args: argparse.Namespace, command: list[str], tally: Tally) -> int:
    """Work until done; SIGTERM (like Ctrl-C) stops it after handing held jobs back."""
    stopped_by: list[int] = []
    with collapse_groups():
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for signum in signals:
                        stopped_by.append(signum)
                        nursery.cancel_scope.cancel()  # connect() still says bye, shielded
                        return

            nursery.start_soon(on_signal)
            await _work(args, command, tally)
            nursery.cancel_scope.cancel()
    if stopped_by:
        print(f"ocf worker: stopped by signal {stopped_by[0]}; held jobs handed back", file=sys.stderr)
        return 128 + stopped_by[0]
    return 0


def _backoff(attempt: int, cap: float) -> float:
    """0.5 s doubling to ``cap``, with jitter so a fleet does not return in lockstep."""
    return min(cap, 0.5 * 2 ** min(attempt, 30)) * random.uniform(0.8, 1.2)


async def _work(args: argparse.Namespace, command: list[str], tally: Tally) -> None:
    unreachable = 0
    async with connect(
        args.url, args.project, nickname=args.nickname, user=args.user, via_network=args.via_network
    ) as tracker:
        announced = False
        while True:
            try:
                worker = await tracker.worker(args.stage)
                if not announced:
                    print(f"ocf worker: {worker.name} working on {args.project}/{worker.stage}", file=sys.stderr)
                    announced = True
                elif unreachable:
                    print("ocf worker: tracker reachable again, resuming", file=sys.stderr)
                unreachable = 0
                await _loop(tracker, args, command, tally)
                return
            except httpx.TransportError as exc:
                delay = _backoff(unreachable, args.max_backoff)
                unreachable += 1
                print(
                    f"ocf worker: tracker unreachable ({exc.__class__.__name__}); retrying in {delay:.1f}s",
                    file=sys.stderr,
                )
                await trio.sleep(delay)
            except TrackerError as exc:
                if exc.status in UNAVAILABLE:
                    delay = _backoff(unreachable, args.max_backoff)
                    unreachable += 1
                    print(f"ocf worker: tracker unavailable ({exc.status}); retrying in {delay:.1f}s", file=sys.stderr)
                    await trio.sleep(delay)
                elif exc.code == "unknown_worker":
                    # Forgotten after a long silence (the tracker was down a long time): register again.
                    tracker.forget_worker(args.stage)
                    print("ocf worker: the tracker forgot this worker; registering again", file=sys.stderr)
                else:
                    raise


async def _loop(tracker: TrackerClient, args: argparse.Namespace, command: list[str], tally: Tally) -> None:
    failures_in_a_row = 0
    async for job in tracker.jobs(args.stage, batch=args.batch, until_empty=args.until_empty):
        if failures_in_a_row:
            # A command failing job after job is usually the setup, not the input: slow down
            # rather than burn through every job's attempts in milliseconds.
            await trio.sleep(_backoff(failures_in_a_row - 1, args.max_backoff))
        try:
            job.output = await _run_one(command, job, args.output)
        except CommandFailed as exc:
            failures_in_a_row += 1
            tally.failed += 1
            tally.last_error = str(exc)[:200]
            print(f"ocf worker: job {job.id} failed: {exc}", file=sys.stderr)
            await job.fail(str(exc))
        else:
            failures_in_a_row = 0
            tally.done += 1


async def _run_one(command: list[str], job: Job, output_mode: str) -> Any:
    text = job.input if isinstance(job.input, str) else json.dumps(job.input)
    env = dict(os.environ, OCF_JOB_ID=str(job.id), OCF_JOB_STAGE=job.stage, OCF_JOB_ATTEMPT=str(job.attempts))
    if len(text) <= MAX_ENV_INPUT:
        env["OCF_JOB_INPUT"] = text
    try:
        result = await trio.run_process(
            command, stdin=text.encode(), capture_stdout=True, capture_stderr=True, env=env, check=False
        )
    except FileNotFoundError:
        raise CommandUnusable(f"command not found: {command[0]}", 127) from None
    except PermissionError:
        raise CommandUnusable(f"command is not executable: {command[0]}", 126) from None
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip()[-500:]
        how = (
            f"killed by signal {-result.returncode}"
            if result.returncode < 0
            else f"exited with code {result.returncode}"
        )
        raise CommandFailed(f"command {how}" + (f": {tail}" if tail else " (no stderr)"))
    out = result.stdout.decode(errors="replace")
    if output_mode == "json":
        try:
            return json.loads(out)
        except ValueError as exc:
            raise CommandFailed(f"command printed invalid JSON: {exc}") from None
    return out[:-1] if out.endswith("\n") else out
