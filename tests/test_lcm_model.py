"""The LCM model: causality, incremental = parallel, the grids, the loop, safety, and the Engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memlm.errors import InvalidRequestError, ModelFormatError
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams
from memlm.lcm.config import GRID_NAMES, LCMConfig
from memlm.lcm.grids import (
    BindingGrid,
    ContrastiveGrid,
    HyperbolicGrid,
    LowRankGrid,
    ManifoldGrid,
    SparseGrid,
    bind,
    expmap0,
    unbind,
    unitary,
)
from memlm.lcm.memory import CodebookMemory
from memlm.lcm.model import LCMModel

VOCAB = 300


def tiny_lcm(seed: int = 0, **overrides) -> LCMModel:
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_heads=2,
        encoder_layers=1,
        decoder_layers=2,
        intermediate_size=48,
        z_dim=16,
        codes=8,
        lowrank_rank=4,
        binding_roles=4,
        eos_token_ids=(0,),
    )
    model = LCMModel(LCMConfig(**{**shape, **overrides})).eval()
    if model.has_memory:  # a trained bridge is not zero: make z_q matter to the logits
        torch.nn.init.normal_(model.bridge.weight, std=0.3)
    return model


# ---- causality and incremental decoding -------------------------------------------------------


@pytest.mark.parametrize("memory", ["grids", "continuous", "single", "none"])
def test_a_future_token_changes_nothing_before_it(memory):
    model = tiny_lcm(memory=memory)
    ids = torch.randint(1, VOCAB, (2, 24))
    changed = ids.clone()
    changed[:, 15] = (changed[:, 15] + 7) % VOCAB
    with torch.no_grad():
        logits, aux = model(ids)
        logits2, aux2 = model(changed)
    assert torch.equal(logits[:, :15], logits2[:, :15])
    assert not torch.allclose(logits[:, 15:], logits2[:, 15:])
    if memory != "none":
        assert torch.equal(aux["z"][:, :15], aux2["z"][:, :15])  # the encoder
        valid = torch.ones_like(ids, dtype=torch.bool)
        _, z_q, _, _ = model.remember(aux["z"], valid)
        _, z_q2, _, _ = model.remember(aux2["z"], valid)
        assert torch.equal(z_q[:, :15], z_q2[:, :15])  # the grids and the loop


@pytest.mark.parametrize("memory", ["grids", "continuous", "none"])
def test_incremental_decoding_equals_the_parallel_pass_at_every_position(memory):
    model = tiny_lcm(memory=memory, reencode_period=0)
    ids = torch.randint(1, VOCAB, (3, 40))
    with torch.no_grad():
        full = model(ids)[0]
        state = model.new_state(3)
        positions = torch.arange(40)[None].expand(3, -1)
        steps = [model.logits(model.forward_tokens(ids[:, :11], positions[:, :11], state))]
        for t in range(11, 40):
            steps.append(model.logits(model.forward_tokens(ids[:, t : t + 1], positions[:, t : t + 1], state)))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


# ---- the bounded decoder (decoder_window) ------------------------------------------------------------


def test_a_bounded_decoder_is_the_unbounded_one_restarted_at_every_segment():
    """The reference: with the view cut every W tokens, the decoder alone must give exactly what
    the same weights give when run on each segment as a text of its own."""
    window, ids = 8, torch.randint(1, VOCAB, (2, 29))  # 29: a last, partial segment
    bounded = tiny_lcm(memory="none", decoder_window=window)
    unbounded = tiny_lcm(memory="none")
    unbounded.load_state_dict(bounded.state_dict())
    with torch.no_grad():
        cut = bounded(ids)[0]
        pieces = torch.cat([unbounded(ids[:, s : s + window])[0] for s in range(0, 29, window)], 1)
        whole = unbounded(ids)[0]
    assert torch.allclose(cut, pieces, atol=1e-5, rtol=0)
    assert torch.equal(cut[:, :window], whole[:, :window])  # the first segment is not cut
    assert not torch.allclose(cut[:, window:], whole[:, window:])


@pytest.mark.parametrize("memory", ["grids", "none"])
def test_a_bounded_decoder_sees_the_past_only_through_z(memory):
    model = tiny_lcm(memory=memory, decoder_window=8)
    ids = torch.randint(1, VOCAB, (2, 24))
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] + 7) % VOCAB  # a token of the first segment
    with torch.no_grad():
        logits, changed_logits = model(ids)[0], model(changed)[0]
    later_equal = torch.equal(logits[:, 8:], changed_logits[:, 8:])
    assert later_equal == (memory == "none")  # the decoder alone forgets it; z carries it


@pytest.mark.parametrize("chunks", [[1] * 30, [11, 1, 1, 9, 8], [30], [7, 16, 7]])
def test_a_bounded_decoder_decodes_incrementally_as_in_parallel(chunks):
    """Chunks that start, end and span the cuts (W = 8) give the parallel pass's logits."""
    model = tiny_lcm(decoder_window=8, reencode_period=0)
    ids = torch.randint(1, VOCAB, (2, 30))
    with torch.no_grad():
        full = model(ids)[0]
        state, outs, start = model.new_state(2), [], 0
        for n in chunks:
            positions = torch.arange(start, start + n)[None].expand(2, -1)
            outs.append(model.logits(model.forward_tokens(ids[:, start : start + n], positions, state)))
            start += n
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-4, rtol=0)


