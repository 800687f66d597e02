"""The plan registries: keys, params and endpoints, read from the TOML files in `data/` (seed 004)."""

import os
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA = Path(__file__).parent / "data"
TYPES = ("int", "float", "string")


class PlanError(ValueError):
    """A plan, an expression or a request that cannot be compiled or run, with the cause in its message."""


@dataclass(frozen=True)
class KeySpec:
    name: str
    type: str
    writable: bool = True
    doc: str = ""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str
    doc: str = ""


@dataclass(frozen=True)
class Endpoint:
    name: str  # "<kind>.<name>", as EP.<kind>.<name> writes it
    kind: str
    url: str
    max_inflight: int = 64
    connect_timeout_ms: float = 200
    request_timeout_ms: float = 1000


@dataclass(frozen=True)
class Registry:
    keys: dict[str, KeySpec]
    params: dict[str, ParamSpec]
    endpoints: dict[str, dict[str, Endpoint]]  # environment -> endpoint name -> endpoint

    def key(self, name: str) -> KeySpec:
        return _lookup(self.keys, name, "key")

    def param(self, name: str) -> ParamSpec:
        return _lookup(self.params, name, "param")

    def endpoint(self, name: str, env: str | None = None) -> Endpoint:
        env = env or default_env()
        if env not in self.endpoints:
            raise PlanError(f"unknown environment {env!r} (known: {', '.join(sorted(self.endpoints))})")
        return _lookup(self.endpoints[env], name, "endpoint")


def _lookup(table: dict, name: str, what: str):
    if not isinstance(name, str) or name not in table:
        raise PlanError(f"unknown {what} {name!r} (known: {', '.join(sorted(table))})")
    return table[name]


def default_env() -> str:
    return os.environ.get("SHOAL_PLAN_ENV", "dev")


@cache
def load(data: Path = DATA) -> Registry:
    keys = {n: KeySpec(n, **f) for n, f in _read(data / "keys.toml").items()}
    params = {n: ParamSpec(n, **f) for n, f in _read(data / "params.toml").items()}
    for spec in [*keys.values(), *params.values()]:
        if spec.type not in TYPES:
            raise PlanError(f"{spec.name}: type must be one of {TYPES}, got {spec.type!r}")
    endpoints = {env: {f"{kind}.{name}": Endpoint(f"{kind}.{name}", kind, **fields)
                       for kind, named in kinds.items() for name, fields in named.items()}
                 for env, kinds in _read(data / "endpoints.toml").items()}
    names = {env: set(table) for env, table in endpoints.items()}
    if len({frozenset(n) for n in names.values()}) > 1:
        raise PlanError(f"every environment must name the same endpoints, got {names}")
    return Registry(keys, params, endpoints)


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PlanError(f"registry {path}: {e}") from e
