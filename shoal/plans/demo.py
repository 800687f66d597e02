"""The demo data plans/complex_dag.py runs on (`shoal plan seed-demo`): user 123 follows four
users and is recommended four others, each with a few media items."""

import redis.asyncio as aioredis

VIEWER = 123
FOLLOWS = [101, 102, 103, 104]
RECOMMENDED = [201, 202, 203, 204]
COUNTRIES = ["US", "CA", "GB", "DE"]


def media(user: int) -> list[int]:
    return [user * 10 + k for k in range(1, 3)]


def records() -> dict[str, dict | list]:
    """Every key the demo writes: user hashes, follow/recommendation lists, media lists."""
    data: dict[str, dict | list] = {f"user:{VIEWER}": {"country": "US"}, f"follow:{VIEWER}": FOLLOWS,
                                    f"recommendation:{VIEWER}": RECOMMENDED}
    for i, user in enumerate(FOLLOWS + RECOMMENDED):
        data[f"user:{user}"] = {"country": COUNTRIES[i % len(COUNTRIES)]}
        data[f"media:{user}"] = media(user)
    return data


async def seed(url: str) -> int:
    """Write the demo keys (replacing what they held); returns how many."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        pipe = client.pipeline(transaction=True)
        for key, value in records().items():
            pipe.delete(key)
            if isinstance(value, dict):
                pipe.hset(key, mapping=value)
            else:
                pipe.rpush(key, *value)
        await pipe.execute()
    finally:
        await client.aclose()
    return len(records())
