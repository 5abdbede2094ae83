"""``ocf jobs ...``: manage a job tracker's projects over its HTTP API.

Talks to a running node (``--url``, default ``http://127.0.0.1:8092``, or
``OCF_TRACKER_URL``) rather than opening its store, because the node holds
the store's lock. ``create`` streams its source in batches, so a billion-line
brace pattern costs no more memory than ten lines; each batch carries an
idempotency key, so a batch retried after a dropped connection is not
created twice.

``export`` and ``import`` are the exception: they move a project between
stores (LMDB and PostgreSQL) and so open the store itself, which for LMDB
means the node is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Iterator

import httpx

from ..errors import OcfError, ValidationError
from ..jobs.client import TrackerError, _raise_for, format_eta
from ..jobs.creator import brace_expand, count_brace, file_lines, json_list, numeric_range

DEFAULT_URL = "http://127.0.0.1:8092"
RETRIES = 5


def add_tracker_args(p: argparse.ArgumentParser) -> None:
    """``--url`` and ``--via-network``: how ``ocf jobs`` and ``ocf worker`` reach a tracker."""
    p.add_argument(
        "--url",
        default=os.environ.get("OCF_TRACKER_URL", DEFAULT_URL),
        help=(
            "Gateway URL of the tracker node, or of any node with --via-network (default: $OCF_TRACKER_URL or "
            f"{DEFAULT_URL})."
        ),
    )
    p.add_argument(
        "--via-network",
        action="store_true",
        help="Reach the tracker through this node's /v1/service/jobs route (the tracker may be any peer).",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "jobs",
        help="Manage a job tracker: projects, job creation, status, results.",
        description="Manage the job tracker hosted by a node started with --jobs (over its HTTP API).",
    )
    add_tracker_args(p)
    p.add_argument(
        "--admin-token",
        default=os.environ.get("OCF_ADMIN_TOKEN") or os.environ.get("OCF_JOBS_ADMIN_TOKEN"),
        metavar="TOKEN",
        help=(
            "The tracker node's admin token, for 'project' and 'create' (default: $OCF_ADMIN_TOKEN, else read from "
            "--data-dir)."
        ),
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("OCF_DATA_DIR", "~/.ocf"),
        metavar="DIR",
        help=(
            "Data directory of the tracker node, whose admin.token is used when --admin-token is not given (default: "
            "$OCF_DATA_DIR or ~/.ocf)."
        ),
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="HTTP timeout per request (default: 60)."
    )
    jobs_sub = p.add_subparsers(dest="jobs_command", metavar="ACTION")
    jobs_sub.required = True

    q = jobs_sub.add_parser("list", help="List projects with completion and ETA.")
    q.set_defaults(func=cmd_list)

    q = jobs_sub.add_parser(
        "project",
        help="Create a project with its stages.",
        epilog="example: ocf jobs project laion-crawl --stage crawl:600 --stage embed:1800:fanout --stage filter",
    )
    q.add_argument("project", help="Project name (letters, digits, '_', '.', '-').")
    q.add_argument(
        "--stage",
        action="append",
        required=True,
        metavar="NAME[:LEASE][:fanout]",
        help=(
            "A stage, in order (repeat, 1-5 times): its name, lease timeout in seconds (default: the node's "
            "--jobs.lease-timeout) and 'fanout' if a list output becomes one next-stage job per element."
        ),
    )
    q.add_argument(
        "--max-attempts",
        type=int,
        metavar="N",
        help="Leases a job gets before it is marked failed (default: the node's --jobs.max-attempts).",
    )
    q.add_argument(
        "--flag-threshold",
        type=int,
        metavar="N",
        help=(
            "Distinct workers flagging an input before it is redone at the previous stage (default: the node's "
            "--jobs.flag-threshold)."
        ),
    )
    q.set_defaults(func=cmd_project)

    q = jobs_sub.add_parser(
        "create",
        help="Create stage-1 jobs from a range, a brace pattern, lines or a JSON list.",
        epilog=(
            "examples: ocf jobs create laion-crawl --pattern 'shard-{00000..99999}.tar'   |   ocf jobs create p "
            "--range 0:1000000   |   ocf jobs create p --lines urls.txt"
        ),
    )
    q.add_argument("project", help="Project to add jobs to.")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--range", metavar="A:B|A..B", help="Integers A..B-1 (A:B) or A..B inclusive (A..B), optional :STEP."
    )
    source.add_argument(
        "--pattern",
        metavar="PATTERN",
        help="Brace expansion, e.g. 'shard-{00000..99999}.tar' or '{en,de}/part-{1..9}'.",
    )
    source.add_argument("--lines", metavar="FILE", help="One job per non-empty line, as a string ('-' for stdin).")
    source.add_argument("--jsonl", metavar="FILE", help="One job per line, each line a JSON value ('-' for stdin).")
    source.add_argument(
        "--json", metavar="FILE", help="A JSON list, one job per element, read incrementally ('-' for stdin)."
    )
    q.add_argument("--batch", type=int, default=20_000, metavar="N", help="Jobs per request (default: 20000).")
    q.set_defaults(func=cmd_create)

    q = jobs_sub.add_parser("status", help="Per-stage counts, completion and ETA of a project.")
    q.add_argument("project")
    q.add_argument("--json", action="store_true", help="Print the raw stats JSON.")
    q.set_defaults(func=cmd_status)

    q = jobs_sub.add_parser("results", help="Download a project's results as JSON lines.")
    q.add_argument("project")
    q.add_argument("-o", "--output", metavar="FILE", help="Write to FILE instead of stdout.")
    q.add_argument(
        "--with-input",
        action="store_true",
        help="Add each result's input (and, for later stages, the stage-1 input it descends from).",
    )
    q.set_defaults(func=cmd_results)

    store_help = (
        "The store: a stopped node's data directory (its LMDB store) or a postgresql://user:password@host/db URL "
        "(default: $OCF_JOBS_STORE)."
    )
    q = jobs_sub.add_parser(
        "export",
        help="Write a project, streamed, as JSON lines, straight from a store (to move it to another store).",
        epilog="example: ocf jobs export --store ~/.ocf crawl -o crawl.jsonl   (the node must be stopped for LMDB)",
    )
    q.add_argument("project")
    q.add_argument("--store", default=os.environ.get("OCF_JOBS_STORE"), required=False, help=store_help)
    q.add_argument("-o", "--output", metavar="FILE", help="Write to FILE instead of stdout.")
    q.set_defaults(func=cmd_export)

    q = jobs_sub.add_parser(
        "import",
        help="Read a project written by 'ocf jobs export' into a store, streamed.",
        epilog="example: OCF_JOBS_STORE=postgresql://ocf:pw@db/ocf ocf jobs import crawl.jsonl",
    )
    q.add_argument("file", nargs="?", help="The export (default: stdin).")
    q.add_argument("--store", default=os.environ.get("OCF_JOBS_STORE"), required=False, help=store_help)
    q.set_defaults(func=cmd_import)

    q = jobs_sub.add_parser("leaderboard", help="Jobs completed per user and per worker (the whole board, paged).")
    q.add_argument("project")
    q.add_argument("--limit", type=int, default=50, metavar="N", help="Rows per table (default: 50).")
    q.add_argument("--offset", type=int, default=0, metavar="N", help="Skip the first N rows (default: 0).")
    q.set_defaults(func=cmd_leaderboard)


def _base(args: argparse.Namespace) -> str:
    return f"{args.url.rstrip('/')}/v1/{'service/jobs' if args.via_network else 'jobs'}"


def _fail(message: str, code: int = 1) -> int:
    print(f"ocf jobs: error: {message}", file=sys.stderr)
    return code


def _read_admin_token(data_dir: str) -> str | None:
    """The node's admin token from its data directory (written there on its first start), if readable."""
    try:
        return (Path(data_dir).expanduser() / "admin.token").read_text().strip() or None
    except OSError:
        return None


