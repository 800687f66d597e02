"""The kudos ledger: users and their hashed API keys, worker tokens, balances, and every transfer.

SQL through SQLAlchemy: an SQLite file by default, any SQLAlchemy URL (PostgreSQL included) works.
A balance only ever changes together with a row in `transfers`, in one database transaction, so
the sum of the transfers always equals the sum of the balances.
"""

import hashlib
import math
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import ForeignKey, String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

ANONYMOUS_KEY = "0000000000"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    key_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    kudos: Mapped[float] = mapped_column(default=0.0)
    created: Mapped[float] = mapped_column(default=time.time)


class WorkerToken(Base):
    __tablename__ = "worker_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    worker: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))


class Transfer(Base):
    __tablename__ = "transfers"
    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[float] = mapped_column(default=time.time)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    amount: Mapped[float]
    reason: Mapped[str] = mapped_column(String(32))
    job: Mapped[str | None] = mapped_column(String(64), unique=True)  # a job is paid once, ever
    worker: Mapped[str | None] = mapped_column(String(64))


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    kudos: float


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def job_reward(tokens: int, params_b: float | None, prompt_chars: int = 0) -> float:
    """Kudos for generating `tokens` on a model of `params_b` billion parameters (None: unknown), as the AI
    Horde computes it."""
    ctx = max(20, math.ceil(prompt_chars / 4))
    ctx_mult = min(30.0, max(0.1, 1.2 + 2.2 ** math.log2(ctx / 1024)))
    if params_b is None:
        return round(tokens * ctx_mult * 0.027, 2)
    return round(tokens * (max(params_b, 13) / 13) ** 0.2 * params_b / 125 * ctx_mult, 2)


def upfront_kudos(max_length: int, params_b: float | None, n: int) -> float:
    """What a large request must hold in advance, as the Horde reckons it (20 a job for an unknown model)."""
    return 20.0 * n if params_b is None else round(max_length * params_b / 21, 2) * n


class Ledger:
    def __init__(self, url: str = "sqlite:///shoal.db"):
        self.engine = create_engine(url)
        Base.metadata.create_all(self.engine)
        with Session(self.engine) as s, s.begin():
            if s.get(User, 0) is None:
                s.add(User(id=0, name="Anonymous", key_hash=digest(ANONYMOUS_KEY)))

    def create_user(self, name: str) -> str:
        """A new user; returns its API key, which is stored only hashed."""
        key = secrets.token_urlsafe(16)
        with Session(self.engine) as s, s.begin():
            if s.scalar(select(User).where(User.name == name)) is not None:
                raise ValueError(f"user {name!r} already exists")
            s.add(User(name=name, key_hash=digest(key)))
        return key

    def account(self, key: str | None) -> Account | None:
        """The user an API key belongs to (the anonymous key is user 0); None for an unknown key."""
        with Session(self.engine) as s:
            user = s.scalar(select(User).where(User.key_hash == digest(key or ANONYMOUS_KEY)))
            return None if user is None else Account(user.id, user.name, user.kudos)

    def create_worker_token(self, worker: str, owner: str | None = None) -> str:
        """A token for worker `worker`, owned by user `owner` (created if new; default: named as the worker)."""
        token = secrets.token_urlsafe(24)
        owner = owner or worker
        with Session(self.engine) as s, s.begin():
            if s.scalar(select(WorkerToken).where(WorkerToken.worker == worker)) is not None:
                raise ValueError(f"worker {worker!r} already has a token")
            user = s.scalar(select(User).where(User.name == owner))
            if user is None:
                user = User(name=owner, key_hash=None)
                s.add(user)
                s.flush()
            s.add(WorkerToken(worker=worker, token_hash=digest(token), owner_id=user.id))
        return token

    def worker_owner(self, token: str) -> Account | None:
        with Session(self.engine) as s:
            row = s.scalar(select(WorkerToken).where(WorkerToken.token_hash == digest(token)))
            user = None if row is None else s.get(User, row.owner_id)
            return None if user is None else Account(user.id, user.name, user.kudos)

    def transfer(self, user_id: int, amount: float, reason: str, job: str | None = None,
                 worker: str | None = None) -> bool:
        """Move kudos to (or, negative, from) a user; False if that job was already paid."""
        with Session(self.engine) as s, s.begin():
            if job is not None and s.scalar(select(Transfer).where(Transfer.job == job)) is not None:
                return False
            user = s.get(User, user_id)
            if user is None:
                raise ValueError(f"no user {user_id}")
            user.kudos += amount
            s.add(Transfer(user_id=user_id, amount=amount, reason=reason, job=job, worker=worker))
        return True

    def balanced(self) -> bool:
        """Every kudo accounted for: the transfers add up to the balances."""
        with Session(self.engine) as s:
            transfers = s.scalar(select(func.coalesce(func.sum(Transfer.amount), 0.0)))
            balances = s.scalar(select(func.coalesce(func.sum(User.kudos), 0.0)))
            return math.isclose(transfers, balances, abs_tol=1e-6)