def test_a_bounded_decoder_right_padded_prefill_equals_each_row_alone():
    model = tiny_lcm(decoder_window=4, reencode_period=0)
    a, b = torch.randint(1, VOCAB, (1, 11)), torch.randint(1, VOCAB, (1, 6))
    ids = torch.zeros(2, 11, dtype=torch.long)
    ids[0], ids[1, :6] = a[0], b[0]
    positions = torch.full((2, 11), -1)
    positions[0], positions[1, :6] = torch.arange(11), torch.arange(6)
    with torch.no_grad():
        state = model.new_state(2)
        model.forward_tokens(ids, positions, state)
        steps = [model.forward_tokens(torch.tensor([[5], [6]]), torch.tensor([[11], [6]]), state)]
        steps.append(model.forward_tokens(torch.tensor([[7], [8]]), torch.tensor([[12], [7]]), state))
        alone_a = model(torch.cat((a, torch.tensor([[5, 7]])), 1))[0]
        alone_b = model(torch.cat((b, torch.tensor([[6, 8]])), 1))[0]
    assert torch.allclose(model.logits(steps[1][0, 0]), alone_a[0, 12], atol=1e-5)
    assert torch.allclose(model.logits(steps[0][1, 0]), alone_b[0, 6], atol=1e-5)
    assert torch.allclose(model.logits(steps[1][1, 0]), alone_b[0, 7], atol=1e-5)


def test_the_contrastive_loss_trains_the_encoder_and_the_values_not_the_keys():
    model = tiny_lcm()
    ids = torch.randint(1, VOCAB, (2, 24))
    z = model.encoder(ids, torch.ones_like(ids, dtype=torch.bool))
    model.memory.regularisers(z)["contrastive"].backward()
    grid = model.memory.grids[GRID_NAMES.index("contrastive")]
    assert grid.values.grad.abs().sum() > 0 and grid.keys.grad is None
    assert model.encoder.to_z.weight.grad.abs().sum() > 0


def test_the_spread_term_is_zero_for_spread_out_z_and_pushes_collapsed_z_apart():
    model = tiny_lcm()
    spread_out = torch.randn(2, 64, 16) * 3
    collapsed = (torch.randn(16) + 0.01 * torch.randn(2, 64, 16)).requires_grad_()
    assert float(model.memory.regularisers(spread_out)["spread"]) == 0.0
    loss = model.memory.regularisers(collapsed)["spread"]
    loss.backward()
    assert float(loss) > 0.9
    moved = collapsed.detach() - 0.1 * collapsed.grad  # a step down the gradient spreads z
    assert float(moved.reshape(-1, 16).std(0).mean()) > float(collapsed.detach().reshape(-1, 16).std(0).mean())


