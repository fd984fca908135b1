"""KV-cache correctness of the decoder: cached prefill + decode == a full recompute."""

from __future__ import annotations

import pytest
import torch

from autoopt.engine.model import (
    PRESETS,
    DecoderLM,
    KVCache,
    model_config,
    resolve_kernel,
    round_ctx,
    transient_bytes,
)
from autoopt.engine.model import SDPA_BACKENDS as B

CFG = model_config("tiny")
ATOL = 2e-4


@pytest.fixture(scope="module")
def model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(CFG, seed=3)


def reference_logits(model: DecoderLM, seq: list[int]) -> torch.Tensor:
    """Last-position logits of the whole sequence, recomputed without a cache."""
    t = torch.tensor([seq])
    return model.prefill_logits(t, torch.tensor([len(seq)]))[0]


def pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lmax = max(len(s) for s in seqs)
    toks = torch.full((len(seqs), lmax), 7, dtype=torch.long)  # pad id: anything
    for i, s in enumerate(seqs):
        toks[i, : len(s)] = torch.tensor(s)
    return toks, torch.tensor([len(s) for s in seqs])


def random_seqs(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(CFG.vocab, (n,), generator=g).tolist() for n in lengths]


def decode_all(model: DecoderLM, cache: KVCache, seqs: list[list[int]], toks: list[int]) -> torch.Tensor:
    """One decode step for sequences in slots 0..n-1; appends the fed tokens to `seqs`."""
    n = len(seqs)
    pos = torch.tensor([len(s) for s in seqs])
    for s, t in zip(seqs, toks, strict=True):
        s.append(t)
    return model.decode_logits(torch.tensor(toks), pos, cache, write_slots=torch.arange(n))


def test_presets_and_unknown_name() -> None:
    assert PRESETS["gpt2-small"].layers == 12 and PRESETS["gpt2-small"].d_model == 768
    assert PRESETS["gpt2-small"].vocab == 50257 and PRESETS["gpt2-small"].max_context == 2048
    with pytest.raises(ValueError, match="unknown model 'gpt3'.*tiny"):
        model_config("gpt3")
    assert CFG.num_params() == sum(p.numel() for p in DecoderLM(CFG).parameters())


def test_weights_are_seeded() -> None:
    a, b, c = DecoderLM(CFG, seed=1), DecoderLM(CFG, seed=1), DecoderLM(CFG, seed=2)
    assert torch.equal(a.blocks[0].qkv.weight, b.blocks[0].qkv.weight)
    assert not torch.equal(a.blocks[0].qkv.weight, c.blocks[0].qkv.weight)


@pytest.mark.parametrize("kernel", ["flash", "math"])
def test_prefill_then_decode_matches_full_recompute(model: DecoderLM, kernel: str) -> None:
    model.prefill_backends = model.decode_backends = [B[kernel]]
    try:
        seqs = random_seqs([5, 17, 64, 1], seed=11)  # ragged, one of a single token
        cache = model.new_cache(slots=4, max_context=128)
        toks, lens = pad(seqs)
        logits = model.prefill_logits(toks, lens, torch.arange(4), cache)
        for i, s in enumerate(seqs):  # padding does not leak into the real positions
            torch.testing.assert_close(logits[i], reference_logits(model, s), atol=ATOL, rtol=0)
        nxt = logits.argmax(-1).tolist()
        for _ in range(6):
            logits = decode_all(model, cache, seqs, nxt)
            for i, s in enumerate(seqs):
                ref = reference_logits(model, s)
                torch.testing.assert_close(logits[i], ref, atol=ATOL, rtol=0)
                assert int(logits[i].argmax()) == int(ref.argmax())
            nxt = logits.argmax(-1).tolist()
    finally:
        model.prefill_backends = model.decode_backends = None


def test_decode_after_compaction_of_a_middle_sequence(model: DecoderLM) -> None:
    seqs = random_seqs([9, 30, 14], seed=5)
    cache = model.new_cache(slots=3, max_context=64)
    toks, lens = pad(seqs)
    nxt = model.prefill(toks, lens, torch.arange(3), cache).tolist()
    nxt = decode_all(model, cache, seqs, nxt).argmax(-1).tolist()
    # the middle sequence leaves: the last one moves into slot 1 (one sequence copy)
    cache.move(2, 1, length=len(seqs[2]))
    seqs, nxt = [seqs[0], seqs[2]], [nxt[0], nxt[2]]
    for _ in range(3):
        logits = decode_all(model, cache, seqs, nxt)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i], reference_logits(model, s), atol=ATOL, rtol=0)
        nxt = logits.argmax(-1).tolist()


