"""OpenAI's best_of: `best_of` generations server-side, the `n` with the highest log probability per
token returned. It runs as a plan (generate → score → sort → take), so the same machinery serves
ranking plans and this."""

import time
import uuid

from fastapi import Request

from shoal.api.errors import APIError
from shoal.api.plans import Generator
from shoal.api.schemas import FINISH, SamplingFields
from shoal.plans.best_of import best_of
from shoal.plans.registry import PlanError
from shoal.plans.scheduler import NodeError


async def complete(request: Request, body: SamplingFields, prompt: object, chat: bool) -> dict:
    server = request.app.state.server
    if body.model not in server.coordinator.catalog.models():
        raise APIError(404, f"model {body.model!r} is not served", "model", "model_not_found")
    ticket = server.admit(request, body.best_of * (len(str(prompt)) // 3 + (body.limit() or 256)))
    user = server.account(request)
    params = {k: v for k, v in body.engine_params(body.limit()).items() if k != "logprobs"}
    generate = Generator(server, user.id, user.kudos, body.model)
    started = time.monotonic()
    try:
        result = await server.plans.run_artifact(best_of(body.best_of, body.n, params), {"prompt": prompt},
                                                 generate=generate)
    except (PlanError, NodeError) as e:
        raise APIError(500, str(e), code="generation_failed") from e
    finally:
        ticket.release(generate.prompt_tokens + generate.completion_tokens)
        server.metrics.e2e.observe(time.monotonic() - started)
    choices = [_choice(i, c, chat) for i, c in enumerate(result["candidates"])]
    usage = {"prompt_tokens": generate.prompt_tokens, "completion_tokens": generate.completion_tokens,
             "total_tokens": generate.prompt_tokens + generate.completion_tokens}
    return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model, "choices": choices, "usage": usage}


def _choice(i: int, row: dict, chat: bool) -> dict:
    reason = FINISH.get(row.get("finish_reason"), "stop")
    if chat:
        return {"index": i, "message": {"role": "assistant", "content": row.get("text", "")}, "logprobs": None,
                "finish_reason": reason}
    return {"index": i, "text": row.get("text", ""), "logprobs": None, "finish_reason": reason}
