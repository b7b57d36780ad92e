"""The SSRF guard on webhook URLs and the shape of Celery callback names (pure logic)."""

from __future__ import annotations

import pytest

from worker import errors
from worker.service.submit import JobOptions
from worker.settings import Settings
from worker.webhooks import targets


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "https://172.16.0.1/hook",
        "http://192.168.1.10/hook",
        "http://169.254.169.254/latest/meta-data",  # cloud metadata: link-local
        "http://[::1]/hook",
        "http://[fe80::1]/hook",
        "http://[fd00::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped loopback
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
        "http://240.0.0.1/hook",
        "http://100.64.0.1/hook",  # carrier-grade NAT, not global
    ],
)
def test_urls_resolving_to_non_public_addresses_are_refused(url: str) -> None:
    with pytest.raises(errors.InputError) as caught:
        targets.check_webhook_url(url, allow_private=False)
    assert caught.value.field == "webhook_url"
    assert "RERANK_WEBHOOK_ALLOW_PRIVATE" in str(caught.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://[::1]/x", "http://10.0.0.1"])
def test_non_public_addresses_pass_when_the_deployment_allows_them(url: str) -> None:
    targets.check_webhook_url(url, allow_private=True)


@pytest.mark.parametrize("url", ["https://93.184.216.34/hook", "http://[2606:4700::1111]:8443/h"])
def test_public_addresses_pass(url: str) -> None:
    targets.check_webhook_url(url, allow_private=False)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://93.184.216.34/hook", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("93.184.216.34/hook", "http:// or https://"),
        ("http:///hook", "must name a host"),
        ("http://user:pw@93.184.216.34/hook", "credentials"),
        ("http://93.184.216.34:99999/hook", "not a valid URL"),
        ("http://93.184.216.34/" + "a" * 2000, "longer than 2000"),
    ],
)
def test_malformed_urls_are_refused_even_when_private_is_allowed(url: str, reason: str) -> None:
    with pytest.raises(errors.InputError, match=reason) as caught:
        targets.check_webhook_url(url, allow_private=True)
    assert caught.value.field == "webhook_url"


@pytest.mark.parametrize("name", ["job_done", "myapp.tasks.job_done", "_a.B9.c_"])
def test_dotted_task_names_pass(name: str) -> None:
    targets.check_task_name(name)


@pytest.mark.parametrize(
    "name", ["", "my app.task", "tasks..done", "1tasks.done", "a.b;rm", "a" * 201]
)
def test_other_task_names_are_refused_naming_on_complete(name: str) -> None:
    with pytest.raises(errors.InputError) as caught:
        targets.check_task_name(name)
    assert caught.value.field == "on_complete"


def test_job_options_check_uses_the_settings_it_is_given() -> None:
    options = JobOptions(webhook_url="http://127.0.0.1:9/hook")
    with pytest.raises(errors.InputError, match="webhook_url"):
        options.check(settings=Settings(webhook_allow_private=False))
    options.check(settings=Settings(webhook_allow_private=True))


def test_job_options_check_refuses_a_bad_callback_queue() -> None:
    options = JobOptions(on_complete="app.done", on_complete_queue="no spaces")
    with pytest.raises(errors.InputError) as caught:
        options.check(settings=Settings())
    assert caught.value.field == "on_complete_queue"


def test_a_job_of_no_tenant_needs_the_deployment_secret_for_a_webhook() -> None:
    options = JobOptions(webhook_url="https://93.184.216.34/hook")
    with pytest.raises(errors.InputError, match="RERANK_WEBHOOK_SECRET"):
        options.check_signable(None, Settings(webhook_secret=None))
    options.check_signable(7, Settings(webhook_secret=None))  # a tenant's own secret signs it
    options.check_signable(None, Settings(webhook_secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"))
