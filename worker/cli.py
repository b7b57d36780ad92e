"""The rerank-worker command line (CONTRACT.md): argument handling and output only."""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from worker import constants, errors, ingest
from worker.settings import Settings, get_settings

app = typer.Typer(
    help="Rerank large amounts of text and images through hosted rerank APIs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
tokens_app = typer.Typer(help="Tenants of the HTTP API and their tokens.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
prices_app = typer.Typer(
    help="The price table (cost in usage, status and budgets).", no_args_is_help=True
)
app.add_typer(prices_app, name="prices")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

EXIT_BAD_INPUT = 2
ENDED = ("completed", "cancelled", "failed")
WAIT_POLL_S = 0.2


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Every known error becomes one clear line and the contract's exit code."""
    try:
        yield
    except errors.InputError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except errors.RerankError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        fail(f"database error ({type(exc).__name__}): {reason}")
    except OSError as exc:
        fail(f"{type(exc).__name__}: {exc}")


def _settings() -> Settings:
    from worker.schema import ensure_schema

    settings = get_settings()
    ensure_schema(settings.sqlalchemy_url())
    return settings


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=None) + "\n")


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the Alembic migrations to RERANK_DATABASE_URL."""
    from worker.db import migrate

    with _errors():
        url = get_settings().sqlalchemy_url()
        migrate.upgrade(url, revision)
    out.print(f"database at revision {revision}")


@app.command()
def worker(
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", "-c", help="Tasks run at once (threads), per process."),
    ] = None,
    queues: Annotated[str, typer.Option("--queues", "-Q")] = ",".join(constants.PRIORITIES),
    loglevel: Annotated[
        str | None, typer.Option("--loglevel", "-l", help="Default: RERANK_LOG_LEVEL.")
    ] = None,
    hostname: Annotated[str | None, typer.Option("--hostname", "-n")] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="Worker processes, each with a share of the slots. Default: one per "
            f"{constants.SLOTS_PER_PROCESS} slots, at most one per CPU core.",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            help="Serve Prometheus metrics of all this worker's processes at /metrics.",
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address the metrics server listens on.")
    ] = "127.0.0.1",
) -> None:
    """Run a Celery worker (same as `celery -A worker.celery_app worker`)."""
    with _errors():
        settings = _settings()
        settings.require_keys()
        from worker import processes as worker_processes

        count = processes or worker_processes.default_processes(settings)
        level = loglevel or settings.log_level
        if count > 1 or metrics_port is not None:
            passed = [f"--queues={queues}", f"--loglevel={level}"]
            if concurrency:
                passed.append(f"--concurrency={concurrency}")
            if metrics_port is None:
                raise typer.Exit(worker_processes.run(count, settings, hostname, passed))
            raise typer.Exit(
                worker_processes.run_with_metrics(
                    count,
                    settings,
                    hostname,
                    passed,
                    host=metrics_host,
                    port=metrics_port,
                    log_level=level,
                )
            )
        from worker.celery_app import app as celery_app

        argv = [
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency or settings.default_worker_concurrency()}",
            f"--queues={queues}",
            f"--loglevel={level}",
            "--without-gossip",
            "--without-mingle",
        ]
        if settings.log_format == "json":
            from worker import logs

            argv.insert(0, "--quiet")  # celery's own option: no banner (plain text on stdout)
            # Before Celery starts: its first warnings come before it sets logging up.
            logs.configure("json", level, settings.secrets())
        if hostname:
            argv.append(f"--hostname={hostname}")
        celery_app.worker_main(argv)


def _open_lines(file: str) -> tuple[Any, str]:
    if file == "-":
        return sys.stdin.buffer, "<stdin>"
    path = Path(file)
    if not path.is_file():
        raise errors.InputError(f"no such file: {file}")
    return path.open("rb"), str(path)


@app.command()
def submit(
    file: Annotated[str, typer.Argument(help="Requests file (JSON Lines), or - for stdin.")],
    query: Annotated[
        str | None, typer.Option(help="Rank a corpus file against this query.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model for requests that name none.")] = None,
    top_n: Annotated[int | None, typer.Option("--top-n", help="Results kept per request.")] = None,
    priority: Annotated[str, typer.Option(help="interactive or bulk.")] = constants.QUEUE_BULK,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    use_cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Reuse and keep scores already paid for.")
    ] = True,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Cap on the tokens the job may bill.")
    ] = None,
    max_cost: Annotated[
        float | None,
        typer.Option("--max-cost", help="Cap on the job's cost, in the price table's currency."),
    ] = None,
    webhook_url: Annotated[
        str | None,
        typer.Option("--webhook-url", help="POST a signed webhook here when the job ends."),
    ] = None,
    on_complete: Annotated[
        str | None,
        typer.Option("--on-complete", help="Send this Celery task (job_id, status) when it ends."),
    ] = None,
    on_complete_queue: Annotated[
        str, typer.Option("--on-complete-queue", help="The queue of the --on-complete task.")
    ] = constants.DEFAULT_ON_COMPLETE_QUEUE,
    wait_: Annotated[bool, typer.Option("--wait", help="Wait until the job ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Validate the whole file, store the job and enqueue it; prints the job id last."""
    from worker.service.submit import JobOptions, submit_job

    with _errors():
        settings = _settings()
        settings.require_keys()
        options = JobOptions(
            query=query,
            model=model,
            top_n=top_n,
            priority=priority,
            idempotency_key=idempotency_key,
            use_cache=use_cache,
            max_tokens=max_tokens,
            max_cost=max_cost,
            webhook_url=webhook_url,
            on_complete=on_complete,
            on_complete_queue=on_complete_queue,
        )
        stream, source = _open_lines(file)
        with stream:
            lines = ingest.read_lines(stream, settings.max_line_bytes)
            result = submit_job(lines, source=source, options=options, settings=settings)
        for warning in result.warnings:
            err.print(f"[yellow]warning:[/] {escape(warning)}")
        if not result.enqueued:
            err.print(
                "[yellow]warning:[/] the broker is unreachable; the job is stored and a "
                "worker enqueues it once Redis is back"
            )
        if result.existing:
            err.print(f"job {result.job_id} already exists for this idempotency key")
        elif not as_json:
            err.print(f"job {result.job_id}: {result.total_requests} requests queued")
        ended_ok = True
        if wait_:
            ended_ok = _wait(result.job_id, None, settings)
        if as_json:
            _print_json(
                {
                    "id": result.job_id,
                    "total_requests": result.total_requests,
                    "existing": result.existing,
                    "warnings": result.warnings,
                }
            )
        else:
            out.print(result.job_id)
        if not ended_ok:
            raise typer.Exit(1)


