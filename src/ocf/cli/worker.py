"""``ocf worker --stage NAME -- COMMAND``: run a shell command for each job of a stage.

Each job runs ``COMMAND`` with the job's input on stdin (a string as is,
anything else as JSON) and in the environment (``OCF_JOB_ID``,
``OCF_JOB_STAGE``, ``OCF_JOB_ATTEMPT``, ``OCF_JOB_INPUT``); its stdout is the
job's output (``--output json`` parses it). A non-zero exit fails the job
with the end of stderr, and the tracker retries it elsewhere. Leases are
heartbeated while the command runs; Ctrl-C hands held jobs back at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx
import trio

from .. import log as logfmt
from ..jobs.client import TrackerError, connect
from .jobs import DEFAULT_URL

MAX_ENV_INPUT = 64 * 1024


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="Work on a tracker's jobs, running a command per job.",
        description="Register as a worker of one stage and run COMMAND for each job (input on stdin, output from stdout).",
        epilog="example: ocf worker --url http://tracker:8092 --project laion-crawl --stage crawl --nickname alice -- python crawl.py",
    )
    p.add_argument("--url", default=os.environ.get("OCF_TRACKER_URL", DEFAULT_URL), help=f"Gateway URL of the tracker node, or of any node with --via-network (default: $OCF_TRACKER_URL or {DEFAULT_URL}).")
    p.add_argument("--via-network", action="store_true", help="Reach the tracker through this node's /v1/service/jobs route.")
    p.add_argument("--project", required=True, help="Project to work on.")
    p.add_argument("--stage", required=True, help="Stage name (or number, or letter a-e).")
    p.add_argument("--nickname", default=os.environ.get("USER", "anonymous"), help="Your name on the leaderboard (default: $USER).")
    p.add_argument("--user", help="Account the leaderboard credits (default: the nickname).")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="Jobs leased per request (default: 1).")
    p.add_argument("--output", choices=("text", "json"), default="text", help="How stdout becomes the output: the text (trailing newline removed) or parsed JSON (default: text).")
    p.add_argument("--until-empty", action="store_true", help="Exit when the stage has no pending jobs instead of waiting for more.")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="Log level (default: info).")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="The command to run per job, after '--'.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("ocf worker: error: give the command to run after '--' (see --help)", file=sys.stderr)
        return 2
    if not 1 <= args.batch <= 1000:
        print("ocf worker: error: --batch must be in 1..1000", file=sys.stderr)
        return 2
    logfmt.setup(args.log_level)
    try:
        done = trio.run(_work, args, command)
    except KeyboardInterrupt:
        return 130
    except TrackerError as exc:
        print(f"ocf worker: error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"ocf worker: error: cannot reach the tracker at {args.url}: {exc}", file=sys.stderr)
        return 1
    print(f"ocf worker: completed {done} jobs", file=sys.stderr)
    return 0


class CommandFailed(Exception):
    pass


async def _work(args: argparse.Namespace, command: list[str]) -> int:
    async with connect(args.url, args.project, nickname=args.nickname, user=args.user, via_network=args.via_network) as tracker:
        worker = await tracker.worker(args.stage)
        print(f"ocf worker: {worker.name} working on {args.project}/{worker.stage}", file=sys.stderr)
        done = 0
        async for job in tracker.jobs(args.stage, batch=args.batch, until_empty=args.until_empty):
            try:
                job.output = await _run_one(command, job, args.output)
            except CommandFailed as exc:
                await job.fail(str(exc))
            else:
                done += 1
        return done


async def _run_one(command: list[str], job: Any, output_mode: str) -> Any:
    text = job.input if isinstance(job.input, str) else json.dumps(job.input)
    env = dict(os.environ, OCF_JOB_ID=str(job.id), OCF_JOB_STAGE=job.stage, OCF_JOB_ATTEMPT=str(job.attempts))
    if len(text) <= MAX_ENV_INPUT:
        env["OCF_JOB_INPUT"] = text
    result = await trio.run_process(command, stdin=text.encode(), capture_stdout=True, capture_stderr=True, env=env, check=False)
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip()[-500:]
        raise CommandFailed(f"command exited with {result.returncode}: {tail}")
    out = result.stdout.decode(errors="replace")
    if output_mode == "json":
        try:
            return json.loads(out)
        except ValueError as exc:
            raise CommandFailed(f"command printed invalid JSON: {exc}") from None
    return out[:-1] if out.endswith("\n") else out
