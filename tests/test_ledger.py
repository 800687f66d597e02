"""The kudos ledger on SQLite: hashed keys and tokens, transfers, each job paid once, every kudo accounted for."""

import pytest
from sqlalchemy import text

from shoal.store.ledger import ANONYMOUS_KEY, Ledger, job_reward


@pytest.fixture
def ledger(tmp_path):
    return Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")


def test_users_keys_and_tokens_are_stored_hashed(ledger, tmp_path):
    key = ledger.create_user("alice")
    token = ledger.create_worker_token("rig-1", owner="alice")
    assert ledger.account(key).name == "alice" and ledger.account(ANONYMOUS_KEY).id == 0
    assert ledger.account(None).name == "Anonymous" and ledger.account("nope") is None
    assert ledger.worker_owner(token).name == "alice" and ledger.worker_owner("nope") is None
    with ledger.engine.connect() as c:
        stored = " ".join(str(row) for table in ("users", "worker_tokens")
                          for row in c.execute(text(f"select * from {table}")))
    assert key not in stored and token not in stored
    with pytest.raises(ValueError, match="already exists"):
        ledger.create_user("alice")
    with pytest.raises(ValueError, match="already has a token"):
        ledger.create_worker_token("rig-1")


def test_transfers_balance_and_a_job_is_paid_once(ledger):
    ledger.create_user("bob")
    token = ledger.create_worker_token("rig-2")
    owner = ledger.worker_owner(token)
    assert ledger.transfer(owner.id, 12.5, "reward", job="j1", worker="rig-2")
    assert not ledger.transfer(owner.id, 12.5, "reward", job="j1", worker="rig-2")
    ledger.transfer(owner.id, -2.5, "charge")
    assert ledger.worker_owner(token).kudos == 10.0 and ledger.balanced()


def test_job_reward_follows_the_horde_formula():
    # 13B, 200 tokens, a prompt long enough that the context estimate is 200 tokens: about 28.2 kudos
    assert job_reward(200, 13, prompt_chars=800) == pytest.approx(28.2, abs=0.1)
    assert job_reward(100, 0.5) < job_reward(100, 7) < job_reward(100, 70)


def test_a_route_job_pays_each_stage_by_its_share_of_the_layers(ledger):
    from shoal.api.app import Server
    from shoal.coordinator.coordinator import Coordinator
    from shoal.coordinator.jobs import Job
    from shoal.coordinator.workers import WorkerConn

    asker = ledger.create_user("asker")
    asker_id = ledger.account(asker).id
    ledger.transfer(asker_id, 1000.0, "grant")
    server = Server(Coordinator(), ledger=ledger)
    stages = [(WorkerConn(name, name, None, {"big": {"params_b": 10.0}}, 4,
                          owner_id=ledger.worker_owner(ledger.create_worker_token(name, f"owner-{name}")).id), share)
              for name, share in (("a", 0.25), ("b", 0.5), ("c", 0.25))]
    job = Job("j1", "big", "hi", {}, user_id=asker_id)
    done = {"finish_reason": "length", "stats": {"completion_tokens": 100, "prompt_tokens": 10}}
    server.settle(job, stages, done)
    server.settle(job, stages, done)  # a second report of the same job pays nothing more
    with ledger.engine.connect() as c:
        rewards = dict(c.execute(text("select worker, amount from transfers where reason='reward'")).all())
    total = job_reward(100, 30.0, 40)  # the route's stages hold 3 x 10 B parameters
    assert rewards == {"a": round(total / 4, 2), "b": round(total / 2, 2), "c": round(total / 4, 2)}
    assert job.reward == pytest.approx(sum(rewards.values()))
    assert ledger.account(asker).kudos == pytest.approx(1000 - job.reward - 1) and ledger.balanced()