@app.command()
def estimate(
    file: Annotated[str, typer.Argument(help="Requests file (JSON Lines), or - for stdin.")],
    query: Annotated[
        str | None, typer.Option(help="Rank a corpus file against this query.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model for requests that name none.")] = None,
    use_cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Count pairs the score cache holds.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What a file would cost and how long it would take; stores nothing."""
    from worker.service.estimate import estimate_job
    from worker.service.submit import JobOptions

    with _errors():
        settings = _settings()
        options = JobOptions(query=query, model=model, use_cache=use_cache)
        stream, _ = _open_lines(file)
        with stream:
            result = estimate_job(stream, options=options, settings=settings)
    if as_json:
        _print_json(result.as_dict())
        return
    out.print(f"requests: {result.requests}")
    out.print(f"upstream calls: {result.calls}")
    out.print(f"estimated tokens: {result.estimated_tokens}")
    if result.search_units:
        out.print(f"estimated search units: {result.search_units}")
    out.print(f"estimated cost: {result.estimated_cost:.6f}")
    for name in result.unpriced_models:
        out.print(
            f"[yellow]note:[/] model {escape(name)} has no price; its calls cost nothing here"
        )
    out.print(f"pairs already in the score cache: {result.cached_pairs}")
    out.print(
        f"estimated time: {result.estimated_seconds:.1f} s, bound by {result.bound_by} "
        f"({result.call_latency_s:.3f} s a call, {result.latency_from})"
    )


@app.command()
def status(job: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Status, counts and usage of a job."""
    from worker.service import read

    with _errors():
        info = read.job_status(job, _settings())
    if as_json:
        _print_json(info)
        return
    usage = info["usage"]
    out.print(f"job {info['id']}  [bold]{info['status']}[/]  priority {info['priority']}")
    out.print(
        f"requests: total {info['total']}  succeeded {info['succeeded']}  failed {info['failed']}"
        f"  cancelled {info['cancelled']}  pending {info['pending']}"
    )
    out.print(
        f"usage: {usage['total_tokens']} tokens, {usage['calls']} upstream calls, "
        f"cost {usage['cost']:.6f}"
    )
    for note in usage["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}")
    budget = info["budget"]
    if budget["max_tokens"] is not None or budget["max_cost"] is not None:
        caps = [
            f"{label} {spent} of {cap}"
            for label, spent, cap in (
                ("tokens", budget["spent_tokens"], budget["max_tokens"]),
                ("cost", f"{budget['spent_cost']:.6f}", budget["max_cost"]),
            )
            if cap is not None
        ]
        out.print(f"budget: {', '.join(caps)}")
    cache = info["cache"]
    if cache["hits"]:
        out.print(
            f"score cache: {cache['hits']} documents ({cache['hit_rate']:.1%}), "
            f"{cache['tokens_saved']} tokens and {cache['cost_saved']:.6f} saved"
        )
    for warning in info["warnings"]:
        out.print(f"[yellow]warning:[/] {escape(warning)}")
    for notification in info["notifications"]:
        out.print(f"notification: {_notification_line(notification)}")


def _notification_line(notification: dict[str, Any]) -> str:
    code = notification["last_status_code"]
    return escape(
        f"{notification['kind']} {notification['id']} {notification['status']} after "
        f"{notification['attempts']} attempts" + (f", last HTTP {code}" if code else "")
    )


@app.command()
def webhooks(job: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """A job's notifications (webhooks, Celery callback) and every attempt at each."""
    from worker.service import read

    with _errors():
        rows = read.job_notifications(job, _settings())
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print(f"job {job} has no notifications")
    for notification in rows:
        target = notification["target"]
        if notification["queue"]:
            target += f" (queue {notification['queue']})"
        out.print(f"[bold]{_notification_line(notification)}[/]  {escape(target)}")
        if notification["next_attempt_at"]:
            out.print(f"  next attempt at {notification['next_attempt_at']}")
        table = Table("attempt", "started", "status", "error", "ms")
        for attempt in notification["attempt_log"]:
            table.add_row(
                str(attempt["attempt"]), attempt["started_at"], str(attempt["status_code"] or "-"),
                escape(attempt["error"] or ""), f"{attempt['duration_ms']:.0f}",
            )  # fmt: skip
        out.print(table)


@app.command()
def jobs(
    status_: Annotated[str | None, typer.Option("--status")] = None,
    limit: int = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List jobs, newest first."""
    from worker.service import read

    with _errors():
        rows = read.list_jobs(status_, limit, _settings())
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "status", "priority", "requests", "created", "source")
    for row in rows:
        table.add_row(
            row["id"], row["status"], row["priority"], str(row["total_requests"]),
            row["created_at"], row["source"] or "",
        )  # fmt: skip
    out.print(table)


def _wait(job_id: str, timeout_s: float | None, settings: Settings) -> bool:
    """Show progress until the job ends; True when it completed."""
    from worker.service import read

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    info = read.job_progress(job_id, settings)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        bar = progress.add_task(job_id[:12], total=info["total"], failed=0)
        interval_s = WAIT_POLL_S
        while True:
            done = info["succeeded"] + info["failed"] + info["cancelled"]
            progress.update(bar, completed=done, failed=info["failed"])
            if info["status"] in ENDED:
                break
            if deadline is not None and time.monotonic() > deadline:
                progress.stop()
                fail(f"job {job_id} still {info['status']} after {timeout_s:g}s")
            time.sleep(interval_s)
            asked_at = time.monotonic()
            info = read.job_progress(job_id, settings)
            # A huge job's counts take a while: keep polling under a tenth of the database.
            interval_s = max(WAIT_POLL_S, 10 * (time.monotonic() - asked_at))
    err.print(
        f"job {job_id} {info['status']}: {info['succeeded']} succeeded, {info['failed']} failed"
    )
    return bool(info["status"] == "completed")


@app.command()
def wait(job: str, timeout: Annotated[float | None, typer.Option(help="Seconds.")] = None) -> None:
    """A progress bar until the job ends; exit 0 when it completed."""
    with _errors():
        ok = _wait(job, timeout, _settings())
    if not ok:
        raise typer.Exit(1)


@app.command()
def results(
    job: str,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write to a file.")] = None,
) -> None:
    """JSON Lines, one per request in input order."""
    from worker.service import read

    with _errors():
        settings = _settings()
        if output is None:
            read.write_results(job, sys.stdout, settings)
            return
        with output.open("w", encoding="utf-8") as handle:
            count = read.write_results(job, handle, settings)
        err.print(f"{count} lines written to {output}")


@app.command()
def usage(
    job: Annotated[str | None, typer.Option("--job")] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Only the jobs of this tenant (token NAME).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Tokens, upstream calls and cost, per key NAME and model."""
    from worker import tenants
    from worker.service.scope import OPERATOR, tenant_scope
    from worker.service.usage import usage_report

    with _errors():
        settings = _settings()
        scope = OPERATOR
        if tenant is not None:
            scope = tenant_scope(tenants.tenant_id_of(tenant, settings), is_admin=False)
        report = usage_report(job, settings, scope)
    if as_json:
        _print_json(report)
        return
    table = Table("key", "model", "calls", "billed", "tokens", "cost")
    for row in report["by_key_and_model"]:
        cost = "-" if row["cost"] is None else f"{row['cost']:.6f} {row['currency']}"
        table.add_row(
            row["key"], row["model"], str(row["calls"]), str(row["billed_calls"]),
            str(row["total_tokens"]), cost,
        )  # fmt: skip
    table.add_row(
        "total", "", str(report["calls"]), str(report["billed_calls"]),
        str(report["total_tokens"]), f"{report['cost']:.6f}",
    )  # fmt: skip
    out.print(table)
    for note in report["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}")
    cache = report["cache"]
    out.print(
        f"score cache: {cache['hits']} hits ({cache['hit_rate']:.1%} of documents), "
        f"{cache['tokens_saved']} tokens and {cache['cost_saved']:.6f} saved"
    )


@app.command()
def cancel(job: str) -> None:
    """No further upstream calls for the job; finished results stay."""
    from worker.service.control import cancel_job

    with _errors():
        changed = cancel_job(job, _settings())
    out.print(f"job {job} cancelled" if changed else f"job {job} had already ended")


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = constants.API_HOST,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = constants.API_PORT,
    workers: Annotated[int, typer.Option("--workers", min=1, help="API processes.")] = 1,
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, docs at /docs). Holds no upstream key."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    with _errors():
        settings = _settings()
    # uvicorn's own log format for the project's loggers too (never a token: they are not
    # logged, and uvicorn's access log shows no header).
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["worker"] = {"handlers": ["default"], "level": settings.log_level}
    uvicorn.run(
        "worker.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
        log_config=log_config,
        # The API sits behind whatever the operator puts in front; no Server header to aim at.
        server_header=False,
    )


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="The tenant: the service that will use it.")],
    admin: Annotated[bool, typer.Option("--admin", help="Sees every tenant's jobs.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Make a tenant and its token; the token is shown this once, on the last line."""
    from worker import tenants

    with _errors():
        made = tenants.create_tenant(name, _settings(), is_admin=admin)
    if as_json:
        _print_json({"name": made.name, "token": made.token, "webhook_secret": made.webhook_secret})
        return
    kind = "admin tenant" if made.is_admin else "tenant"
    err.print(f"{kind} {made.name} created; its webhook secret: {made.webhook_secret}")
    err.print("the token below is shown only now: keep it")
    sys.stdout.write(made.token + "\n")


@tokens_app.command("list")
def tokens_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Tenants by name (never a token or its hash)."""
    from worker import tenants

    with _errors():
        rows = tenants.list_tenants(_settings())
    if as_json:
        _print_json(
            [
                {
                    "name": t.name,
                    "admin": t.is_admin,
                    "created_at": t.created_at.isoformat(),
                    "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
                }
                for t in rows
            ]
        )
        return
    table = Table("name", "admin", "created", "revoked")
    for t in rows:
        revoked = t.revoked_at.isoformat() if t.revoked_at else ""
        table.add_row(t.name, "yes" if t.is_admin else "", t.created_at.isoformat(), revoked)
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(name: str) -> None:
    """The tenant's token answers 401 from now on; its jobs stay."""
    from worker import tenants

    with _errors():
        changed = tenants.revoke_tenant(name, _settings())
    out.print(f"token of {name} revoked" if changed else f"token of {name} was already revoked")


@app.command()
def retry(
    job: str,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="A new token cap (replaces the old).")
    ] = None,
    max_cost: Annotated[
        float | None, typer.Option("--max-cost", help="A new cost cap (replaces the old).")
    ] = None,
) -> None:
    """Run a finished job's failed and cancelled requests again, under the same job id."""
    from worker.service.control import retry_job

    with _errors():
        queued = retry_job(job, _settings(), max_tokens=max_tokens, max_cost=max_cost)
    if queued:
        out.print(f"job {job}: {queued} requests queued again")
    else:
        out.print(f"job {job}: no failed requests, nothing queued")


