"""MemGen latent memory: delimiters, cached insertion against a full forward, batching, weight
sharing, checkpoints."""

import json

import pytest
import torch

from conftest import byte_tokenizer, tiny_engine, tiny_memlm
from memlm.adapters.lora import lora_layers
from memlm.errors import InvalidRequestError, MemlmError, ModelFormatError
from memlm.generation.params import SamplingParams
from memlm.latent.delimiters import DelimiterSet
from memlm.latent.memory import LatentMemory
from memlm.latent.trigger import make_trigger


def _memory(engine, seed=0, **options):
    memory = LatentMemory.create(engine, prompt_latents=3, inference_latents=2, lora_rank=4, **options)
    torch.manual_seed(seed)
    with torch.no_grad():  # a trained-looking memory: adapters and projections away from identity
        for _, layer in lora_layers(engine.model):
            layer.lora_b.normal_(std=0.05)
        if memory.weaver.to_reasoner is not None:  # a "kv" weaver has no projection
            memory.weaver.to_reasoner.weight.add_(torch.randn_like(memory.weaver.to_reasoner.weight) * 0.05)
    return memory


def test_delimiters_by_token_id_never_inside_a_number():
    tokenizer = byte_tokenizer()
    delimiters = DelimiterSet.for_tokenizer(tokenizer)

    def points(text):
        ids = tokenizer.encode(text)
        return [tokenizer.decode(ids[: i + 1]) for i in delimiters.in_text(ids)]

    assert points("pi is 3.14 today") == []
    assert points("take 3, 4.") == ["take 3,", "take 3, 4."]
    assert points("one, two.\nthree") == ["one,", "one, two.", "one, two.\n"]
    assert points("cost 1,000 or 2.5") == []
    assert points("version .5 is out") == ["version ."]  # no digit before the point: a boundary


def test_cached_insertion_equals_one_forward_over_prefix_latents_and_continuation():
    engine = tiny_engine()
    memory = _memory(engine, max_inference_aug=2)
    prompt = engine.tokenizer.encode("notes:")
    continuation = engine.tokenizer.encode("a, b. c, d and the rest")
    result = engine.score([prompt], [continuation], memory=memory)[0]
    # After the prompt, after "a," and after "a, b." (then the limit of 2 is reached).
    assert result.insertions == [0, 2, 5]

    model, weaver = engine.model, memory.weaver

    def fresh_latents(ids, kind):  # the weaver reading the whole prefix from scratch
        return weaver.weave(weaver.new_cache(1, 64), [ids], [kind])[0]

    with torch.no_grad():
        parts = [model.embed(torch.tensor(prompt)), fresh_latents(prompt, "prompt")]
        targets = []  # (index in the full sequence predicting it, token)
        length = len(prompt) + 3
        for k, token in enumerate(continuation):
            if k in result.insertions[1:]:
                parts.append(fresh_latents(prompt + continuation[:k], "inference"))
                length += 2
            targets.append((length - 1, token))
            parts.append(model.embed(torch.tensor([token])))
            length += 1
        embeds = torch.cat(parts)[None]
        logits = model.logits(model(embeds, torch.arange(embeds.shape[1])[None]))[0]
    logprobs = torch.log_softmax(logits, -1)
    expected = torch.stack([logprobs[i, t] for i, t in targets])
    torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_batch_where_some_rows_insert_equals_each_row_alone():
    engine = tiny_engine()
    memory = _memory(engine, max_inference_aug=3)
    texts = [("q:", "no delimiters here at all"), ("question, long:", "x, y. z\nw"), ("hm", "1.5 and 2, 3")]
    prompts = [engine.tokenizer.encode(p) for p, _ in texts]
    continuations = [engine.tokenizer.encode(c) for _, c in texts]
    batched = engine.score(prompts, continuations, memory=memory)
    assert batched[0].insertions == [0] and len(batched[1].insertions) == 4  # prompt + 3 (the limit)
    for p, c, b in zip(prompts, continuations, batched, strict=True):
        alone = engine.score([p], [c], memory=memory)[0]
        assert alone.insertions == b.insertions
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
    # Free generation takes the same path: batched equals alone, and latents never reach the text.
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    out = engine.generate_tokens(prompts, params, memory=memory)
    for p, o in zip(prompts, out, strict=True):
        alone = engine.generate_tokens([p], params, memory=memory)[0]
        assert alone.token_ids == o.token_ids and alone.insertions == o.insertions
        assert len(o.token_ids) == 24


