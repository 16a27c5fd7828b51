"""Continuous batching: requests join and leave a running batch at token boundaries, and a request's
output never depends on which other requests shared its batch."""

import json

import jsonschema
import pytest
import torch

from conftest import tiny_engine
from memlm.cache.eviction import kv_record
from memlm.cache.policies import make_policy
from memlm.errors import InvalidRequestError, QueueFullError
from memlm.generation.params import SamplingParams
from memlm.latent.hook import latent_record

GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def _alone(prompt, params, **options):
    """What a fresh engine gives for this request with nothing beside it."""
    return tiny_engine().generate(prompt, params, **options)


def _run(engine, requests):
    while engine.has_unfinished:
        engine.step()
    return [r.completion() for r in requests]


def test_requests_joining_mid_batch_equal_each_alone():
    engine = tiny_engine()
    sampled = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    first = engine.add_request("the first prompt", GREEDY)
    for _ in range(5):
        engine.step()
    second = engine.add_request("and a second, longer prompt joins later", sampled)
    engine.step()
    assert engine.num_running == 2  # the second prompt was prefilled beside the first's decode step
    third = engine.add_request("x", GREEDY)
    a, b, c = _run(engine, [first, second, third])
    assert a.token_ids == _alone("the first prompt", GREEDY).token_ids
    assert b.token_ids == _alone("and a second, longer prompt joins later", sampled).token_ids
    assert c.token_ids == _alone("x", GREEDY).token_ids
    assert engine.num_running == 0 and engine._batch is None  # an idle engine holds no cache


def test_finished_rows_leave_at_once_and_free_their_slot():
    engine = tiny_engine()
    engine.scheduler.max_batch = 2
    short = engine.add_request("a", SamplingParams(max_new_tokens=3, ignore_eos=True))
    long = engine.add_request("b", GREEDY)
    waiting = engine.add_request("c", GREEDY)
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 1)
    engine.step(), engine.step()  # the short one finishes here
    assert short.finished and engine.num_running == 1
    engine.step()  # ... and the waiting one takes its row
    assert (engine.num_running, engine.num_waiting) == (2, 0)
    _run(engine, [long, waiting])
    assert waiting.completion().token_ids == _alone("c", GREEDY).token_ids


def test_abort_frees_the_row_and_leaves_the_others_unchanged():
    engine = tiny_engine()
    keep = engine.add_request("keep going", GREEDY)
    gone = engine.add_request("stop me", GREEDY)
    queued = engine.add_request("never started", GREEDY)
    engine.scheduler.max_batch = 2
    for _ in range(4):
        engine.step()
    assert engine.abort(gone.id) and engine.num_running == 1
    assert gone.finish_reason == "abort" and len(gone.output_ids) == 4
    assert engine.num_waiting == 1 and engine.abort(queued.id)  # a waiting request leaves the queue
    assert queued.finish_reason == "abort" and engine.num_waiting == 0 and not queued.output_ids
    assert not engine.abort("no-such-request")
    (done,) = _run(engine, [keep])
    assert done.token_ids == _alone("keep going", GREEDY).token_ids


def test_aborting_a_row_in_the_middle_moves_the_rows_after_it():
    """Rows after an aborted one move up in the cache (the rows before it stay put); nothing else changes."""
    engine = tiny_engine()
    prompts = ["first row", "the second, to be aborted", "third", "and a fourth one"]
    requests = [engine.add_request(p, GREEDY) for p in prompts]
    for _ in range(5):
        engine.step()
    engine.abort(requests[1].id)  # from outside any inference-mode block, as the server's worker does
    joining = engine.add_request("joins after the abort", GREEDY)
    done = _run(engine, [requests[0], requests[2], requests[3], joining])
    for prompt, got in zip([prompts[0], prompts[2], prompts[3], "joins after the abort"], done, strict=True):
        assert got.token_ids == _alone(prompt, GREEDY).token_ids


def test_the_waiting_queue_is_bounded():
    engine = tiny_engine()
    engine.scheduler.max_queue = 2
    engine.add_request("one"), engine.add_request("two")
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.add_request("three")
    engine.step()  # both join the batch: the queue has room again
    engine.add_request("three")
    with pytest.raises(InvalidRequestError):
        engine.add_request("")


