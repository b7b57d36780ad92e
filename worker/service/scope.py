"""Whose jobs a caller sees: the one ownership check, and the sessions the use cases open.

A job belongs to the tenant whose token submitted it, or to no tenant when the CLI did. The
CLI is run by whoever holds the database's credentials and sees every job; a tenant sees its
own, and an admin tenant every tenant's. A job outside the caller's scope is reported as not
found, so a job id tells a stranger nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import ColumnElement, true
from sqlalchemy.orm import Session, sessionmaker

from worker import errors
from worker.db import repository
from worker.db.models import Job
from worker.db.session import get_sessionmaker, in_transaction
from worker.settings import Settings, get_settings

T = TypeVar("T")


@dataclass(frozen=True)
class Scope:
    """The caller: a tenant (`tenant_id`), and whether it sees every tenant's jobs."""

    tenant_id: int | None
    sees_all: bool

    def can_see(self, job: Job) -> bool:
        return self.sees_all or job.tenant_id == self.tenant_id

    def jobs_filter(self) -> ColumnElement[bool]:
        """A WHERE clause on `job` that keeps the jobs this caller may see."""
        return true() if self.sees_all else Job.tenant_id == self.tenant_id


# The CLI and the workers: whoever holds the database's credentials sees every job.
OPERATOR = Scope(tenant_id=None, sees_all=True)


def tenant_scope(tenant_id: int, is_admin: bool) -> Scope:
    return Scope(tenant_id=tenant_id, sees_all=is_admin)


def sessions(settings: Settings | None = None) -> sessionmaker[Session]:
    return get_sessionmaker((settings or get_settings()).sqlalchemy_url())


def run_in_transaction(fn: Callable[[Session], T], settings: Settings | None = None) -> T:
    return in_transaction((settings or get_settings()).sqlalchemy_url(), fn)


def visible_job(session: Session, job_id: str, scope: Scope) -> Job:
    """The job, if it exists and the caller may see it; JobNotFound otherwise (also for a
    string no job id can be, which PostgreSQL would refuse to compare)."""
    job = None if "\x00" in job_id else repository.get_job(session, job_id)
    if job is None or not scope.can_see(job):
        raise errors.JobNotFound(f"no job with id '{job_id}'")
    return job