def test_weaver_shares_the_reasoner_weights_and_leaves_the_reasoner_unchanged():
    engine = tiny_engine()
    prompt = engine.tokenizer.encode("hello")
    before = engine.score([prompt], [engine.tokenizer.encode(" world")])[0].logprobs
    memory = _memory(engine)
    for _, layer in lora_layers(engine.model):
        assert layer.base.weight.data_ptr() == layer.weight.data_ptr()
        assert not layer.enabled  # the engine sees the plain reasoner
    assert engine.score([prompt], [engine.tokenizer.encode(" world")])[0].logprobs == before
    weaver_tensors = sum(p.numel() for p in memory.state_dict().values())
    assert weaver_tensors < sum(p.numel() for p in engine.model.parameters())
    assert not any(k.startswith("reasoner") for k in memory.weaver.state_dict())


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    engine = tiny_engine()
    memory = _memory(engine, trigger="learned")
    memory.save(tmp_path / "mem", dtype=None)  # exact
    memory.save(tmp_path / "mem16")  # the default: bf16, half the size
    prompt, continuation = engine.tokenizer.encode("a, b."), engine.tokenizer.encode(" c, d.")
    expected = engine.score([prompt], [continuation], memory=memory)[0]

    other = tiny_engine()  # the same base weights, fresh adapters
    loaded = LatentMemory.load(tmp_path / "mem", other)
    got = other.score([prompt], [continuation], memory=loaded)[0]
    assert got.insertions == expected.insertions and got.logprobs == expected.logprobs
    size = (tmp_path / "mem" / "latent_memory.safetensors").stat().st_size
    assert (tmp_path / "mem16" / "latent_memory.safetensors").stat().st_size < 0.55 * size
    other = tiny_engine()
    got16 = other.score([prompt], [continuation], memory=LatentMemory.load(tmp_path / "mem16", other))[0]
    assert got16.logprobs == pytest.approx(expected.logprobs, abs=0.05)

    # One folder serves every trigger: `always` ignores the saved head; `learned` needs one.
    other = tiny_engine()
    always = LatentMemory.load(tmp_path / "mem", other, trigger="always")
    assert always.config["trigger"] == "always" and always.trigger.kind == "always"
    delimiters = sum(engine.tokenizer.decode([t]) in ",." for t in continuation[:-1])
    assert len(other.score([prompt], [continuation], memory=always)[0].insertions) == 1 + delimiters
    _memory(tiny_engine()).save(tmp_path / "plain")
    with pytest.raises(ModelFormatError, match="no learned trigger"):
        LatentMemory.load(tmp_path / "plain", tiny_engine(), trigger="learned")
    with pytest.raises(InvalidRequestError, match="unknown trigger"):
        LatentMemory.load(tmp_path / "plain", tiny_engine(), trigger="sometimes")

    with pytest.raises(ModelFormatError, match="not a latent memory checkpoint"):
        LatentMemory.load(tmp_path / "nothing", tiny_engine())
    renamed = tiny_engine()
    renamed.name = "another-model"
    with pytest.raises(ModelFormatError, match="trained on 'tiny', not 'another-model'"):
        LatentMemory.load(tmp_path / "mem", renamed)
    config = json.loads((tmp_path / "mem" / "latent_memory.json").read_text())
    (tmp_path / "mem" / "latent_memory.json").write_text(json.dumps({**config, "inference_latents": 5}))
    with pytest.raises(ModelFormatError, match="shape"):
        LatentMemory.load(tmp_path / "mem", tiny_engine())
    del config["lora_rank"]
    (tmp_path / "mem" / "latent_memory.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="not a valid latent memory config"):
        LatentMemory.load(tmp_path / "mem", tiny_engine())
    with pytest.raises(InvalidRequestError, match="unknown trigger"):
        make_trigger("sometimes", 64)


def _twin_equals_engine(engine, memory):
    """The segment-by-segment twin of a weaver that reads the reasoner's states gives the engine's
    log-probabilities, for a batch of examples with different insertion points as for each alone;
    -> (the twin, the examples) for a backward pass."""
    from memlm.latent.training import LatentLM, make_example

    tok = engine.tokenizer
    pairs = [("notes:", "a, b. c, d and the rest"), ("q", "no delimiter"), ("sum:\n", "1 + 2 = 3\nAnswer: 3")]
    examples = [make_example(memory, tok.encode(p), tok.encode(t)) for p, t in pairs]
    lm = LatentLM(memory)
    with torch.no_grad():
        hidden, targets = lm.scored_states(examples)
        logprobs = torch.log_softmax(engine.model.logits(hidden), -1)[torch.arange(targets.numel()), targets]
    assert targets.tolist() == [t for ex in examples for t in ex.target]  # each target token once, in order
    offset = 0
    for ex in examples:
        generation = engine.score([ex.prompt], [ex.target], memory=memory)[0]
        assert generation.insertions == ex.points  # the prompt's latents come at output 0 here too
        n = len(ex.target)
        torch.testing.assert_close(
            logprobs[offset : offset + n], torch.tensor(generation.logprobs), atol=1e-4, rtol=1e-4
        )
        offset += n
    # Batched generation equals each row alone (the weaver's queries share the batch's cache).
    batched = engine.score([ex.prompt for ex in examples], [ex.target for ex in examples], memory=memory)
    for ex, b in zip(examples, batched, strict=True):
        alone = engine.score([ex.prompt], [ex.target], memory=memory)[0]
        assert b.insertions == alone.insertions
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=1e-5)
    return lm, examples


@pytest.mark.parametrize("weaver_layers", [None, 1])
def test_states_weaver_training_equals_generation_batched_and_gets_gradients(weaver_layers):
    """A weaver that reads the reasoner's KV cache and writes latent embeddings."""
    engine = tiny_engine()
    memory = _memory(engine, max_inference_aug=2, weaver_layers=weaver_layers, weaver_input="states")
    assert memory.weaver.to_weaver is None and memory.weaver.reads_states
    lm, examples = _twin_equals_engine(engine, memory)
    # Gradients reach the queries, the projection and every adapter, through the cached latents.
    loss, count = lm(examples)
    (loss / count).backward()
    assert memory.weaver.inference_queries.grad is not None and memory.weaver.prompt_queries.grad is not None
    assert memory.weaver.to_reasoner.weight.grad is not None
    assert all(p.grad is not None for p in memory.weaver.lora_parameters())
    assert all(p.grad is None for n, p in engine.model.named_parameters() if "lora" not in n)


def _reloaded_scores_equal(engine, memory, folder):
    """Save `memory` exactly, load it onto a fresh engine: it scores a text as the original does."""
    memory.save(folder / "mem", dtype=None)
    other = tiny_engine()
    loaded = LatentMemory.load(folder / "mem", other)
    prompt, continuation = engine.tokenizer.encode("a, b."), engine.tokenizer.encode(" c, d.")
    assert (
        other.score([prompt], [continuation], memory=loaded)[0].logprobs
        == engine.score([prompt], [continuation], memory=memory)[0].logprobs
    )
    return loaded


def test_states_weaver_leaves_the_cache_and_eviction_statistics_as_they_were(tmp_path):
    from memlm.cache.policies import make_policy

    engine = tiny_engine()
    memory = _memory(engine, weaver_input="states")
    state = engine.model.new_state(2, 32, track_attention=True)
    ids = torch.tensor([engine.tokenizer.encode("abc, d."), engine.tokenizer.encode("xy, zw.")])
    with torch.no_grad():
        engine.model.forward_tokens(ids, torch.arange(ids.shape[1])[None].expand(2, -1), state)
    before = (state.lengths.clone(), state.attention_sum.clone(), state.positions.clone(), state.k.clone())
    with torch.no_grad():
        latents = memory.weaver.weave_states(state, [7, 7], ["inference", None])
    assert latents[1] is None and latents[0].shape == (2, engine.config.hidden_size)
    assert torch.equal(state.lengths, before[0]) and torch.equal(state.attention_sum, before[1])
    assert torch.equal(state.positions, before[2])
    assert torch.equal(state.k[:, :, :, :7], before[3][:, :, :, :7])
    # Saved and loaded, a states memory reads states again; generation under an eviction policy runs.
    loaded = _reloaded_scores_equal(engine, memory, tmp_path)
    assert loaded.config["weaver_input"] == "states" and loaded.weaver.reads_states
    prompt = engine.tokenizer.encode("a, b.")
    out = engine.generate_tokens(
        [prompt], SamplingParams(max_new_tokens=12, ignore_eos=True), memory=memory, kv_policy=make_policy("h2o", 12)
    )[0]
    assert len(out.token_ids) == 12 and out.insertions[0] == 0
    with pytest.raises(MemlmError, match="unknown weaver input"):
        LatentMemory.create(tiny_engine(), weaver_input="logits")


