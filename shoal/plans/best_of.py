"""best-of-n as a plan: the request's prompt generated `samples` times, scored, the best `n` kept."""

from shoal.plans.dsl import build, define_plan
from shoal.plans.expr import Key


def best_of(samples: int, n: int, params: dict, model: str | None = None) -> dict:
    """The artifact; params are the generations' sampling params (seeded ones get seed + sample)."""
    named = {"model": model} if model else {}

    def plan(ctx):
        return (ctx.request().generate(samples=samples, params=params, **named)
                .score(out_key=Key.score).sort(key=Key.score, order="desc").take(count=n))

    return build(define_plan("best_of", plan))