def test_memory_options_change_only_their_own_request():
    """A KV budget and a latent memory on one request of the batch; the neighbours are unaffected."""
    from test_latent import _memory

    engine = tiny_engine()
    memory = _memory(engine, max_inference_aug=3)
    prompts = ["plain, with no options.", "b: a, b.", "remembering: x, y. z"]
    window = make_policy("window", 12)
    plain = engine.add_request(prompts[0], GREEDY)
    for _ in range(3):
        engine.step()
    budgeted = engine.add_request(prompts[1], GREEDY, kv_policy=window)
    engine.step()
    remembering = engine.add_request(prompts[2], GREEDY, memory=memory)
    got = _run(engine, [plain, budgeted, remembering])

    reference = tiny_engine()
    ref_memory = _memory(reference, max_inference_aug=3)
    assert got[0].token_ids == reference.generate(prompts[0], GREEDY).token_ids
    alone = reference.generate(prompts[1], GREEDY, kv_policy=make_policy("window", 12))
    assert got[1].token_ids == alone.token_ids and got[1].peak_kv_tokens <= 13
    assert kv_record(budgeted).evicted_positions and got[0].peak_kv_tokens == len(plain.prompt_ids) + 23
    alone = reference.generate(prompts[2], GREEDY, memory=ref_memory)
    assert got[2].token_ids == alone.token_ids and got[2].insertions == alone.insertions
    assert got[2].insertions[0] == 0 and latent_record(plain) is None and got[0].insertions is None


def test_lcm_rows_join_mid_batch_too():
    from test_lcm_model import engine_for, prompt, tiny_lcm

    engine, reference = engine_for(tiny_lcm()), engine_for(tiny_lcm())
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    first = engine.add_request(prompt(1, 2, 3), params)
    engine.step(), engine.step()
    second = engine.add_request(prompt(4, 5, 6, 7, 8), params)
    a, b = _run(engine, [first, second])
    assert a.token_ids == reference.generate(prompt(1, 2, 3), params).token_ids
    assert b.token_ids == reference.generate(prompt(4, 5, 6, 7, 8), params).token_ids
    assert len(b.memory_trace) == 10


def test_logprobs_are_the_model_distribution():
    engine = tiny_engine()
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3, temperature=0.8, seed=3)
    out = engine.generate("score me", params)
    ids = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        logits = engine.model.logits(engine.model.forward_tokens(torch.tensor([ids]), torch.arange(len(ids))[None]))
    reference = torch.log_softmax(logits[0], -1)[len(out.prompt_token_ids) - 1 : -1]
    expected = reference.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-4, rtol=0)
    for k, top in enumerate(out.top_logprobs):
        assert [t for t, _ in top] == reference[k].topk(3).indices.tolist()
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_presence_and_frequency_penalties_follow_openai():
    """logit - frequency * count - presence * (count > 0), over generated tokens only."""
    engine = tiny_engine()
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, presence_penalty=0.7, frequency_penalty=0.4)
    out = engine.generate("aaaa", params)
    ids, counts = list(out.prompt_token_ids), torch.zeros(engine.config.vocab_size)
    for token in out.token_ids:
        with torch.no_grad():
            hidden = engine.model.forward_tokens(torch.tensor([ids]), torch.arange(len(ids))[None])
            logits = engine.model.logits(hidden)[0, -1]
        assert int((logits - 0.4 * counts - 0.7 * (counts > 0).float()).argmax()) == token
        ids.append(token)
        counts[token] += 1
    assert out.token_ids != engine.generate("aaaa", GREEDY).token_ids[:12]  # the penalties did something


SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"],
     "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"enum": [1, 2, "three", None]},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_structured_output_parses_and_validates(schema):
    engine = tiny_engine()
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    for seed in range(4):
        params = SamplingParams(max_new_tokens=120, temperature=1.0, seed=seed, response_format=fmt)
        out = engine.generate("answer in JSON:", params)
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_json_object_mode_and_invalid_schemas():
    engine = tiny_engine()
    out = engine.generate("{", SamplingParams(max_new_tokens=200, temperature=1.0, seed=1,
                                               response_format={"type": "json_object"}))
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    assert out.text.startswith("{")
    for bad in (
        {"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}},
        {"type": "json_schema", "json_schema": "not an object"},
        {"type": "xml"},
    ):
        with pytest.raises(InvalidRequestError):
            engine.generate("x", SamplingParams(response_format=bad))
