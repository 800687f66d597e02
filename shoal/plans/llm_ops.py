"""The LLM operators: `generate` runs a prompt per row through the coordinator's queue, `score` ranks
the generations, so best-of-n is one plan: request → generate(samples=n) → score → sort → take."""

import asyncio
import string

import numpy as np

from shoal.plans.context import Context
from shoal.plans.registry import PlanError
from shoal.plans.rowset import Batch, Column, RowSet


async def generate(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    """`samples` generations for each active row, one output row each (the input row's id), with text,
    logprob (mean per token), completion_tokens, prompt_tokens and finish_reason."""
    if ctx.generate is None:
        raise PlanError("generate: this plan runs where no model is served")
    source, samples, template = rows[0], params["samples"], params.get("template")
    prompts = [_fill(template, r) for r in source.records()] if template else [ctx.request.prompt] * len(source)
    if any(p is None for p in prompts):
        raise PlanError("generate: give a template, or send a prompt with the request")
    seed = params["params"].get("seed")
    calls = [ctx.generate(params.get("model"), prompt, {**params["params"], "seed": None if seed is None
                                                        else seed + i * samples + k})
             for i, prompt in enumerate(prompts) for k in range(samples)]
    outs = await asyncio.gather(*calls)
    ids = np.repeat(source.batch.ids[source.active()], samples).tolist()
    return RowSet(Batch.build(ids, floats={k: [o[k] for o in outs] for k in ("logprob", "completion_tokens",
                                                                             "prompt_tokens")},
                              strings={k: [o[k] for o in outs] for k in ("text", "finish_reason")}))


def _fill(template: str, record: dict) -> str:
    """The template with {field} replaced by the row's values; only plain field names, so a template can
    never reach into attributes or items."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    if bad := [f for f in fields if not f.isidentifier()]:
        raise PlanError(f"generate: template fields are plain names like {{title}}, got {bad}")
    if missing := [f for f in fields if f not in record]:
        raise PlanError(f"generate: the template names {missing}, which row {record['id']} lacks")
    return template.format_map(record)


def score(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    """out_key = the generation's summed logprob / completion_tokens ** length_penalty: at 1 the mean log
    probability per token (OpenAI's best_of), at 0 the whole sequence's."""
    source = rows[0]
    mean, n = source.column("logprob"), source.column("completion_tokens")
    count = np.maximum(n.values.astype(np.float64), 1.0)
    values = mean.values.astype(np.float64) * count ** (1.0 - params["length_penalty"])
    return source.with_column(params["out_key"], Column(values, mean.valid & n.valid))