def test_a_right_padded_prefill_equals_each_row_alone():
    model = tiny_lcm()
    a, b = torch.randint(1, VOCAB, (1, 9)), torch.randint(1, VOCAB, (1, 4))
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0], ids[1, :4] = a[0], b[0]
    positions = torch.full((2, 9), -1)
    positions[0], positions[1, :4] = torch.arange(9), torch.arange(4)
    with torch.no_grad():
        state = model.new_state(2)
        hidden = model.forward_tokens(ids, positions, state)
        nxt = torch.tensor([[5], [6]])
        step = model.forward_tokens(nxt, torch.tensor([[9], [4]]), state)
        alone_b = model(torch.cat((b, torch.tensor([[6]])), 1))[0]
    assert torch.allclose(model.logits(hidden[1, 3]), alone_b[0, 3], atol=1e-5)
    assert torch.allclose(model.logits(step[1, 0]), alone_b[0, 4], atol=1e-5)
    assert state.lengths.tolist() == [10, 5]


def test_reencoding_resets_the_drift_of_low_precision_sums():
    ids = torch.randint(1, VOCAB, (2, 96), generator=torch.Generator().manual_seed(0))

    def drift(period: int) -> tuple[torch.Tensor, int]:
        model = tiny_lcm(reencode_period=period)
        with torch.no_grad():
            full = model(ids)[0]
            state = model.new_state(2, state_dtype=torch.bfloat16)  # sums accumulate in bfloat16
            outs = [
                model.logits(model.forward_tokens(ids[:, t : t + 1], torch.full((2, 1), t), state)) for t in range(96)
            ]
        return (torch.cat(outs, 1) - full).abs().amax(-1), state.reencodes

    never, none_done = drift(0)
    often, done = drift(8)
    assert none_done == 0 and done == 2 * 11  # both rows, every 8 tokens after the first (a full encode)
    # Medians: any tiny difference can move a z across a code boundary, and then that token's logits
    # jump whatever the precision (seen on 3 of 8 texts, either way); the typical token shows the drift.
    assert float(never[:, 48:].median()) > 2 * float(often[:, 48:].median())  # it grows without re-encoding
    assert float(often.median()) < 1e-4


def test_reencoding_counts_from_the_last_full_encode():
    """A long prompt is read in one parallel pass: that is a full encode, not a reason to re-encode."""
    model = tiny_lcm(reencode_period=8)
    ids = torch.randint(1, VOCAB, (1, 60))
    with torch.no_grad():
        state = model.new_state(1)
        model.forward_tokens(ids[:, :40], torch.arange(40)[None], state)
        assert state.reencodes == 0 and state.since_encode.tolist() == [0]
        for t in range(40, 60):
            model.forward_tokens(ids[:, t : t + 1], torch.full((1, 1), t), state)
    assert state.reencodes == 2 and state.since_encode.tolist() == [4]  # at 48 and 56 tokens


def test_state_size_does_not_grow_with_the_text():
    model = tiny_lcm(reencode_period=0)
    state = model.new_state(1)
    before = state.recurrent_bytes_per_sequence()
    with torch.no_grad():
        model.forward_tokens(torch.randint(1, VOCAB, (1, 300)), torch.arange(300)[None], state)
    assert state.recurrent_bytes_per_sequence() == before and state.history is None


# ---- grids --------------------------------------------------------------------------------------


def _set(param, value):
    with torch.no_grad():
        param.copy_(value)


def test_euclidean_grids_retrieve_the_nearest_code():
    codes = torch.eye(4) * 2.0
    z = torch.tensor([[1.9, 0.1, 0.0, 0.0], [0.0, 0.2, 0.0, 2.2]])
    sparse = SparseGrid(4, 4, threshold=0.05)
    _set(sparse.codes, codes)
    r = sparse.retrieve(z)
    assert r.code.tolist() == [0, 3] and torch.allclose(r.q, F.softshrink(codes, 0.05)[[0, 3]])
    lowrank = LowRankGrid(4, 4, rank=4)
    _set(lowrank.mix, torch.eye(4))
    _set(lowrank.basis, codes)
    assert lowrank.retrieve(z).code.tolist() == [0, 3]
    contrastive = ContrastiveGrid(4, 4)
    _set(contrastive.keys, codes)
    _set(contrastive.values, -codes)
    r = contrastive.retrieve(z)
    assert r.code.tolist() == [0, 3] and torch.allclose(r.q, -codes[[0, 3]])  # the key's value comes back