def test_sequence_trigger_probe_over_the_cache_equals_a_full_pass_with_earlier_latents():
    """The `sequence` trigger decides on the weaver's probe of the reasoner's cache: tokens, a kv
    weaver's latent slots among them, then the probe (LoRA on) at the next position. The same
    hidden state comes out of one forward over the whole sequence with LoRA on for the latents and
    the probe alone; the cache and its attention statistics are left as they were."""
    from memlm.adapters.lora import lora_for_tokens
    from memlm.latent.trigger import SequenceTrigger

    engine = tiny_engine()
    memory = _memory(engine, weaver_input="states", weaver_output="kv", trigger="sequence")
    assert isinstance(memory.trigger, SequenceTrigger)
    model, weaver, tok = engine.model, memory.weaver, engine.tokenizer
    first, second = tok.encode("abc, d."), tok.encode(" xy,")
    k = weaver.num_latents["inference"]
    state = model.new_state(1, 64, track_attention=True)
    with torch.no_grad():
        model.forward_tokens(torch.tensor([first]), torch.arange(len(first))[None], state)
        weaver.write_states(state, [len(first)], ["inference"])  # the latent slots stay
        at = len(first) + k
        model.forward_tokens(torch.tensor([second]), torch.arange(at, at + len(second))[None], state)
    before = (state.lengths.clone(), state.attention_sum.clone(), state.k.clone())
    end = at + len(second)
    features = memory.trigger.features(weaver, state, [0], [end])
    assert torch.equal(state.lengths, before[0]) and torch.equal(state.attention_sum, before[1])
    assert torch.equal(state.k[..., :end, :], before[2][..., :end, :])

    probe = weaver.inference_queries[0].detach()
    with torch.no_grad():
        x = torch.cat([model.embed(torch.tensor(first)), weaver.inference_queries, model.embed(torch.tensor(second)),
                       probe[None]])[None]
        lora = torch.zeros(1, x.shape[1], dtype=torch.bool)
        lora[0, len(first) : at] = True
        lora[0, -1] = True
        with lora_for_tokens(model, lora):
            full = model(x, torch.arange(x.shape[1])[None])[0, -1]
    torch.testing.assert_close(features[0], full, atol=1e-5, rtol=1e-5)


def test_sequence_trigger_in_generation_batched_alone_and_saved(tmp_path):
    """Generation asks the sequence trigger at delimiters: decisions depend on the rows' own text,
    so batched rows decide as they do alone; a saved memory decides the same after loading."""
    engine = tiny_engine()
    memory = _memory(engine, max_inference_aug=4, weaver_input="states", weaver_output="kv", trigger="sequence")
    texts = [("q:", "a, b. c, d, e."), ("question, long:", "x, y. z\nw, v."), ("hm", "1.5 and 2, 3")]
    prompts = [engine.tokenizer.encode(p) for p, _ in texts]
    continuations = [engine.tokenizer.encode(c) for _, c in texts]
    trigger, seen = memory.trigger, []

    class Always:  # inserts everywhere, keeping what the sequence trigger would have seen
        features = staticmethod(trigger.features)

        def decide(self, hidden, requests):
            seen.append(trigger.logits(hidden))
            return torch.ones(hidden.shape[0], dtype=torch.bool)

    memory.trigger = Always()
    everywhere = engine.score(prompts, continuations, memory=memory)
    memory.trigger = trigger
    with torch.no_grad():  # a head that fires on about half of those delimiters
        trigger.head[-1].bias[1] -= torch.cat(seen).median()
    batched = engine.score(prompts, continuations, memory=memory)
    taken = sum(len(b.insertions) for b in batched)
    assert len(prompts) < taken < sum(len(e.insertions) for e in everywhere)  # some delimiters taken, some not
    for p, c, b in zip(prompts, continuations, batched, strict=True):
        alone = engine.score([p], [c], memory=memory)[0]
        assert alone.insertions == b.insertions
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
    loaded = _reloaded_scores_equal(engine, memory, tmp_path)
    assert loaded.config["trigger"] == "sequence" and loaded.trigger.kind == "sequence"
    assert LatentMemory.load(tmp_path / "mem", tiny_engine(), trigger="always").trigger.kind == "always"
    _memory(tiny_engine()).save(tmp_path / "plain")
    with pytest.raises(ModelFormatError, match="no sequence trigger"):
        LatentMemory.load(tmp_path / "plain", tiny_engine(), trigger="sequence")


def test_kv_weaver_training_equals_generation_batched_and_gets_gradients():
    """A weaver whose queries' keys and values stay in the reasoner's cache: the token sampled at an
    insertion point is kept (each target token is scored once, from before the latents)."""
    engine = tiny_engine()
    memory = _memory(engine, max_inference_aug=2, weaver_input="states", weaver_output="kv")
    assert memory.weaver.writes_kv and memory.weaver.to_reasoner is None
    lm, examples = _twin_equals_engine(engine, memory)
    loss, count = lm(examples)
    (loss / count).backward()
    assert memory.weaver.inference_queries.grad is not None and memory.weaver.prompt_queries.grad is not None
    # Only keys and values are kept, so past the last layer's qkv projection nothing reaches the loss.
    last = engine.config.num_layers - 1
    for name, layer in lora_layers(engine.model):
        dead = name.startswith(f"layers.{last}.") and "qkv" not in name
        assert (layer.lora_a.grad is None) == dead and (layer.lora_b.grad is None) == dead, name
    assert all(p.grad is None for n, p in engine.model.named_parameters() if "lora" not in n)


