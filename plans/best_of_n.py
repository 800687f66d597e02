"""best-of-n: the request's prompt generated four times, the generation with the highest log
probability per token returned (OpenAI's best_of, as one plan)."""

from shoal.plans import Key, define_plan


def build(ctx):
    return (ctx.request()
            .generate(samples=4, params={"max_tokens": 48, "temperature": 0.8})
            .score(out_key=Key.score)
            .sort(key=Key.score, order="desc")
            .take(count=1))


plan = define_plan(name="best_of_n", build=build)