def test_swap_and_prefill_into_chosen_slots(model: DecoderLM) -> None:
    seqs = random_seqs([12, 20], seed=8)
    cache = model.new_cache(slots=4, max_context=64)
    toks, lens = pad(seqs)
    nxt = model.prefill(toks, lens, torch.tensor([1, 0]), cache).tolist()  # seq0 -> slot 1
    cache.swap(0, 1, length=20)  # now seq0 in slot 0, seq1 in slot 1
    logits = decode_all(model, cache, seqs, nxt)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(logits[i], reference_logits(model, s), atol=ATOL, rtol=0)


def test_padding_rows_to_a_scratch_slot_leave_real_slots_alone(model: DecoderLM) -> None:
    """A captured graph runs a padded bucket: extra rows write K/V to a scratch slot only."""
    seqs = random_seqs([10, 6], seed=2)
    cache = model.new_cache(slots=5, max_context=64)  # slot 4 is the scratch
    toks, lens = pad(seqs)
    nxt = model.prefill(toks, lens, torch.arange(2), cache).tolist()
    before = cache.k[:, 2:4].clone()
    pos = torch.tensor([10, 6, 0, 0])
    out = model.decode_logits(torch.tensor(nxt + [0, 0]), pos, cache, ctx=64, write_slots=torch.tensor([0, 1, 4, 4]))
    assert torch.equal(cache.k[:, 2:4], before)
    for i, (s, t) in enumerate(zip(seqs, nxt, strict=True)):
        torch.testing.assert_close(out[i], reference_logits(model, s + [t]), atol=ATOL, rtol=0)


def test_cache_cast_keeps_contents(model: DecoderLM) -> None:
    cache = model.new_cache(slots=2, max_context=32)
    toks, lens = pad(random_seqs([8, 8], seed=1))
    model.prefill(toks, lens, torch.arange(2), cache)
    k32 = cache.k.clone()
    cache.to_dtype(torch.bfloat16)
    assert cache.k.dtype == torch.bfloat16 and cache.v.dtype == torch.bfloat16
    assert torch.equal(cache.k, k32.to(torch.bfloat16))
    assert cache.nbytes == k32.numel() * 2 * 2


def test_prefill_rejects_sequences_beyond_max_context(model: DecoderLM) -> None:
    toks = torch.zeros(1, CFG.max_context + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_context"):
        model.prefill_logits(toks, torch.tensor([CFG.max_context + 1]))


def test_cpu_kernel_resolution_reports_fallbacks() -> None:
    cpu = torch.device("cpu")
    assert resolve_kernel("flash", cpu, torch.float32, 16, masked=True) == ("flash", "")
    assert resolve_kernel("math", cpu, torch.bfloat16, 16, masked=False) == ("math", "")
    kernel, why = resolve_kernel("efficient", cpu, torch.float32, 16, masked=True)
    assert kernel == "flash" and "efficient" in why and "only on CUDA" in why


def test_kernel_probe_reaches_the_engines_full_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that runs a short probe but refuses the spans the engine attends over (a
    version- or card-specific limit on sequence length) must not be picked: the refusal
    would come mid-serving, as an error no step survives. Here flash refuses more than 256
    key positions, as such a build would (sdpa_kernel, left real, says which kernel is pinned)."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, is_causal=False):  # noqa: ANN001, ANN202
        flash_pinned = torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
        if flash_pinned and k.shape[2] > 256:
            raise RuntimeError("No available kernel. Aborting execution.")
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    cpu = torch.device("cpu")
    for masked in (True, False):
        assert resolve_kernel("flash", cpu, torch.float32, 16, masked=masked, context=256) == ("flash", "")
        kernel, why = resolve_kernel("flash", cpu, torch.float32, 16, masked=masked, context=512)
        assert kernel == "math" and "No available kernel" in why


def test_helpers() -> None:
    assert round_ctx(1, 512) == 64 and round_ctx(64, 512) == 64 and round_ctx(65, 512) == 128
    assert round_ctx(500, 480) == 480
    flash = transient_bytes(CFG, 8, 256, 4, "flash")
    assert transient_bytes(CFG, 8, 256, 4, "math") > flash > transient_bytes(CFG, 8, 128, 4, "flash")
    assert CFG.kv_bytes_per_token(2) == 2 * 2 * 64 * 2