def test_kv_weaver_queries_in_the_reasoners_step_equal_a_pass_of_their_own():
    """The engine folds a kv weaver's queries into its batch's forward (LoRA on for them alone): the
    same keys and values, the same hidden state for the token after them, the same attention
    statistics (the queries' attention uncounted) as the weaver's own pass and then the token."""
    from memlm.generation.batch import embed_chunk
    from memlm.generation.request import Request

    engine = tiny_engine()
    memory = _memory(engine, weaver_input="states", weaver_output="kv")
    model, weaver = engine.model, memory.weaver
    prompts = [engine.tokenizer.encode("abc, d."), engine.tokenizer.encode("xy, zw.")]
    ids = torch.tensor(prompts)
    n, k = ids.shape[1], weaver.num_latents["inference"]
    next_tokens = [5, 9]
    caches = []
    for paged in (False, True):
        options = {"pool": model.new_pool(block_size=4, initial_blocks=16)} if paged else {}
        states = [model.new_state(2, 32, track_attention=True, **options) for _ in range(2)]
        with torch.no_grad():
            for state in states:
                model.forward_tokens(ids, torch.arange(n)[None].expand(2, -1), state)
            # its own pass: row 0's queries, then each row's next token
            weaver.write_states(states[0], [n, n], ["inference", None])
            positions = torch.tensor([[n + k], [n]])
            own = model.forward_tokens(torch.tensor(next_tokens)[:, None], positions, states[0])[:, -1]
            # folded: row 0 feeds [queries, token], row 1 [token] (padded), in one forward
            rows = [Request.__new__(Request) for _ in range(2)]
            for r, token in zip(rows, next_tokens, strict=True):
                r.pending_ids, r.pending_embeds, r.pending_queries = [token], None, None
            rows[0].pending_queries = weaver.queries("inference").detach()
            chunk = embed_chunk(model, rows, k + 1)
            positions = torch.tensor([list(range(n, n + k + 1)), [n] + [-1] * k])
            queries = torch.tensor([[True] * k + [False], [False] * (k + 1)])
            folded = model(chunk, positions, states[1], lora_tokens=queries)[[0, 1], [k, 0]]
        torch.testing.assert_close(folded, own, atol=1e-5, rtol=1e-5)
        a, b = states
        assert torch.equal(a.lengths, b.lengths) and a.lengths.tolist() == [n + k + 1, n + 1]
        for row, length in enumerate(a.lengths.tolist()):
            for x, y in zip(a.store.row(row, length), b.store.row(row, length), strict=True):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.attention_sum, b.attention_sum, atol=1e-6, rtol=1e-5)
        caches.append(b)
    assert all(not isinstance(layer.enabled, torch.Tensor) and not layer.enabled for _, layer in lora_layers(model))


def test_kv_weaver_queries_in_the_native_quantized_step_equal_the_layer_by_layer_path():
    """On quantized weights the native step runs a folded insertion itself: the model's own LoRA is
    adapter 1 of the queries' tokens only, and generation matches the layer-by-layer path."""
    import memlm.kernels as kernels
    from memlm.models.native_decode import NativeDecoder
    from memlm.quant.qlinear import quantize_model

    if kernels.native() is None:
        pytest.skip("native kernels need x86-64 AVX2/FMA/F16C and a compiler")
    engine = tiny_engine()
    quantize_model(engine.model, "q8_0")
    memory = _memory(engine, weaver_input="states", weaver_output="kv", max_inference_aug=3)
    model = engine.model
    model.native_decoder = native = NativeDecoder.for_model(model)
    assert native is not None
    calls, original = [], native.step
    native.step = lambda *a: calls.append(a[-1] is not None) or original(*a)
    prompts = [engine.tokenizer.encode("abc, d."), engine.tokenizer.encode("xy")]
    targets = [engine.tokenizer.encode("1, 2. 3, 4"), engine.tokenizer.encode("a. b, c")]
    natively = engine.score(prompts, targets, memory=memory)
    model.native_decoder = None
    layered = engine.score(prompts, targets, memory=memory)
    model.native_decoder = native
    assert any(calls)  # the native step ran steps holding queries
    for a, b in zip(natively, layered, strict=True):
        assert a.insertions == b.insertions and len(a.insertions) > 2
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-3, rtol=1e-3)


