"""The engine's GPU path: decode steps replayed as CUDA graphs, plain requests sampled together on the GPU.
CI has no GPU: these run where one is (the device machine), and say so when skipped."""

import pytest
import torch
from engine_helpers import GREEDY, QUESTIONS, alone, chat, run, together

from shoal.engine import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def test_decode_steps_replayed_as_cuda_graphs_give_the_eager_tokens(make_engine):
    graphs, eager = make_engine(n_seq_max=16, dtype="float32"), make_engine(n_seq_max=16, dtype="float32",
                                                                           cuda_graphs=False)
    prompts = [chat(q) for q in QUESTIONS]
    replayed = run(together(graphs, prompts, GREEDY))
    assert [ids for _, ids, _ in replayed] == [ids for _, ids, _ in run(together(eager, prompts, GREEDY))]
    assert [ids for _, ids, _ in replayed] == [ids for _, ids, _ in run(alone(graphs, prompts, GREEDY))]
    assert graphs.runner.graphs.graphs and eager.runner.graphs is None
    assert replayed[0][0] == "12 + 30 = 42"


def test_seeded_requests_sampled_together_on_the_gpu_match_each_alone(make_engine):
    engine = make_engine(n_seq_max=16, dtype="float32")
    prompts = [chat(q) for q in QUESTIONS[:8]]
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=24, ignore_eos=True) for i in range(8)]
    solo = [run(alone(engine, [p], sp))[0] for p, sp in zip(prompts, params, strict=True)]
    batched = run(together(engine, prompts, params))
    assert [ids for _, ids, _ in batched] == [ids for _, ids, _ in solo]
    assert len({tuple(ids) for _, ids, _ in solo}) > 1


def test_a_cached_prompts_few_new_tokens_run_as_graph_rows_and_match_eager(make_engine):
    graphs, eager = make_engine(dtype="float32"), make_engine(dtype="float32", cuda_graphs=False)
    prefix = graphs.tokenizer.encode("Once upon a time, by a grey and windy sea, there lived an old fisher who "
                                     "mended his nets every morning and sang to the gulls")
    prompts = [prefix, *([*prefix, t] for t in (3, 11, 12)), [*prefix, 40, 41, 42, 43, 44, 45]]
    rows, replay = [], graphs.runner.graphs.forward
    graphs.runner.graphs.forward = lambda ids, *rest: rows.append(len(ids)) or replay(ids, *rest)

    def replies(engine):
        return [run(alone(engine, [p], GREEDY))[0] for p in prompts]

    replayed, plain = replies(graphs), replies(eager)
    assert [ids for _, ids, _ in replayed] == [ids for _, ids, _ in plain]
    assert all(stats.cache_delta["read"] >= 48 for _, _, stats in replayed[1:]), [s for _, _, s in replayed]
    assert max(rows) > 1  # one request's prefill chunk ran as rows of a graph
