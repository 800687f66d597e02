"""Seed 004's example: the viewer's follows and recommendations, each branch's media scored,
merged, best first."""

from shoal.plans import EP, Key, P, coalesce, define_plan


def build(ctx):
    v = ctx.viewer(endpoint=EP.redis.default)
    follows = (v.follow(endpoint=EP.redis.default)
               .media(endpoint=EP.redis.default)
               .vm(out_key=Key.score, expr=Key.id * coalesce(P.weight, 0.1)))
    recs = (v.recommendation(endpoint=EP.redis.default)
            .media(endpoint=EP.redis.default)
            .vm(out_key=Key.score, expr=Key.id * coalesce(P.weight, 0.1)))
    return follows.concat(rhs=recs).sort(key=Key.score, order="desc").take(count=50)


plan = define_plan(name="complex_dag", build=build)