def test_kv_weaver_delimiter_start_writes_the_keys_and_values_of_newlines():
    """Untrained (LoRA's B = 0), a "kv" weaver with the delimiter start writes exactly what the frozen
    reasoner computes for newline tokens in the latent slots: scoring with the memory equals a plain
    forward over the text with K newlines after each insertion point, each target token read from
    the real token before it (the latents come after the token that predicts the next one)."""
    engine = tiny_engine()
    memory = LatentMemory.create(
        engine, prompt_latents=3, inference_latents=2, lora_rank=4, max_inference_aug=2,
        init="delimiter", weaver_input="states", weaver_output="kv",
    )
    tok, model = engine.tokenizer, engine.model
    prompt, target = tok.encode("notes:"), tok.encode("a, b. c, d and the rest")
    result = engine.score([prompt], [target], memory=memory)[0]
    assert result.insertions == [0, 2, 5]
    newline = tok.encode("\n")[-1]
    ids, predictor = list(prompt), []  # predictor[j]: the index whose logits score target[j]
    for j, token in enumerate(target):
        predictor.append(len(ids) - 1)
        if j in result.insertions:
            ids += [newline] * (3 if j == 0 else 2)
        ids.append(token)
    with torch.no_grad():
        logits = model.logits(model.forward_tokens(torch.tensor([ids]), torch.arange(len(ids))[None], None))[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    expected = torch.stack([logprobs[i, t] for i, t in zip(predictor, target, strict=True)])
    torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_kv_weaver_slots_in_the_cache_checkpoint_and_errors(tmp_path):
    from memlm.cache.policies import make_policy

    engine = tiny_engine()
    memory = _memory(engine, weaver_input="states", weaver_output="kv")
    state = engine.model.new_state(2, 32, track_attention=True)
    ids = torch.tensor([engine.tokenizer.encode("abc, d."), engine.tokenizer.encode("xy, zw.")])
    with torch.no_grad():
        engine.model.forward_tokens(ids, torch.arange(ids.shape[1])[None].expand(2, -1), state)
    before = (state.attention_sum.clone(), state.k.clone())
    with torch.no_grad():
        written = memory.weaver.write_states(state, [7, 7], ["inference", None])
    assert written == [2, 0] and state.lengths.tolist() == [9, 7]
    assert state.positions[0, 7:9].tolist() == [7, 8]
    assert torch.equal(state.attention_sum, before[0])  # the weaver's reads are not counted
    assert torch.equal(state.k[:, :, :, :7], before[1][:, :, :, :7])
    assert not torch.equal(state.k[:, 0, :, 7:9], before[1][:, 0, :, 7:9])
    # Saved and loaded, it writes keys and values again; under an eviction policy generation runs
    # and the latent slots are not tokens.
    loaded = _reloaded_scores_equal(engine, memory, tmp_path)
    assert loaded.config["weaver_output"] == "kv" and loaded.weaver.writes_kv
    prompt = engine.tokenizer.encode("a, b.")
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    out = engine.generate_tokens([prompt], params, memory=memory, kv_policy=make_policy("h2o", 12))[0]
    assert len(out.token_ids) == 12 and out.insertions[0] == 0
    # Each step's deltas count the latents written in it (the server's metrics read them).
    requests = engine._submit([prompt], params, None, memory)
    inserted = sum(d.inserted for deltas in engine._drive(requests) for d in deltas)
    assert inserted == 3 + 2 * (len(requests[0].completion().insertions) - 1) > 3
    with pytest.raises(MemlmError, match="reads the reasoner's states"):
        LatentMemory.create(tiny_engine(), weaver_output="kv")
    with pytest.raises(MemlmError, match="all layers"):
        LatentMemory.create(tiny_engine(), weaver_input="states", weaver_output="kv", weaver_layers=1)
    with pytest.raises(MemlmError, match="unknown weaver output"):
        LatentMemory.create(tiny_engine(), weaver_output="logits")


@pytest.mark.parametrize("weaver_layers", [None, 1])
def test_training_forward_equals_generation_and_never_labels_latent_slots(weaver_layers):
    from memlm.latent.training import IGNORE, LatentLM, interleave, make_example, weave_for_training

    engine = tiny_engine()
    memory = _memory(engine, max_inference_aug=2, weaver_layers=weaver_layers)
    prompt = engine.tokenizer.encode("notes:")
    target = engine.tokenizer.encode("a, b. c, d and the rest")
    example = make_example(memory, prompt, target)
    assert example.points == [0, 2, 5]  # the prompt, "a,", "a, b." (then the limit)
    lm = LatentLM(memory)
    with torch.no_grad():
        latents = weave_for_training(memory, [example])[0]
        embeds, labels = interleave(engine.model, example, latents)
        training = lm.token_logprobs(example)
    # Latent slots are never labels; every target token is, exactly once, in order.
    assert labels[labels != IGNORE].tolist() == target
    assert embeds.shape[0] == len(prompt) + len(target) + 3 + 2 + 2
    generation = engine.score([prompt], [target], memory=memory)[0]
    assert generation.insertions == example.points
    torch.testing.assert_close(training, torch.tensor(generation.logprobs), atol=1e-4, rtol=1e-4)
    # Gradients reach the weaver (LoRA, queries, projections) and nothing of the frozen reasoner.
    loss, count = lm([example, make_example(memory, prompt, target[:5])])
    (loss / count).backward()
    assert memory.weaver.inference_queries.grad is not None and memory.weaver.to_reasoner.weight.grad is not None
    assert all(p.grad is not None for p in memory.weaver.lora_parameters())
    assert all(p.grad is None for n, p in engine.model.named_parameters() if "lora" not in n)


def test_truncated_weaver_runs_and_adapts_only_the_first_layers(tmp_path):
    engine = tiny_engine(num_layers=3)
    memory = _memory(engine, weaver_layers=2)
    names = [name for name, _ in lora_layers(engine.model)]
    assert names and all(name.startswith(("layers.0.", "layers.1.")) for name in names)
    assert memory.weaver.new_cache(1, 8).num_layers == 2
    # Its latents are the reasoner's own first two layers (LoRA on) read by to_reasoner.
    weaver = memory.weaver
    ids = torch.tensor(engine.tokenizer.encode("ab,"))
    x = torch.cat((weaver.to_weaver(engine.model.embed(ids)), weaver.queries("inference")))[None]
    from memlm.adapters.lora import lora_switched

    with torch.no_grad(), lora_switched(engine.model, True):
        hidden = engine.model.norm(
            engine.model.layers[1](
                engine.model.layers[0](x, *_rope(engine.model, x.shape[1]), _causal(x.shape[1]), None),
                *_rope(engine.model, x.shape[1]),
                _causal(x.shape[1]),
                None,
            )
        )
        got = weaver.weave(weaver.new_cache(1, 16), [ids.tolist()], ["inference"])[0]
    torch.testing.assert_close(got, weaver.to_reasoner(hidden[0, len(ids) :]), atol=1e-5, rtol=1e-5)

    memory.save(tmp_path / "mem", dtype=None)
    other = tiny_engine(num_layers=3)
    loaded = LatentMemory.load(tmp_path / "mem", other)
    assert loaded.config["weaver_layers"] == 2 and loaded.weaver.depth == 2
    prompt, continuation = engine.tokenizer.encode("a, b."), engine.tokenizer.encode(" c, d.")
    expected = engine.score([prompt], [continuation], memory=memory)[0].logprobs
    assert other.score([prompt], [continuation], memory=loaded)[0].logprobs == expected
    with pytest.raises(MemlmError, match="layers must be 1..3"):
        LatentMemory.create(tiny_engine(num_layers=3), weaver_layers=4)
    with pytest.raises(MemlmError, match="load each memory onto its own engine"):
        LatentMemory.create(engine, lora_rank=4)  # a full weaver beside the truncated one


@pytest.mark.parametrize("init", ["delimiter", "gated"])
def test_delimiter_init_starts_as_newlines_in_the_text(init):
    """An untrained weaver with init="delimiter" (or "gated") writes copies of the newline's
    embedding, so the reasoner reads exactly the text with newline tokens where the latents go."""
    engine = tiny_engine()
    memory = LatentMemory.create(engine, prompt_latents=3, inference_latents=2, lora_rank=4, init=init)
    newline = engine.tokenizer.encode("\n")
    tok = engine.tokenizer
    prompt, continuation = tok.encode("sum:\n"), tok.encode("1 + 2 = 3\n3 + 4 = 7\nAnswer: 7")
    got = engine.score([prompt], [continuation], memory=memory)[0]
    assert got.insertions == [0, 10, 20]  # the prompt and both line ends
    padded, real = [], []
    for k, token in enumerate(continuation):
        if k in got.insertions[1:]:
            padded += newline * 2
        real.append(len(padded))
        padded.append(token)
    text = engine.score([prompt + newline * 3], [padded])[0].logprobs
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor([text[i] for i in real]), atol=1e-5, rtol=0)
    with pytest.raises(MemlmError, match="unknown weaver init"):
        LatentMemory.create(tiny_engine(), init="zeros")


