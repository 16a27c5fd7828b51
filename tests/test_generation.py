"""The Engine: greedy parity with transformers, batching, stopping, streaming."""

import pytest
import torch

from conftest import byte_tokenizer, hf_engine_pair, hf_greedy, tiny_engine
from memlm.errors import InvalidRequestError
from memlm.generation.detokenizer import IncrementalDetokenizer, StopMatcher
from memlm.generation.params import SamplingParams


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_matches_transformers_single_and_batched(arch):
    hf, engine = hf_engine_pair(arch, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    params = SamplingParams(max_new_tokens=24, min_new_tokens=24)
    for p in prompts:
        assert engine.generate_tokens([p], params)[0].token_ids == hf_greedy(hf, [p], 24)[0]
    batched = [c.token_ids for c in engine.generate_tokens(prompts, params)]
    assert batched == hf_greedy(hf, prompts, 24)


def test_batched_equals_one_by_one_with_mixed_params_and_early_finish():
    engine = tiny_engine()
    prompts = ["hello there", "a", "the quick brown fox jumps"]
    params = [
        SamplingParams(max_new_tokens=3),
        SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=3),
        SamplingParams(max_new_tokens=12, temperature=1.2, top_k=20, seed=11, repetition_penalty=1.2),
    ]
    batched = engine.generate(prompts, params)
    for prompt, p, got in zip(prompts, params, batched, strict=True):
        alone = engine.generate(prompt, p)
        assert got.token_ids == alone.token_ids and got.text == alone.text
    assert [len(c.token_ids) for c in batched] == [3, 20, 12]
    assert all(c.finish_reason == "length" for c in batched)


def test_eos_and_stop_strings_finish_each_sequence():
    engine = tiny_engine()
    free = engine.generate("abc", SamplingParams(max_new_tokens=40, ignore_eos=True))
    # Pick a stop string from the free-running output, then check generation ends right before it.
    stop = free.text[10:13]
    assert len(stop) == 3
    stopped = engine.generate("abc", SamplingParams(max_new_tokens=40, stop=[stop], ignore_eos=True))
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == free.text[: free.text.index(stop)]
    # A stop token id ends at that token, which stays in token_ids but not in the text.
    token = free.token_ids[4]
    first = free.token_ids.index(token)
    by_token = engine.generate("abc", SamplingParams(max_new_tokens=40, stop_token_ids=[token], ignore_eos=True))
    assert by_token.token_ids == free.token_ids[: first + 1] and by_token.stop_reason == token


def test_eos_token_finishes_with_stop_unless_min_new_tokens():
    engine = tiny_engine()
    logits = engine.model.logits
    boost = torch.zeros(257)
    boost[256] = 100.0
    engine.model.logits = lambda hidden: logits(hidden) + boost  # <eos> (id 256) always wins
    c = engine.generate("xyz", SamplingParams(max_new_tokens=10))
    assert c.token_ids == [256] and c.finish_reason == "stop" and c.stop_reason == 256 and c.text == ""
    c = engine.generate("xyz", SamplingParams(max_new_tokens=10, min_new_tokens=4))
    assert len(c.token_ids) == 5 and 256 not in c.token_ids[:4] and c.token_ids[4] == 256


def test_stream_concatenates_to_generate_and_never_shows_stop_string():
    engine = tiny_engine(seed=2)
    prompts = ["one", "two two"]
    free = engine.generate(prompts, SamplingParams(max_new_tokens=30, ignore_eos=True))
    stop = free[1].text[8:11]
    params = [SamplingParams(max_new_tokens=30, ignore_eos=True), SamplingParams(max_new_tokens=30, stop=[stop])]
    expected = engine.generate(prompts, params)
    pieces = {0: [], 1: []}
    finishes = {}
    for delta in engine.stream(prompts, params):
        pieces[delta.index].append(delta.text)
        if delta.finish_reason:
            finishes[delta.index] = delta.finish_reason
    for i in (0, 1):
        assert "".join(pieces[i]) == expected[i].text
        assert finishes[i] == expected[i].finish_reason
    assert stop not in "".join(pieces[1])


def test_detokenizer_never_splits_a_character():
    tok = byte_tokenizer()
    text = "naïve café — 日本語 🙂!"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # one token per byte: characters span tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["</answer>", "STOP"])
    assert m.safe_length("the answer is 4 </ans") == len("the answer is 4 ")
    assert m.safe_length("plain text") == len("plain text")
    assert m.find("abc STOP def", new_from=5) == (4, "STOP")
    assert m.find("abc", new_from=0) is None


def test_chat_prompts_use_the_template():
    engine = tiny_engine()
    chat = [{"role": "user", "content": "hi"}]
    assert engine.encode_prompt(chat) == engine.tokenizer.encode("<user>hi\n<assistant>")
    assert isinstance(engine.generate(chat, SamplingParams(max_new_tokens=2)).text, str)
    assert len(engine.generate([chat, "raw"], SamplingParams(max_new_tokens=2))) == 2


@pytest.mark.parametrize("bad", ["", "   ", [], [{"role": "user"}], 42])
def test_bad_prompts_are_rejected(bad):
    with pytest.raises(InvalidRequestError):
        tiny_engine().generate(bad)


def test_max_new_tokens_is_capped_by_context():
    engine = tiny_engine(max_position_embeddings=40)
    c = engine.generate("x" * 30, SamplingParams(max_new_tokens=100, ignore_eos=True))
    assert len(c.token_ids) == 10 and c.finish_reason == "length"
    with pytest.raises(InvalidRequestError):
        engine.generate("x" * 45)


def test_repetition_penalty_generation_matches_transformers():
    hf, engine = hf_engine_pair(tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (6, 11)]
    params = SamplingParams(max_new_tokens=20, min_new_tokens=20, repetition_penalty=1.5)
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=20,
        min_new_tokens=20,
        pad_token_id=0,
        repetition_penalty=1.5,
    )
    # transformers penalises the padding token too (it is in input_ids): compare rows without padding effects
    # by checking the longest prompt, whose row has no padding.
    assert engine.generate_tokens([prompts[1]], params)[0].token_ids == out[1, longest:].tolist()
    plain = [c.token_ids for c in engine.generate_tokens(prompts, SamplingParams(max_new_tokens=20, min_new_tokens=20))]
    assert plain[1] != out[1, longest:].tolist()  # the penalty changed the output