def _guard(func: Callable[[argparse.Namespace, httpx.Client], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            token = args.admin_token or _read_admin_token(args.data_dir)
            headers = {"X-OCF-Admin-Token": token} if token else {}
            with httpx.Client(timeout=args.timeout, headers=headers) as http:
                return func(args, http)
        except TrackerError as exc:
            return _fail(str(exc))
        except ValidationError as exc:
            return _fail(str(exc), 2)
        except httpx.HTTPError as exc:
            return _fail(f"cannot reach the tracker at {args.url}: {exc}")
        except OSError as exc:
            return _fail(str(exc))
        except OcfError as exc:
            return _fail(str(exc))

    return run


@_guard
def cmd_list(args: argparse.Namespace, http: httpx.Client) -> int:
    projects = _raise_for(http.get(_base(args)))["projects"]
    if not projects:
        print("no projects (create one with: ocf jobs project NAME --stage ...)")
    for p in projects:
        stages = " -> ".join(s["name"] for s in p["stages"])
        print(
            f"{p['name']:<24} {p['completion'] * 100:6.2f}%  eta {format_eta(p['eta_seconds']):<12} results "
            f"{p['results']:<10} {stages}"
        )
    return 0


@_guard
def cmd_project(args: argparse.Namespace, http: httpx.Client) -> int:
    stages = []
    for spec in args.stage:
        parts = spec.split(":")
        stage: dict[str, Any] = {"name": parts[0]}
        for part in parts[1:]:
            if part == "fanout":
                stage["fanout"] = True
            else:
                try:
                    stage["lease_timeout"] = float(part)
                except ValueError:
                    return _fail(f"--stage {spec!r}: {part!r} is neither a lease timeout in seconds nor 'fanout'", 2)
        stages.append(stage)
    body: dict[str, Any] = {"stages": stages}
    if args.max_attempts is not None:
        body["max_attempts"] = args.max_attempts
    if args.flag_threshold is not None:
        body["flag_threshold"] = args.flag_threshold
    response = http.put(f"{_base(args)}/{args.project}", json=body)
    project = _raise_for(response)
    verb = "created" if response.status_code == 201 else "exists (same definition)"
    print(
        f"project {project['name']} {verb}: "
        + " -> ".join(
            f"{s['name']} (lease {s['lease_timeout']:g}s{', fanout' if s['fanout'] else ''})" for s in project["stages"]
        )
    )
    return 0


def _batches(values: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for value in values:
        batch.append(value)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@_guard
def cmd_create(args: argparse.Namespace, http: httpx.Client) -> int:
    if not 1 <= args.batch <= 1_000_000:
        return _fail("--batch must be in 1..1000000", 2)
    url = f"{_base(args)}/{args.project}/jobs"
    _raise_for(http.get(f"{_base(args)}/{args.project}"))  # unknown project: fail before reading the source
    with ExitStack() as stack:
        total_hint = None
        if args.range is not None:
            values: Iterable[Any] = numeric_range(args.range)
            total_hint = len(values)  # type: ignore[arg-type]
        elif args.pattern is not None:
            values = brace_expand(args.pattern)
            total_hint = count_brace(args.pattern)
        else:
            path = args.lines or args.jsonl or args.json
            stream = sys.stdin if path == "-" else stack.enter_context(open(path, encoding="utf-8"))
            values = json_list(stream) if args.json else file_lines(stream, as_json=args.jsonl is not None)
        run_id = uuid.uuid4().hex
        created = 0
        started = time.monotonic()
        for index, batch in enumerate(_batches(values, args.batch)):
            body = b"".join(json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode() + b"\n" for v in batch)
            headers = {"Content-Type": "application/x-ndjson", "Idempotency-Key": f"{run_id}:{index}"}
            for attempt in range(RETRIES):
                try:
                    answer = _raise_for(http.post(url, content=body, headers=headers))
                    break
                except httpx.TransportError as exc:
                    if attempt == RETRIES - 1:
                        raise
                    print(f"ocf jobs: batch {index} failed ({exc}); retrying", file=sys.stderr)
                    time.sleep(min(2**attempt, 10))
            created += answer["created"]
            elapsed = time.monotonic() - started
            of = f"/{total_hint}" if total_hint else ""
            print(
                f"\rcreated {created}{of} jobs ({created / max(elapsed, 1e-9):,.0f}/s)",
                end="",
                file=sys.stderr,
                flush=True,
            )
        print(file=sys.stderr)
    print(f"created {created} jobs in project {args.project} in {time.monotonic() - started:.1f}s")
    return 0


@_guard
def cmd_status(args: argparse.Namespace, http: httpx.Client) -> int:
    stats = _raise_for(http.get(f"{_base(args)}/{args.project}/stats"))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(
        f"project {stats['project']}: {stats['completion'] * 100:.2f}% complete, ETA "
        f"{format_eta(stats['eta_seconds'])}, {stats['results']} results, {stats['workers']['active']} active workers"
    )
    print(f"{'stage':<16}{'pending':>10}{'leased':>10}{'done':>10}{'failed':>10}{'progress':>10}{'jobs/s':>10}")
    for s in stats["stages"]:
        print(
            f"{s['name']:<16}{s['pending']:>10}{s['leased']:>10}{s['done']:>10}{s['failed']:>10}"
            f"{s['progress'] * 100:>9.1f}%{s['rate_per_s']:>10.2f}"
        )
    return 0


@_guard
def cmd_results(args: argparse.Namespace, http: httpx.Client) -> int:
    with ExitStack() as stack:
        out = stack.enter_context(open(args.output, "wb")) if args.output else sys.stdout.buffer
        params = {"input": "1"} if args.with_input else {}
        with http.stream("GET", f"{_base(args)}/{args.project}/results", params=params) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            for chunk in response.iter_bytes():
                out.write(chunk)
        out.flush()
    return 0


@_guard
def cmd_leaderboard(args: argparse.Namespace, http: httpx.Client) -> int:
    board = _raise_for(
        http.get(f"{_base(args)}/{args.project}/leaderboard", params={"limit": args.limit, "offset": args.offset})
    )
    for kind in ("users", "workers"):
        total = board.get("total", {}).get(kind)
        shown = len(board[kind])
        print(
            f"{kind}:"
            + (f" {args.offset + 1 if shown else 0}-{args.offset + shown} of {total}" if total is not None else "")
        )
        print(f"  {'name':<28}{'all time':>10}{'24 h':>10}")
        for row in board[kind]:
            print(f"  {row['name']:<28}{row['total']:>10}{row['total_24h']:>10}")
    return 0


@contextlib.contextmanager
def _open_store(where: str | None) -> Iterator[Any]:
    """The tracker's store at ``where``: a postgresql:// URL or an (unlocked) node data directory."""
    if not where:
        raise ValidationError("--store is required (a data directory or a postgresql:// URL), or set OCF_JOBS_STORE")
    if where.startswith(("postgresql://", "postgres://")):
        from ..jobs.pg import PgJobStore

        store = PgJobStore(where)
        try:
            yield store
        finally:
            store.close()
        return
    from ..jobs.store import JobStore
    from ..store import Store

    with Store.open(Path(where).expanduser()) as raw:
        yield JobStore(raw)


def _offline(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except ValidationError as exc:
            return _fail(str(exc), 2)
        except (OcfError, OSError) as exc:
            return _fail(str(exc))

    return run


@_offline
def cmd_export(args: argparse.Namespace) -> int:
    from ..jobs.transfer import export_lmdb, write_lines

    with _open_store(args.store) as store, ExitStack() as stack:
        out = stack.enter_context(open(args.output, "wb")) if args.output else sys.stdout.buffer
        if getattr(store, "blocking", False):
            from ..jobs.pg.transfer import export_pg

            n = write_lines(export_pg(store, args.project), out)
        else:
            n = write_lines(export_lmdb(store, args.project), out)
        out.flush()
    print(f"exported {n} records of project {args.project!r}", file=sys.stderr)
    return 0


@_offline
def cmd_import(args: argparse.Namespace) -> int:
    from ..jobs.transfer import import_lmdb, read_lines

    with _open_store(args.store) as store, ExitStack() as stack:
        source = stack.enter_context(open(args.file, "rb")) if args.file else sys.stdin.buffer
        records = read_lines(source)
        if getattr(store, "blocking", False):
            from ..jobs.pg.transfer import import_pg

            counts = import_pg(store, records, time.time())
        else:
            counts = import_lmdb(store, records, time.time())
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    print(f"imported {summary or 'an empty project'}", file=sys.stderr)
    return 0