def test_gated_weaver_opens_its_gate_first_and_then_trains_through_it(tmp_path):
    from memlm.latent.training import LatentLM, make_example

    engine = tiny_engine()
    memory = LatentMemory.create(engine, prompt_latents=3, inference_latents=2, lora_rank=4, init="gated")
    weaver, tok = memory.weaver, engine.tokenizer
    with torch.no_grad():
        for _, layer in lora_layers(engine.model):
            layer.lora_b.normal_(std=0.05)
    example = make_example(memory, tok.encode("sum:\n"), tok.encode("1 + 2 = 3\n3 + 4 = 7\nAnswer: 7"))
    loss, count = LatentLM(memory)([example])
    (loss / count).backward()
    # Shut, the gate is the way in: it has a gradient, the adapters behind it none yet.
    assert float(weaver.gate.grad.abs()) > 0
    assert all(float(p.grad.abs().max()) == 0 for p in weaver.lora_parameters())
    memory.weaver.zero_grad()
    for p in weaver.lora_parameters():
        p.grad = None
    with torch.no_grad():
        weaver.gate.fill_(0.02)
    loss, count = LatentLM(memory)([example])
    (loss / count).backward()
    assert any(float(p.grad.abs().max()) > 0 for p in weaver.lora_parameters())
    # The gate is part of the checkpoint: a loaded memory writes the same latents.
    memory.save(tmp_path / "mem", dtype=None)
    other = tiny_engine()
    loaded = LatentMemory.load(tmp_path / "mem", other)
    assert float(loaded.weaver.gate.detach()) == pytest.approx(0.02)
    prompt, target = tok.encode("a, b."), tok.encode(" c, d.")
    assert (
        other.score([prompt], [target], memory=loaded)[0].logprobs
        == engine.score([prompt], [target], memory=memory)[0].logprobs
    )


def _rope(model, n):
    from memlm.models.llama import rope_cos_sin

    return rope_cos_sin(torch.arange(n)[None], model.inv_freq, model.attention_scaling, torch.float32)


def _causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()[None, None]