def test_manifold_grid_slides_along_the_tangent_plane():
    grid = ManifoldGrid(3, 2, tangent_dims=1)
    _set(grid.codes, torch.tensor([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]))
    _set(grid.tangents, torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]]))
    r = grid.retrieve(torch.tensor([[0.7, 0.3, -0.2]]))
    assert r.code.tolist() == [0]
    assert torch.allclose(r.q, torch.tensor([[0.7, 0.0, 0.0]]), atol=1e-6)  # the code plus the in-plane part
    assert torch.allclose(r.distance, torch.tensor([(0.3**2 + 0.2**2) ** 0.5]))


def test_hyperbolic_grid_quantizes_coarse_then_the_residual():
    grid = HyperbolicGrid(2, 4, scale=1.0)
    _set(grid.coarse, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    _set(grid.fine, torch.tensor([[0.0, 0.3], [0.0, -0.3]]))
    z = torch.tensor([[1.0, 0.25], [-1.0, -0.35]])
    r = grid.retrieve(z)
    assert r.code.tolist() == [0 * 2 + 0, 1 * 2 + 1]
    # The reconstruction is the Mobius sum of the two codes, mapped back: close to z, closer than the coarse code.
    coarse_only = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert ((r.q - z).norm(dim=-1) < (coarse_only - z).norm(dim=-1)).all()
    assert float(expmap0(z).norm(dim=-1).max()) < 1


def test_hrr_unbinding_recovers_what_was_bound():
    torch.manual_seed(0)
    dim = LCMConfig(vocab_size=10).z_dim
    a = torch.randn(dim)
    b = unitary(torch.rand(dim // 2 + 1) * 6.28, dim)
    assert F.cosine_similarity(unbind(bind(a, b), b), a, dim=0) > 0.9
    gaussian = torch.randn(dim) / dim**0.5  # a non-unitary key: the classic approximate inverse
    assert F.cosine_similarity(unbind(bind(a, gaussian), gaussian), a, dim=0) > 0.5


def test_binding_grid_returns_the_clean_rebound_pair():
    torch.manual_seed(1)
    grid = BindingGrid(32, 6, roles=3)
    roles, fillers = grid.roles(), grid.fillers.detach()
    z = bind(roles[2], fillers[4])[None] + 0.01 * torch.randn(1, 32)
    r = grid.retrieve(z)
    assert r.code.tolist() == [2 * 6 + 4]
    assert torch.allclose(r.q, bind(roles[2], fillers[4])[None], atol=1e-5)


# ---- the reasoning loop and safety ---------------------------------------------------------------


def test_the_loop_stops_on_convergence_and_on_the_step_limit():
    model = tiny_lcm(max_loop_steps=6, converge_threshold=1e9)
    z = torch.randn(5, 16)
    _, trace, _ = model.memory(z)
    assert trace.steps.tolist() == [1] * 5  # everything counts as converged after one step
    model.set_runtime(converge_threshold=0.0)
    _, trace, _ = model.memory(z)
    assert trace.steps.tolist() == [6] * 5  # never converges: the limit stops it
    model.set_runtime(converge_threshold=0.02, grids_off=("binding", "sparse"))
    _, trace, _ = model.memory(z)
    assert not trace.grids[:, [GRID_NAMES.index("binding"), GRID_NAMES.index("sparse")]].any()


def test_a_fixed_point_converges_at_once():
    """A z that already is a retrieved code mix moves by less than the threshold: one more step at most."""
    memory = CodebookMemory(LCMConfig(vocab_size=10, z_dim=8, codes=4, memory="single"))
    code = memory.grids[0].codes.detach()[2:3]
    z_q, trace, _ = memory(code)
    assert torch.allclose(z_q, code) and trace.distance.item() == pytest.approx(0, abs=1e-6)


def test_value_grid_flags_and_corrects():
    model = tiny_lcm()
    safety = model.memory.safety
    anchor = torch.zeros(1, 16)
    safety.add_value(anchor, allowed=False, radius=torch.tensor([1.0]))
    inside, outside = torch.full((1, 16), 0.05), torch.full((1, 16), 1.0)
    z, flagged = safety.value(torch.cat((inside, outside)), correct=True)
    assert flagged.tolist() == [True, False]
    assert z[0].norm() == pytest.approx(1.001, abs=1e-4) and torch.equal(z[1], outside[0])
    z, flagged = safety.value(inside, correct=False)
    assert flagged.tolist() == [True] and torch.equal(z, inside)


def engine_for(model: LCMModel) -> Engine:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from memlm.tokenizer import Tokenizer

    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Engine(model, Tokenizer(backend, eos_token="w0"), "tiny-lcm")


def prompt(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def test_a_planted_danger_code_halts_generation():
    from memlm.lcm.planting import text_codes

    model = tiny_lcm()
    engine = engine_for(model)
    danger = prompt(5, 17, 42, 99, 7)
    codes, radii = text_codes(model, engine.tokenizer, [danger])
    model.memory.safety.add_danger(codes, radii)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    halted, fine = engine.generate([danger, prompt(3, 8, 120)], params)
    assert halted.finish_reason == "halted" and halted.token_ids == []
    assert fine.finish_reason == "length" and len(fine.token_ids) == 6
    streamed = [d for d in engine.stream(danger, params)]
    assert streamed[-1].finish_reason == "halted"
    model.set_runtime(safety=False)
    assert engine.generate(danger, params).finish_reason == "length"


def test_engine_batch_equals_one_by_one_and_traces_each_token():
    model = tiny_lcm()
    engine = engine_for(model)
    prompts = [prompt(4, 9, 200, 31, 6, 7, 8), prompt(12), prompt(77, 78, 79)]
    for params in (
        SamplingParams(max_new_tokens=8, ignore_eos=True),
        SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True),
    ):
        batched = engine.generate(prompts, params)
        for p, b in zip(prompts, batched, strict=True):
            alone = engine.generate(p, params)
            assert alone.token_ids == b.token_ids
    out = batched[0]
    assert len(out.memory_trace) == 8
    assert all(1 <= t["steps"] <= model.config.max_loop_steps and t["grids"] for t in out.memory_trace)


def test_kv_policies_and_latent_memory_need_a_kv_cache():
    from memlm.cache.policies import make_policy

    engine = engine_for(tiny_lcm())
    with pytest.raises(InvalidRequestError, match="constant-size recurrent state"):
        engine.generate(prompt(1, 2), kv_policy=make_policy("sinks", 16))
    assert engine.generate(prompt(1, 2), SamplingParams(max_new_tokens=2), kv_policy=make_policy("full"))


# ---- checkpoints ------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_corrupt_folders(tmp_path):
    from memlm.formats.loading import load_model
    from memlm.lcm.checkpoint import load_lcm, save_lcm

    model = tiny_lcm()
    model.memory.safety.add_danger(torch.ones(1, 16), torch.tensor([0.5]))
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    engine_for(model).tokenizer.save(tokenizer_dir)
    save_lcm(tmp_path / "m", model, tokenizer_dir, {"stage": 1})
    loaded = load_lcm(tmp_path / "m")
    ids = torch.randint(1, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert loaded.memory.safety.danger_codes.shape == (1, 16)
    engine = load_model(str(tmp_path / "m"))  # a model path like any other
    assert isinstance(engine.model, LCMModel) and engine.num_parameters > 0
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelFormatError, match="cannot read the weights"):
        load_lcm(tmp_path / "m")
    save_lcm(tmp_path / "m2", tiny_lcm(hidden_size=16, intermediate_size=24), tokenizer_dir)
    config = (tmp_path / "m2" / "config.json").read_text().replace('"hidden_size": 16', '"hidden_size": 32')
    (tmp_path / "m2" / "config.json").write_text(config)
    with pytest.raises(ModelFormatError, match="shape"):
        load_lcm(tmp_path / "m2")
