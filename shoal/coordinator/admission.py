"""Fair-use admission for an anonymous public API: per-client rate limits held in memory, and optional API keys."""

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Limits:
    """Per-client limits; a limit of 0 or less means no limit on that dimension.

    tokens_per_minute counts prompt tokens plus max_tokens, reserved when a request is admitted.
    """

    requests_per_minute: float = 60
    concurrent_streams: int = 4
    tokens_per_minute: float = 40_000


class AdmissionError(Exception):
    """A request refused before it reaches the queue."""


class RateLimited(AdmissionError):
    """Over a limit for now; retry_after is the seconds until the refusing limit would allow the request."""

    def __init__(self, limit: str, retry_after: float) -> None:
        super().__init__(f"{limit} exceeded; retry after {retry_after:.1f}s")
        self.limit = limit
        self.retry_after = retry_after


class TooLarge(AdmissionError):
    """The request alone needs more tokens than a whole minute allows, so waiting would never help."""


class AuthError(AdmissionError):
    """Missing or wrong API key."""


def client_key(host: str | None, api_key: str | None) -> str:
    """Who a request counts against: its API key's hash if it sent one, else its network (/24 IPv4, /48 IPv6).

    Networks rather than addresses, because one client easily holds many addresses in its block; the raw address is
    never stored. Hosts that are not IP addresses (e.g. Starlette's 'testclient') share 'net:unknown'.
    """
    if api_key:
        return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return "net:unknown"
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return f"net:{ipaddress.ip_network((ip, 24 if ip.version == 4 else 48), strict=False)}"


@dataclass
class _Bucket:
    """Holds up to limit, refilled continuously at limit/60 per second, starting full; limit <= 0 never refuses."""

    limit: float
    clock: Callable[[], float]
    level: float = field(init=False)
    stamp: float = field(init=False)

    def __post_init__(self) -> None:
        self.limit = max(self.limit, 0)
        self.level, self.stamp = self.limit, self.clock()

    def refill(self) -> float:
        now = self.clock()
        self.level = min(self.limit, self.level + (now - self.stamp) * self.limit / 60)
        self.stamp = now
        return self.level

    def wait(self, amount: float) -> float:
        """Seconds until amount is available."""
        return max(0.0, (amount - self.refill()) * 60 / self.limit) if self.limit else 0.0

    def add(self, amount: float) -> None:
        if self.limit:
            self.level = min(self.limit, self.refill() + amount)

    def full(self) -> bool:
        return self.refill() >= self.limit


@dataclass
class _Client:
    requests: _Bucket
    tokens: _Bucket
    streams: int = 0


@dataclass
class Ticket:
    """One admitted request; release it when its stream ends, however it ends."""

    reserved: int
    _client: _Client = field(repr=False)
    _released: bool = False

    def release(self, used_tokens: int | None = None) -> None:
        """Free the stream slot and refund reserved-but-unused tokens; later calls do nothing."""
        if self._released:
            return
        self._released = True
        self._client.streams -= 1
        if used_tokens is not None:
            self._client.tokens.add(max(0, self.reserved - used_tokens))


class Admission:
    """Per-key buckets for requests and tokens per minute, and a count of open streams."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._clients: dict[str, _Client] = {}
        self._swept = clock()

    def admit(self, key: str, tokens: int) -> Ticket:
        """Take one request, one stream slot and `tokens` for key, all or nothing.

        Raises TooLarge, or RateLimited naming the refusing limit with the longest wait when several refuse.
        """
        if 0 < self.limits.tokens_per_minute < tokens:
            raise TooLarge(f"request needs {tokens} tokens but tokens_per_minute is {self.limits.tokens_per_minute}")
        # A full bucket refills within a minute, so sweeping once a minute keeps memory to the keys active lately.
        if self.clock() - self._swept >= 60:
            self.forget_idle()
        if key not in self._clients:
            self._clients[key] = _Client(_Bucket(self.limits.requests_per_minute, self.clock),
                                         _Bucket(self.limits.tokens_per_minute, self.clock))
        client = self._clients[key]
        waits = {"requests_per_minute": client.requests.wait(1), "tokens_per_minute": client.tokens.wait(tokens)}
        if 0 < self.limits.concurrent_streams <= client.streams:
            waits["concurrent_streams"] = 1.0
        limit = max(waits, key=waits.__getitem__)
        if waits[limit] > 0:
            raise RateLimited(limit, waits[limit])
        client.requests.add(-1)
        client.tokens.add(-tokens)
        client.streams += 1
        return Ticket(tokens, client)

    def forget_idle(self) -> None:
        """Drop keys with full buckets and no open stream; a fresh entry would start full, so nothing is lost."""
        self._swept = self.clock()
        self._clients = {key: client for key, client in self._clients.items()
                         if client.streams or not (client.requests.full() and client.tokens.full())}


@dataclass
class ApiKeys:
    """The API keys this server accepts; with none configured, anyone may call it."""

    keys: set[str] = field(repr=False)

    @classmethod
    def load(cls, keys: list[str], file: Path | None = None) -> "ApiKeys":
        """Keys given directly plus one per line of file, skipping blank lines and lines starting with '#'."""
        found = [key.strip() for key in keys]
        if file is not None:
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise AuthError(f"cannot read API key file {file}: {e}") from e
            found += [line.strip() for line in lines if not line.strip().startswith("#")]
        return cls({key for key in found if key})

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: str | None) -> str | None:
        """The bearer key from an Authorization header value, or None when keys are optional and none was sent."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else ""
        if not self.required:
            return key or None
        if scheme and scheme.lower() != "bearer":
            raise AuthError("Authorization header must use the Bearer scheme")
        if not key:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        # A list, not a generator, so every key is compared and timing does not reveal which one matched.
        if not any([hmac.compare_digest(key.encode(), known.encode()) for known in self.keys]):
            raise AuthError("unknown API key")
        return key