def test_weaver_training_end_to_end_saves_a_memory_that_generation_loads(tmp_path):
    from memlm.formats.loading import save_model
    from memlm.latent.spec import WeaverSpec
    from memlm.train.weaver import WeaverConfig, run_weaver_training

    folder = save_model(tmp_path / "tiny", tiny_memlm(vocab_size=257, eos_token_ids=(256,)), byte_tokenizer())
    cfg = WeaverConfig.of(
        str(folder),
        "chain_sum_short",
        str(tmp_path / "w"),
        spec=WeaverSpec(
            prompt_latents=2,
            inference_latents=2,
            lora_rank=4,
            max_inference_aug=2,
            delimiters=("=",),  # insert where each line's result is about to be written
        ),
        steps=20,
        batch_size=4,
        lr=3e-3,
        n_train=16,
        n_eval=2,
        n_val_loss=3,
        warmup_steps=1,
        save_every=10,
        progress=False,
    )
    report = run_weaver_training(cfg)
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "w" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < losses[0]
    # Held-out loss: before the first step and at each checkpoint, on validation problems.
    rows = [json.loads(line) for line in (tmp_path / "w" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20]
    assert report["val_loss"] == rows[-1]["val_loss"] and report["val_loss_start"] > 0
    assert report["eval"]["n"] == 2 and report["eval"]["insertions_per_answer"] >= 1  # the prompt insertion at least
    from memlm.generation.engine import Engine

    engine = Engine.load(str(folder))
    memory = LatentMemory.load(tmp_path / "w" / "memory", engine)
    assert memory.config["task"] == "chain_sum_short"
    assert memory.config["delimiters"] == ["="]  # the insertion points travel with the memory
    text = "3 + 4 = 7\n7 - 2 = 5\n"
    points = memory.delimiters.in_text(engine.tokenizer.encode(text, add_special_tokens=False))
    assert [text[: i + 1][-2:] for i in points] == [" =", " ="]


def test_group_rewards_penalise_insertions_beyond_the_correct_answers():
    from memlm.train.trigger import group_rewards

    # Correct answers used 2 and 4 insertions (mean 3): only insertions beyond 3 cost.
    assert group_rewards([1.0, 1.0, 0.0, 1.0], [2, 4, 6, 3], penalty=0.5, max_aug=4) == [1.0, 0.875, -0.375, 1.0]
    assert group_rewards([0.0, 0.0], [1, 5], penalty=0.5, max_aug=4) == [0.0, 0.0]  # nothing to compare with


def test_a_group_has_signal_only_when_mixed():
    from memlm.train.trigger import is_mixed

    assert is_mixed([1.0, 0.0, 0.0, 0.0]) and is_mixed([1.0, 1.0, 1.0, 0.0])
    assert not is_mixed([0.0, 0.0, 0.0, 0.0]) and not is_mixed([1.0, 1.0, 1.0, 1.0])


def test_trigger_loss_stays_finite_for_a_saturated_trigger_under_bf16_autocast():
    """A confident trigger under bf16 autocast (training runs under it on this CPU): P rounds to
    exactly 1 there, and the old loss (log of a clamped P) was -inf for a skip and NaN (0 x -inf)
    for a group without signal, after which every weight was NaN and the trigger never inserted."""
    from memlm.latent.trigger import Trigger
    from memlm.train.trigger import trigger_loss

    torch.manual_seed(0)
    trigger = Trigger(16)
    with torch.no_grad():
        trigger.head[-1].weight.zero_()
        trigger.head[-1].bias.fill_(12.0)  # P(insert) = 1 - 6e-6 everywhere
    states = torch.randn(3, 16)

    def rollout(decisions, advantage):
        stats = {"reward": 0.0, "score": 0.0, "insertions": float(sum(decisions)), "mixed": 1.0}
        return {"states": states, "decisions": torch.tensor(decisions), "advantage": advantage, **stats}

    rollouts = [rollout([1.0, 0.0, 1.0], 1.0), rollout([1.0, 1.0, 1.0], 0.0)]  # the second has no signal
    with torch.autocast("cpu", torch.bfloat16):
        assert trigger.probability(states).min() == 1.0  # what made log(1 - P) infinite
        loss, stats = trigger_loss(trigger, rollouts)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in trigger.parameters())
    # -(1.0 x (2 log P + log(1 - P))) / 2 rollouts, with float32 logsigmoid: about (12 + 1.2e-5) / 2.
    logsig = torch.nn.functional.logsigmoid
    expected = -(2 * logsig(torch.tensor(12.0)) + logsig(torch.tensor(-12.0))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert stats["insertions"] == 2.5


@pytest.mark.parametrize("kind", ["learned", "sequence"])
def test_trigger_rl_learns_to_insert_less_when_insertions_only_cost(tmp_path, monkeypatch, kind):
    from memlm.data.tasks import Task
    from memlm.formats.loading import save_model
    from memlm.train.trigger import TriggerConfig, run_trigger_training

    folder = save_model(tmp_path / "tiny", tiny_memlm(vocab_size=257, eos_token_ids=(256,)), byte_tokenizer())
    from memlm.generation.engine import Engine

    engine = Engine.load(str(folder))
    _memory(engine, max_inference_aug=6).save(tmp_path / "weaver")
    monkeypatch.setattr(Task, "score", lambda self, text, problem: 1.0)  # every answer right: only the penalty differs
    cfg = TriggerConfig.of(
        str(folder),
        str(tmp_path / "weaver"),
        "chain_sum_short",
        str(tmp_path / "t"),
        steps=20,
        problems_per_step=2,
        group_size=4,
        temperature=1.0,
        lr=0.05,
        penalty=1.0,
        initial_p=0.5,
        n_train=8,
        n_eval=4,
        max_new_tokens=40,
        save_every=20,
        progress=False,
        kind=kind,
    )
    report = run_trigger_training(cfg)
    trained = LatentMemory.load(tmp_path / "t" / "memory", Engine.load(str(folder)))
    assert trained.config["trigger"] == kind and trained.trigger.kind == kind
    states = torch.randn(64, 64) * 3
    with torch.no_grad():
        p = trained.trigger.probability(states).mean()
    assert p < 0.45  # started at 0.5 everywhere; insertions only ever lowered the reward
    assert report["eval"]["insertions_per_answer"] < 1 + 6 * 0.5
    logged = [json.loads(line) for line in (tmp_path / "t" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    assert all(r["score"] == 1.0 and 0 <= r["insertions"] <= 6 and r["reward"] <= 1.0 for r in logged)
    assert all(r["mixed"] == 0.0 for r in logged)  # every answer right: no group is mixed


def test_trigger_training_refuses_an_untrained_kind_before_loading_anything(tmp_path):
    from memlm.train.trigger import TriggerConfig, run_trigger_training

    cfg = TriggerConfig.of(str(tmp_path / "no-model"), str(tmp_path / "no-memory"), "chain_sum", str(tmp_path / "t"),
                           kind="always")  # fmt: skip
    with pytest.raises(MemlmError, match="--kind is one of learned, sequence, not 'always'"):
        run_trigger_training(cfg)


def test_screening_keeps_only_problems_whose_group_is_mixed(tmp_path, monkeypatch):
    import dataclasses
    from itertools import count

    from memlm.data.tasks import Task, get_task
    from memlm.formats.loading import save_model
    from memlm.train.trigger import TriggerConfig, run_trigger_training, screen_problems

    folder = save_model(tmp_path / "tiny", tiny_memlm(vocab_size=257, eos_token_ids=(256,)), byte_tokenizer())
    from memlm.generation.engine import Engine

    engine = Engine.load(str(folder))
    _memory(engine, max_inference_aug=2).save(tmp_path / "weaver")
    task = get_task("chain_sum_short")
    problems = task.problems(6, "train")
    # Problems 0 and 3 are sometimes right, 1 and 4 always right, 2 and 5 always wrong.
    kinds = {p.question: ("mixed", "right", "wrong")[i % 3] for i, p in enumerate(problems)}
    calls = count()

    def score(self, text, problem):
        kind = kinds[problem.question]
        return {"right": 1.0, "wrong": 0.0}.get(kind, float(next(calls) % 2))

    monkeypatch.setattr(Task, "score", score)
    cfg = TriggerConfig.of(
        str(folder),
        str(tmp_path / "weaver"),
        task.name,
        str(tmp_path / "t"),
        group_size=4,
        temperature=1.0,
        max_new_tokens=12,
    )
    memory = LatentMemory.load(tmp_path / "weaver", engine)
    kept, summary = screen_problems(engine, memory, task, problems, cfg)
    assert kept == [0, 3]
    assert summary == {"screened": 6, "mixed": 2, "mixed_fraction": 2 / 6, "score": (2 * 4 + 2 * 2) / 24}

    # RL then draws only those: every logged group is mixed.
    train = dataclasses.replace(cfg.train, steps=2, save_every=2, log_every=2, progress=False)
    cfg = dataclasses.replace(cfg, train=train, problems_per_step=2, screen=6, n_eval=0)
    report = run_trigger_training(cfg)
    assert report["screening"]["mixed"] == 2
    logged = [json.loads(line) for line in (tmp_path / "t" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["mixed"] == 1.0
    assert json.loads((tmp_path / "t" / "screening.json").read_text())["kept"] == [0, 3]
    cfg.problems_per_step, cfg.train.resume = 3, False
    with pytest.raises(MemlmError, match="only 2 of 6 screened problems gave a mixed group"):
        run_trigger_training(cfg)


def test_a_resumed_rl_run_reads_its_screening_back(tmp_path):
    from memlm.train.rollouts import screened

    calls = []

    def screen(problems):
        calls.append(len(problems))
        return [1, 2], {"screened": len(problems), "mixed": 2}

    problems = list("abcd")
    assert screened(problems, screen, 2, tmp_path) == (["b", "c"], {"screened": 4, "mixed": 2})
    assert screened(problems, screen, 2, tmp_path, resume=True) == (["b", "c"], {"screened": 4, "mixed": 2})
    assert calls == [4]  # read back, not screened again
    screened(problems, screen, 2, tmp_path)  # a fresh run screens
    screened(list("abcdef"), screen, 2, tmp_path, resume=True)  # other problems: the saved list is not theirs
    assert calls == [4, 4, 6]


def test_bench_memgen_rows_json_and_plot(tmp_path):
    from memlm.bench.memgen import run_memgen_bench
    from memlm.formats.loading import save_model
    from memlm.generation.engine import Engine

    folder = save_model(tmp_path / "tiny", tiny_memlm(vocab_size=257, eos_token_ids=(256,)), byte_tokenizer())
    _memory(Engine.load(str(folder)), max_inference_aug=2).save(tmp_path / "mem")
    learned = _memory(Engine.load(str(folder)), max_inference_aug=2, trigger="learned", weaver_input="states")
    learned.save(tmp_path / "learned")
    text = tmp_path / "prose.txt"
    text.write_text("The river ran past the mill, and the miller, tired, slept. Then it rained.\n\n" * 4)
    report = run_memgen_bench(
        str(folder),
        "chain_sum_short",
        3,
        weaver=str(tmp_path / "mem"),
        weaver_trigger=str(tmp_path / "learned"),
        json_path=str(tmp_path / "m.json"),
        plot_path=str(tmp_path / "m.png"),
        batch_size=3,
        max_new_tokens=16,
        speed_tokens=12,
        retain_task="chain_sum",
        text=str(text),
        text_windows=2,
        text_tokens=24,
    )
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert rows == report["rows"]
    assert [r["variant"] for r in rows] == ["vanilla", "weaver", "weaver_trigger", "weaver_never"]
    assert rows[0]["insertions_per_answer"] == 0 and rows[1]["insertions_per_answer"] >= 1
    # `never` keeps only the prompt's latents; the learned trigger lies between the extremes.
    assert rows[3]["insertions_per_answer"] == 1 and rows[3]["weaver_input"] == "states"
    assert 1 <= rows[2]["insertions_per_answer"] <= 3
    assert rows[1]["weaver_input"] == "embeddings" and "weaver_input" not in rows[0]
    rows = rows[:2]  # the checks below compare vanilla and the weaver
    assert rows[0]["speed_vs_vanilla"] == 1.0 and rows[1]["speed_vs_vanilla"] > 0
    assert rows[0]["fixed_len_speed_vs_vanilla"] == 1.0 and rows[1]["fixed_len_tok_s"] > 0
    assert rows[0]["single_speed_vs_vanilla"] == 1.0 and rows[1]["single_tok_s"] > 0
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    # whole solutions: the share of answers equal to the worked solution, never above accuracy
    assert all(0 <= r["solutions_exact"] <= r["accuracy"] for r in rows)
    # forgetting: both variants answer the other task and score the same prose; the frozen reasoner
    # alone is vanilla itself, and the weaver's latents (inserted at the prose's commas and full
    # stops) change what it predicts
    assert report["retain_task"] == "chain_sum" and report["text_windows"] == 2
    assert all(0 <= r["retain_accuracy"] <= 1 for r in rows)
    assert rows[0]["text_perplexity_vs_vanilla"] == 1.0 and rows[0]["text_perplexity"] > 1
    assert rows[1]["text_perplexity"] != rows[0]["text_perplexity"]
    from memlm.bench.decode import perplexity
    from memlm.bench.memgen import _text_windows

    windows = _text_windows(str(folder), str(text), 2, 24)  # the decode loop scores as one forward does
    reference = perplexity(Engine.load(str(folder)).model, [t for w in windows for t in w], window=24)
    assert rows[0]["text_perplexity"] == pytest.approx(reference, rel=1e-4)


def test_bench_memgen_labels_rows_and_caps_insertions(tmp_path):
    from memlm.bench.memgen import Variant, plan_variants, run_memgen_bench
    from memlm.formats.loading import save_model
    from memlm.generation.engine import Engine

    assert plan_variants("m", ["a1"], ["sft=w1", "grpo=w2"], caps=[1]) == [
        Variant("vanilla", "m"),
        Variant("lora_sft", "a1"),
        Variant("sft", "m", "w1", "always"),
        Variant("sft_cap1", "m", "w1", "always", 1),
        Variant("grpo", "m", "w2", "always"),
        Variant("grpo_cap1", "m", "w2", "always", 1),
    ]
    with pytest.raises(MemlmError, match="label each --weaver"):
        plan_variants("m", weaver=["w1", "w2"])
    assert plan_variants("m", weaver="runs/x=1")[1].memory == "runs/x=1"  # not a label: a path with '='

    folder = save_model(tmp_path / "tiny", tiny_memlm(vocab_size=257, eos_token_ids=(256,)), byte_tokenizer())
    _memory(Engine.load(str(folder)), max_inference_aug=3).save(tmp_path / "mem")
    report = run_memgen_bench(
        str(folder), "chain_sum_short", 3, weaver=[f"w={tmp_path / 'mem'}"], caps=[1],
        batch_size=3, max_new_tokens=24, speed_tokens=0,
    )
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["vanilla", "w", "w_cap1"]
    assert rows["w"]["max_inference_aug"] == 3 and rows["w_cap1"]["max_inference_aug"] == 1
    # the prompt's insertion plus at most one more; uncapped, the same answers up to the cap, so as many or more
    assert 1 <= rows["w_cap1"]["insertions_per_answer"] <= 2
    assert rows["w"]["insertions_per_answer"] >= rows["w_cap1"]["insertions_per_answer"]

    # A folder without a trained trigger given as --weaver-trigger, or a folder that is not a memory,
    # fails before any row runs (the model path is never even read).
    for flags, error in (
        ({"weaver_trigger": str(tmp_path / "mem")}, "has no trained trigger"),
        ({"weaver": [f"w={tmp_path / 'mem'}", f"x={tmp_path}"]}, "not a latent memory checkpoint"),
    ):
        with pytest.raises(MemlmError, match=error):
            run_memgen_bench(str(tmp_path / "absent"), "chain_sum_short", 3, **flags)


def test_a_request_without_memory_joining_a_batch_that_uses_one_is_left_alone():
    """A memory's hook serves only its own requests, also when others join after it exists."""
    engine = tiny_engine()
    memory = _memory(engine)
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12, logprobs=0)
    alone = engine.generate("later, plain", params)
    engine.add_request("first, plain", params)
    engine.add_request("with memory, then", params, memory=memory)
    engine.step()
    late = engine.add_request("later, plain", params)
    while engine.has_unfinished:
        engine.step()
    got = late.completion()
    assert not got.insertions and got.token_ids == alone.token_ids
    assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_an_rl_run_stopped_before_its_first_checkpoint_resumes_its_screening_only(tmp_path):
    from memlm.train.loop import CHECKPOINT, TrainConfig
    from memlm.train.rollouts import loop_config

    run = TrainConfig(out_dir=str(tmp_path), steps=10, resume=True)
    assert loop_config(run).out_dir == str(tmp_path / "train")
    assert loop_config(run).resume is False  # screening.json only: the steps start afresh
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / CHECKPOINT).write_bytes(b"")
    assert loop_config(run).resume is True  # a checkpoint: the loop resumes from it
    assert loop_config(TrainConfig(out_dir=str(tmp_path), steps=10)).resume is False
