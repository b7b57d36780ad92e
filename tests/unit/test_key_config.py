"""RERANK_API_KEYS in its JSON form: every limit read, every mistake named, no secret shown."""

from __future__ import annotations

import json

import pytest

from worker import errors
from worker.settings import ApiKey, Settings, parse_api_keys
from worker.upstream.token_estimate import estimate_tokens, expected_tokens

SECRET_A = "sk-json-alpha-0123456789"
SECRET_B = "sk-json-beta-9876543210"


def keys_json(*entries: dict[str, object]) -> str:
    return json.dumps(list(entries))


def test_the_json_form_reads_every_limit_and_defaults_the_rest() -> None:
    raw = keys_json(
        {"name": "main", "secret": SECRET_A, "concurrency": 8, "rpm": 500, "tpm": 2_000_000,
         "daily_tokens": 50_000_000, "monthly_tokens": 1_000_000_000},
        {"name": "spare", "secret": SECRET_B},
    )  # fmt: skip
    main, spare = parse_api_keys(raw, 4)
    assert (main.name, main.secret.get_secret_value(), main.max_concurrency) == (
        "main",
        SECRET_A,
        8,
    )
    assert (main.rpm, main.tpm, main.daily_tokens, main.monthly_tokens) == (
        500,
        2_000_000,
        50_000_000,
        1_000_000_000,
    )
    assert main.has_quota
    assert spare == ApiKey("spare", spare.secret, 4)
    assert (spare.rpm, spare.tpm, spare.has_quota) == (None, None, False)


def test_the_short_form_still_works_beside_it() -> None:
    [key] = parse_api_keys(f"alpha={SECRET_A}@3", 4)
    assert (key.name, key.max_concurrency, key.rpm, key.tpm) == ("alpha", 3, None, None)


def test_settings_read_the_json_form_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_API_KEYS", keys_json({"name": "main", "secret": SECRET_A, "rpm": 9}))
    monkeypatch.setenv("RERANK_RATE_WINDOW_S", "5")
    settings = Settings()
    assert [(k.name, k.rpm) for k in settings.keys] == [("main", 9)]
    assert settings.rate_window_s == 5


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"name": "main", "secret": SECRET_A, "rpm": 0}, "entry 1 ('main'): field 'rpm'"),
        ({"name": "main", "secret": SECRET_A, "tpm": "many"}, "entry 1 ('main'): field 'tpm'"),
        ({"name": "main", "secret": SECRET_A, "daily_tokens": True}, "field 'daily_tokens'"),
        ({"name": "main", "secret": SECRET_A, "monthly_tokens": 1.5}, "field 'monthly_tokens'"),
        ({"name": "main", "secret": SECRET_A, "concurrency": -1}, "field 'concurrency'"),
        ({"name": "main", "secret": SECRET_A, "rmp": 5}, "entry 1 ('main'): unknown field 'rmp'"),
        ({"name": "main", "secret": ""}, "entry 1 ('main'): field 'secret'"),
        ({"name": "main"}, "field 'secret'"),
        ({"secret": SECRET_A}, "entry 1: field 'name'"),
    ],
)
def test_a_bad_entry_names_the_entry_and_the_field_never_the_secret(
    entry: dict[str, object], expected: str
) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        parse_api_keys(keys_json(entry), 4)
    assert expected in str(caught.value)
    assert SECRET_A not in str(caught.value)


def test_the_second_entry_is_named_by_its_position() -> None:
    raw = keys_json({"name": "a", "secret": SECRET_A}, {"name": "b", "secret": SECRET_B, "rpm": -3})
    with pytest.raises(errors.ConfigError, match=r"entry 2 \('b'\): field 'rpm'") as caught:
        parse_api_keys(raw, 4)
    assert SECRET_B not in str(caught.value)


@pytest.mark.parametrize(
    "raw",
    [
        f'[{{"name": "main", "secret": "{SECRET_A}",}}]',
        f'[{{"name": "main", "secret": "{SECRET_A}"',
        f'{{"name": "main", "secret": "{SECRET_A}"}}',
        f'["{SECRET_A}"]',
    ],
)
def test_text_that_is_not_a_key_array_is_refused_without_quoting_it(raw: str) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        parse_api_keys(raw, 4)
    assert "RERANK_API_KEYS" in str(caught.value)
    assert SECRET_A not in str(caught.value)


def test_a_name_given_twice_is_refused_in_the_json_form_too() -> None:
    raw = keys_json({"name": "a", "secret": SECRET_A}, {"name": "a", "secret": SECRET_B})
    with pytest.raises(errors.ConfigError, match="'a' is given twice"):
        parse_api_keys(raw, 4)


def test_a_keys_repr_shows_its_limits_but_not_its_secret() -> None:
    [key] = parse_api_keys(keys_json({"name": "main", "secret": SECRET_A, "rpm": 5}), 4)
    assert repr(key) == "ApiKey(name='main', max_concurrency=4, rpm=5)"


# --- the token estimate ------------------------------------------------------------------------


def test_the_estimate_counts_text_by_length_images_by_a_fixed_figure_and_the_query_per_pair() -> (
    None
):
    text = json.dumps("x" * 400)
    image = '{"image":"' + "A" * 100_000 + '"}'
    one_text = estimate_tokens("jina-reranker-m0", [text], "q" * 40)
    assert one_text == 11 + len(text) // 4
    with_image = estimate_tokens("jina-reranker-m0", [text, image], "q" * 40)
    # A base64 image is not counted by its length.
    assert with_image - one_text < 2000


def test_expected_tokens_apply_the_learnt_ratio_once_there_is_one() -> None:
    assert expected_tokens(1000, None) == 1000
    assert expected_tokens(1000, 1.5) == 1500