@app.command()
def prune(
    older_than: Annotated[
        float, typer.Option("--older-than", help="Delete finished jobs older than DAYS.")
    ],
    cache_older_than: Annotated[
        float | None,
        typer.Option("--cache-older-than", help="Delete score-cache entries older than DAYS."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Delete old finished jobs (their usage stays in `usage`) and old score-cache entries."""
    from worker.service.prune import prune as prune_jobs

    with _errors():
        result = prune_jobs(older_than, cache_older_than, _settings())
    if as_json:
        _print_json(result.as_dict())
        return
    out.print(
        f"pruned {result.jobs} jobs: {result.requests} requests, {result.documents} documents, "
        f"{result.calls} upstream calls; {result.cache_entries} score-cache entries"
    )


@app.command()
def top(
    once: Annotated[bool, typer.Option("--once", help="Draw one frame and exit.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between frames.")] = 1.0,
    window: Annotated[float, typer.Option(min=1.0, help="Calls/s over this many seconds.")] = 10.0,
) -> None:
    """A live terminal view of the keys, the jobs in flight and calls/s."""
    from worker import top as top_view

    with _errors():
        settings = _settings()
        top_view.run(out, settings, interval_s=interval, window_s=window, once=once)


@app.command()
def demo(
    latency_ms: Annotated[float, typer.Option(help="Stand-in API latency.")] = 40.0,
) -> None:
    """The whole path on the embedded defaults, with no key and no network."""
    from worker import demo as demo_module

    with _errors():
        demo_module.run(out, err, latency_ms=latency_ms)


@prices_app.command("list")
def prices_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every model's price."""
    from worker.service.prices import list_prices

    with _errors():
        rows = list_prices(_settings())
    if as_json:
        _print_json(rows)
        return
    table = Table("model", "per million tokens", "per search unit", "currency")
    for row in rows:
        table.add_row(
            row["model"],
            _price_text(row["price_per_million_tokens"]),
            _price_text(row["price_per_search_unit"]),
            row["currency"],
        )
    out.print(table)


def _price_text(price: float | None) -> str:
    return "-" if price is None else f"{price:g}"


@prices_app.command("set")
def prices_set(
    model: str,
    price: float,
    per: Annotated[
        str, typer.Option("--per", help="million_tokens or search_unit.")
    ] = "million_tokens",
    currency: Annotated[str | None, typer.Option("--currency")] = None,
) -> None:
    """Set a model's price per million tokens (or per search unit)."""
    from worker.service.prices import set_price

    with _errors():
        row = set_price(model, price, per=per, currency=currency, settings=_settings())
    unit = "million tokens" if per == "million_tokens" else "search unit"
    out.print(f"{row['model']}: {price:g} {row['currency']} per {unit}")


def main() -> None:
    app()
