"""Where a job may ask to be told it ended: checked at submit, before anything is stored.

A webhook URL is fetched by the workers, inside the deployment's network, so one that
resolves to a loopback, private, link-local or otherwise special address could reach what
only the deployment should (server-side request forgery). Such URLs are refused unless the
deployment allows them (RERANK_WEBHOOK_ALLOW_PRIVATE=true, for tests and private networks).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from worker import constants, errors

MAX_URL_CHARS = 2000
# A Celery task name as producers write them: dotted Python identifiers.
_TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# A queue name: what Redis and RabbitMQ both take without quoting.
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:\-]+")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: IPAddress) -> bool:
    """False for every address a stranger must not make the workers connect to."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return is_public(address.ipv4_mapped)
    return not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to; InputError when it resolves to none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise errors.InputError(f"cannot resolve host '{host}'", field="webhook_url") from exc
    # An IPv6 address may carry a zone ("fe80::1%eth0").
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def refused_address(url: str) -> IPAddress | None:
    """The first address of the URL's host that is not public, or None when all are."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return next((a for a in resolve(parts.hostname, port) if not is_public(a)), None)


def check_webhook_url(url: str, *, allow_private: bool) -> None:
    """InputError (field webhook_url) unless the workers may POST to `url`."""

    def bad(message: str) -> errors.InputError:
        return errors.InputError(message, field="webhook_url")

    if len(url) > MAX_URL_CHARS:
        raise bad(f"longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise bad(f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise bad("must be an http:// or https:// URL")
    if not parts.hostname:
        raise bad("must name a host")
    if parts.username is not None or parts.password is not None:
        raise bad("must not carry credentials (user:password@)")
    if allow_private:
        return
    address = refused_address(url)
    if address is not None:
        raise bad(
            f"host '{parts.hostname}' resolves to {address}, a loopback, private, link-local "
            "or reserved address (set RERANK_WEBHOOK_ALLOW_PRIVATE=true to allow it)"
        )


def check_task_name(name: str, *, field: str = "on_complete") -> None:
    """InputError unless `name` is a dotted identifier of at most MAX_TASK_NAME_CHARS."""
    if len(name) > constants.MAX_TASK_NAME_CHARS:
        raise errors.InputError(
            f"longer than {constants.MAX_TASK_NAME_CHARS} characters", field=field
        )
    if not _TASK_NAME.fullmatch(name):
        raise errors.InputError(
            "must be a Celery task name: dotted identifiers, e.g. myapp.tasks.job_done",
            field=field,
        )


def check_queue_name(name: str) -> None:
    if len(name) > constants.MAX_TASK_NAME_CHARS or not _QUEUE_NAME.fullmatch(name):
        raise errors.InputError(
            f"must be a queue name of letters, digits and _.:- (at most "
            f"{constants.MAX_TASK_NAME_CHARS})",
            field="on_complete_queue",
        )
