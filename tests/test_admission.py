"""Admission: client keys, per-key rate limits on a fake clock, and API keys."""

import hashlib

import pytest

from shoal.coordinator.admission import (
    Admission,
    ApiKeys,
    AuthError,
    Limits,
    RateLimited,
    TooLarge,
    client_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admission(**limits) -> tuple[Admission, Clock]:
    clock = Clock()
    return Admission(Limits(**limits), clock), clock


@pytest.mark.parametrize("host, key", [
    ("203.0.113.77", "net:203.0.113.0/24"),
    ("2001:db8:1:2::5", "net:2001:db8:1::/48"),
    ("::ffff:203.0.113.77", "net:203.0.113.0/24"),
    ("testclient", "net:unknown"),
    ("", "net:unknown"),
    (None, "net:unknown"),
])
def test_client_key_is_the_network(host, key):
    assert client_key(host, None) == key


def test_client_key_prefers_a_hashed_api_key():
    expected = "key:" + hashlib.sha256(b"sk-secret").hexdigest()[:16]
    assert client_key("203.0.113.77", "sk-secret") == expected
    assert "sk-secret" not in expected


def test_requests_per_minute_refuses_the_61st_then_recovers():
    gate, clock = admission()
    for _ in range(60):
        gate.admit("a", 10).release()
    with pytest.raises(RateLimited) as refused:
        gate.admit("a", 10)
    assert refused.value.limit == "requests_per_minute"
    assert refused.value.retry_after == pytest.approx(1.0)
    clock.now += refused.value.retry_after
    gate.admit("a", 10)


def test_concurrent_streams_refuse_until_one_is_released():
    gate, _ = admission(concurrent_streams=2)
    first, _second = gate.admit("a", 1), gate.admit("a", 1)
    with pytest.raises(RateLimited) as refused:
        gate.admit("a", 1)
    assert (refused.value.limit, refused.value.retry_after) == ("concurrent_streams", 1.0)
    first.release()
    first.release()  # idempotent: frees one slot, not two
    gate.admit("a", 1)
    with pytest.raises(RateLimited):
        gate.admit("a", 1)


def test_release_refunds_unused_tokens():
    gate, clock = admission(tokens_per_minute=600)
    gate.admit("a", 500).release(used_tokens=100)
    ticket = gate.admit("a", 500)  # 400 refunded, so 500 of 600 are back
    with pytest.raises(RateLimited) as refused:
        gate.admit("a", 100)
    assert refused.value.limit == "tokens_per_minute"
    assert refused.value.retry_after == pytest.approx(10.0)  # 100 tokens at 10 per second
    ticket.release()  # no used count: nothing refunded
    clock.now += 10
    gate.admit("a", 100)


def test_too_large_names_both_numbers():
    gate, _ = admission(tokens_per_minute=1000)
    with pytest.raises(TooLarge, match=r"1001.*1000"):
        gate.admit("a", 1001)
    gate.admit("a", 1000)


def test_a_refusal_takes_nothing():
    gate, _ = admission(requests_per_minute=3, concurrent_streams=1, tokens_per_minute=1000)
    ticket = gate.admit("a", 100)
    for _ in range(5):
        with pytest.raises(RateLimited, match="concurrent_streams"):
            gate.admit("a", 100)
    ticket.release()
    # Had the refusals taken requests or tokens, this would be refused.
    gate.admit("a", 900).release()
    gate.admit("a", 0)


def test_the_longest_wait_is_reported():
    gate, _ = admission(requests_per_minute=2, tokens_per_minute=60)
    gate.admit("a", 30).release()
    gate.admit("a", 30).release()
    # A request is back in 30 s, but 60 tokens only in 60 s.
    with pytest.raises(RateLimited) as refused:
        gate.admit("a", 60)
    assert (refused.value.limit, refused.value.retry_after) == ("tokens_per_minute", pytest.approx(60.0))


def test_keys_are_independent():
    gate, _ = admission(requests_per_minute=1)
    gate.admit("a", 1)
    with pytest.raises(RateLimited):
        gate.admit("a", 1)
    gate.admit("b", 1)


def test_zero_means_unlimited():
    gate, _ = admission(requests_per_minute=0, concurrent_streams=0, tokens_per_minute=-1)
    tickets = [gate.admit("a", 10**9) for _ in range(1000)]
    for ticket in tickets:
        ticket.release(used_tokens=0)
    gate.forget_idle()
    assert gate._clients == {}


def test_forget_idle_keeps_open_streams_and_recent_use():
    gate, clock = admission()
    open_stream = gate.admit("open", 100)
    gate.admit("idle", 100).release()
    clock.now += 60
    gate.admit("recent", 100).release()
    gate.forget_idle()
    assert set(gate._clients) == {"open", "recent"}
    open_stream.release()
    clock.now += 60
    gate.admit("other", 1)  # a minute since the last sweep: admit sweeps
    assert set(gate._clients) == {"other"}


def test_api_keys_from_list_and_file(tmp_path):
    file = tmp_path / "keys.txt"
    file.write_text("# operators\n  sk-file  \n\n#sk-commented\nsk-two\n")
    keys = ApiKeys.load([" sk-direct "], file)
    assert keys.keys == {"sk-direct", "sk-file", "sk-two"}
    assert keys.required
    assert not ApiKeys.load([]).required
    assert "sk-file" not in repr(keys)


def test_api_keys_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(AuthError, match=r"nope\.txt"):
        ApiKeys.load([], missing)


@pytest.mark.parametrize("header, message", [
    (None, "missing"),
    ("Bearer", "missing"),
    ("Basic c2stb25lOg==", "Bearer scheme"),
    ("Bearer sk-wrong", "unknown API key"),
])
def test_check_refuses(header, message):
    with pytest.raises(AuthError, match=message) as refused:
        ApiKeys({"sk-one"}).check(header)
    assert "sk-wrong" not in str(refused.value)


def test_check_accepts():
    keys = ApiKeys({"sk-one", "sk-two"})
    assert keys.check("Bearer sk-two") == "sk-two"
    assert keys.check("bearer  sk-one ") == "sk-one"


def test_check_without_configured_keys():
    keys = ApiKeys(set())
    assert keys.check(None) is None
    assert keys.check("Basic c2stb25lOg==") is None
    assert keys.check("Bearer anything") == "anything"
