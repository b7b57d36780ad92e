"""Property-based fuzz of the submit path with hostile input, on SQLite and PostgreSQL.

Two doors, one property (fuzz_strategies.check_submit_entry): the `rerank-worker submit`
process (exit 0 or 2, never 1, never a traceback) and the use case `submit_job` (success or
InputError). Refused input stores nothing; accepted input is stored as given. Most examples
go through the use case; a process per example is slow, so the CLI gets a few.
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Any

from conftest import Env
from fuzz_strategies import FUZZ_CAPS, HostileSubmit, check_submit_entry, hostile_submits
from hypothesis import HealthCheck, assume, given, settings

from worker import errors, ingest
from worker.service.submit import JobOptions, submit_job
from worker.settings import get_settings

# The fixtures (a database, Redis, the environment) are made once per test and shared by
# its examples, which is what the property needs: it counts rows before and after each.
FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
USE_CASE_EXAMPLES = 300
CLI_EXAMPLES = 20


def use_case_entry() -> Any:
    """The use-case door: submit_job with the file's lines, as the CLI reads them."""
    config = get_settings()

    def entry(submit: HostileSubmit) -> str | None:
        options = JobOptions(query=submit.query, top_n=submit.top_n, model=submit.model)
        lines = ingest.read_lines(io.BytesIO(submit.data), config.max_line_bytes)
        try:
            result = submit_job(lines, source="fuzz", options=options, settings=config)
        except errors.InputError as exc:
            assert str(exc), "an InputError says what is wrong"
            return None
        return result.job_id

    return entry


def cli_entry(env: Env, tmp_path: Path) -> Any:
    """The CLI's door: a `rerank-worker submit` process per example."""
    counter = itertools.count()

    def entry(submit: HostileSubmit) -> str | None:
        path = tmp_path / f"hostile-{next(counter)}.jsonl"
        path.write_bytes(submit.data)
        args = ["submit", str(path)]
        for option, value in (("--query", submit.query), ("--model", submit.model)):
            if value is not None:
                args += [option, value]
        if submit.top_n is not None:
            args += ["--top-n", str(submit.top_n)]
        done = env.cli(*args)
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode in (0, 2), f"exit {done.returncode}: {done.stderr}"
        if done.returncode == 2:
            assert done.stderr.startswith("error:"), done.stderr
            return None
        return done.stdout.strip().splitlines()[-1]

    return entry


def _passable_as_argv(submit: HostileSubmit) -> bool:
    """An argument of a process cannot hold NUL, nor a surrogate that is not an
    undecodable byte's (os.fsencode)."""
    for value in (submit.query, submit.model):
        if value is None:
            continue
        if "\x00" in value:
            return False
        try:
            os.fsencode(value)
        except UnicodeEncodeError:
            return False
    return True


def test_use_case_refuses_hostile_input_or_stores_it_as_given(
    make_env: Any, database_url: str
) -> None:
    make_env(database_url, **FUZZ_CAPS)
    entry = use_case_entry()

    @settings(FUZZ_SETTINGS, max_examples=USE_CASE_EXAMPLES)
    @given(submit=hostile_submits())
    def run(submit: HostileSubmit) -> None:
        check_submit_entry(entry, submit, database_url)

    run()


def test_cli_submit_exits_0_or_2_never_a_traceback_and_stores_nothing_when_refused(
    make_env: Any, database_url: str, tmp_path: Path
) -> None:
    env: Env = make_env(database_url, **FUZZ_CAPS)
    entry = cli_entry(env, tmp_path)

    @settings(FUZZ_SETTINGS, max_examples=CLI_EXAMPLES)
    @given(submit=hostile_submits())
    def run(submit: HostileSubmit) -> None:
        assume(_passable_as_argv(submit))
        check_submit_entry(entry, submit, database_url)

    run()
