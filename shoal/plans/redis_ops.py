"""The Redis operators: sources of candidates (seed 004's viewer, follow, recommendation, media).

Each makes at most two round trips whatever the row count: one pipeline of LRANGEs, then one of
HGETALLs to hydrate users, so a plan's wall time is its round trips on the critical path.
"""

from shoal.plans.context import Context
from shoal.plans.rowset import Batch, RowSet


async def viewer(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    uid = ctx.request.user_id
    user = await ctx.services.redis(params["endpoint"], lambda r: r.hgetall(f"user:{uid}"))
    return RowSet(Batch.build([uid], strings={"country": [user.get("country")]}))


async def follow(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    return await _users(ctx, params, rows[0], "follow")


async def recommendation(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    return await _users(ctx, params, rows[0], "recommendation")


async def media(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    return RowSet(Batch.build(await _lists(ctx, params, rows[0], "media")))


async def _users(ctx: Context, params: dict, rows: RowSet, relation: str) -> RowSet:
    ids = await _lists(ctx, params, rows, relation)

    async def hydrate(r) -> list[dict]:
        pipe = r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(f"user:{i}")
        return await pipe.execute()

    users = await ctx.services.redis(params["endpoint"], hydrate) if ids else []
    return RowSet(Batch.build(ids, strings={"country": [u.get("country") for u in users]}))


async def _lists(ctx: Context, params: dict, rows: RowSet, prefix: str) -> list[int]:
    """The ids listed under prefix:{id} for every active row, fanout at most each, in row order."""
    keys = [f"{prefix}:{i}" for i in rows.batch.ids[rows.active()].tolist()]
    fanout = params.get("fanout", 100)

    async def lranges(r) -> list[list[str]]:
        pipe = r.pipeline(transaction=False)
        for key in keys:
            pipe.lrange(key, 0, fanout - 1)
        return await pipe.execute()

    lists = await ctx.services.redis(params["endpoint"], lranges) if keys else []
    return [int(x) for found in lists for x in found]
