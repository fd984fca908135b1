"""A GPT-2-shaped decoder-only transformer built from torch primitives, with a slot KV cache.

Random seeded weights (no downloads): the engine measures how a model of this shape runs,
not what it says. The KV cache is preallocated and keeps running sequences COMPACTED in
slots 0..n-1, so a decode step over n sequences attends over the view `cache[:, :n]`
without a gather; when a sequence leaves, the last occupied slot is copied into its place.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import InputError

# Eager decode attends over the longest context in the batch rounded up to this many
# positions, so a growing batch reuses the same few shapes.
DECODE_CTX_ROUND = 64


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of the decoder."""

    name: str
    layers: int
    d_model: int
    heads: int
    vocab: int
    max_context: int
    tied: bool = True
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for f in ("layers", "d_model", "heads", "vocab", "max_context", "mlp_ratio"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model {self.name!r}: {f} must be a positive integer, got {v!r}")
        if self.d_model % self.heads:
            raise ValueError(f"model {self.name!r}: d_model {self.d_model} is not divisible by heads {self.heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def num_params(self) -> int:
        d, h = self.d_model, self.mlp_ratio * self.d_model
        per_layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
        head = 0 if self.tied else d * self.vocab
        return self.vocab * d + self.max_context * d + self.layers * per_layer + 2 * d + head

    def weight_bytes(self, elem_bytes: int) -> int:
        return self.num_params() * elem_bytes

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        """K and V of one position across all layers."""
        return 2 * self.layers * self.d_model * elem_bytes

    def to_dict(self) -> dict[str, int | str | bool]:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    "gpt2-small": ModelConfig("gpt2-small", layers=12, d_model=768, heads=12, vocab=50257, max_context=2048),
    "tiny": ModelConfig("tiny", layers=2, d_model=64, heads=4, vocab=512, max_context=512),
}


def model_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; known models: {sorted(PRESETS)}") from None


SDPA_BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def transient_bytes(
    cfg: ModelConfig, batch: int, length: int, elem_bytes: int, backend: str, decode: bool = False
) -> int:
    """An estimate of the activation memory of one forward (why: the CPU has no allocator
    counters, and a memory cap on the CPU is simulated from this figure).

    Prefill: `batch` sequences of `length` tokens. Decode: `batch` rows of one token against
    `length` cached positions. Per layer, the live tensors peak at about 14 x tokens x d_model
    (residual, qkv, attention output, the 4x MLP hidden and its GELU); the math kernel also
    materialises the scores and their softmax; the logits are fp32 rows of the vocabulary.
    """
    tokens = batch * (1 if decode else length)
    act = 14 * tokens * cfg.d_model * elem_bytes
    if backend == "math":
        q_len = 1 if decode else length
        act += 2 * batch * cfg.heads * q_len * length * elem_bytes
    if decode:
        act += batch * length  # the boolean mask
    return int(act + batch * cfg.vocab * 4)


class KVCache:
    """Preallocated K and V of shape [layers, slots, heads, max_context, head_dim].

    Zero-initialised so that positions never written hold finite values (padding rows of
    a captured CUDA graph read them, masked or not).
    """

    def __init__(
        self,
        layers: int,
        slots: int,
        heads: int,
        max_context: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (layers, slots, heads, max_context, head_dim)
        with torch.no_grad():
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers, self.slots, self.heads, self.max_context, self.head_dim = shape

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.heads * self.head_dim * self.k.element_size()

    @torch.no_grad()
    def move(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy the sequence in slot `src` to slot `dst` (its first `length` positions)."""
        if src == dst:
            return
        n = self.max_context if length is None else max(0, min(length, self.max_context))
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]

    @torch.no_grad()
    def swap(self, a: int, b: int, length: int | None = None, scratch: int | None = None) -> None:
        """Exchange the sequences in slots `a` and `b` (their first `length` positions).

        With `scratch`, a slot no sequence holds, the exchange goes through it: three
        copies between views, nothing allocated, so a real allocator cannot run out half
        way and leave K exchanged but V not. Without, each half goes through a temporary
        copy (which allocates).
        """
        if a == b:
            return
        if scratch is not None:
            if scratch in (a, b):
                raise ValueError(f"scratch slot {scratch} must differ from the swapped slots {a} and {b}")
            self.move(a, scratch, length)
            self.move(b, a, length)
            self.move(scratch, b, length)
            return
        n = self.max_context if length is None else max(0, min(length, self.max_context))
        for t in (self.k, self.v):
            tmp = t[:, a, :, :n].clone()
            t[:, a, :, :n] = t[:, b, :, :n]
            t[:, b, :, :n] = tmp

    @torch.no_grad()
    def cast(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """New K and V holding the contents cast to `dtype`; the cache itself is untouched."""
        return self.k.to(dtype), self.v.to(dtype)

    def assign(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put K and V built by `cast` in place of the old ones."""
        if k.shape != self.k.shape or v.shape != self.v.shape or k.dtype != v.dtype:
            raise ValueError(f"K {tuple(k.shape)}/{k.dtype} and V {tuple(v.shape)}/{v.dtype} do not fit this cache")
        self.k, self.v = k, v

    @torch.no_grad()
    def to_dtype(self, dtype: torch.dtype) -> None:
        """Cast the contents in place of the old tensors (running sequences keep their KV).

        Both new tensors are built before either is assigned: out of memory on V, the cache
        is left whole in the old dtype (not K new and V old).
        """
        if dtype == self.k.dtype:
            return
        self.assign(*self.cast(dtype))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, cfg.mlp_ratio * d)
        self.fc2 = nn.Linear(cfg.mlp_ratio * d, d)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class DecoderLM(nn.Module):
    """Token + learned position embedding, pre-LN blocks with SDPA attention, final LN,
    tied (or untied) LM head. Only last-position logits are computed at prefill.

    `prefill_backends` / `decode_backends` pin the SDPA kernels (None: PyTorch chooses);
    the executor sets them from the attention knob after probing what runs.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = None if cfg.tied else nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.prefill_backends: list[SDPBackend] | None = None
        self.decode_backends: list[SDPBackend] | None = None
        self._init_weights(seed)
        self.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """GPT-2's init from a seeded CPU generator: identical weights on every device."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            else:
                std = resid_std if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    # -- helpers ----------------------------------------------------------------------
    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.ln_f(h)
        w = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return (h @ w.t()).float()

    def _split_heads(self, qkv: torch.Tensor, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.view(b, t, 3, self.cfg.heads, self.cfg.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [b, heads, t, head_dim]

    def _kernel(self, backends: list[SDPBackend] | None):
        return sdpa_kernel(backends) if backends else contextlib.nullcontext()

    # -- prefill ----------------------------------------------------------------------
    def prefill_logits(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        slots: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run right-padded prompts [B, Lmax]; write K/V into `cache` at `slots` (if given);
        return fp32 logits [B, vocab] of each prompt's last real position.

        Right padding is harmless under a causal mask: real positions never see the pads.
        """
        b, t = tokens.shape
        if t > self.cfg.max_context:
            raise ValueError(f"prefill of {t} tokens exceeds the model's max_context {self.cfg.max_context}")
        pos = torch.arange(t, device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)[None]
        with self._kernel(self.prefill_backends):
            for layer, blk in enumerate(self.blocks):
                q, k, v = self._split_heads(blk.qkv(blk.ln1(x)), b, t)
                if cache is not None:
                    cache.k[layer][slots, :, :t] = k
                    cache.v[layer][slots, :, :t] = v
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + blk.proj(o.transpose(1, 2).reshape(b, t, self.cfg.d_model))
                x = x + blk.mlp(x)
        last = x[torch.arange(b, device=x.device), lengths - 1]
        return self._logits(last)

    def prefill(
        self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        """Greedy next-token ids [B] after each prompt."""
        return self.prefill_logits(tokens, lengths, slots, cache).argmax(-1)

    # -- decode -----------------------------------------------------------------------
    def decode_logits(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        ctx: int | None = None,
        write_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token for each of the n sequences in slots 0..n-1, at `positions` [n].

        Attends over the first `ctx` cached positions with a boolean mask of the valid
        ones (position <= own position). `write_slots` (default 0..n-1) says where each
        row's new K/V goes: a captured graph sends its padding rows to a scratch slot.
        """
        n = tokens.shape[0]
        if ctx is None:
            ctx = round_ctx(int(positions.max()) + 1, cache.max_context)
        rows = write_slots if write_slots is not None else torch.arange(n, device=tokens.device)
        x = (self.wte(tokens) + self.wpe(positions))[:, None, :]
        mask = (torch.arange(ctx, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        with self._kernel(self.decode_backends):
            for layer, blk in enumerate(self.blocks):
                q, k, v = self._split_heads(blk.qkv(blk.ln1(x)), n, 1)
                kc, vc = cache.k[layer], cache.v[layer]
                kc[rows, :, positions] = k[:, :, 0]
                vc[rows, :, positions] = v[:, :, 0]
                o = F.scaled_dot_product_attention(q, kc[:n, :, :ctx], vc[:n, :, :ctx], attn_mask=mask)
                x = x + blk.proj(o.transpose(1, 2).reshape(n, 1, self.cfg.d_model))
                x = x + blk.mlp(x)
        return self._logits(x[:, 0])

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        ctx: int | None = None,
        write_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy next-token ids [n]."""
        return self.decode_logits(tokens, positions, cache, ctx, write_slots).argmax(-1)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def new_cache(self, slots: int, max_context: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        p = self.wte.weight
        ctx = max_context or self.cfg.max_context
        return KVCache(self.cfg.layers, slots, self.cfg.heads, ctx, self.cfg.head_dim, dtype or p.dtype, p.device)


def round_ctx(needed: int, limit: int) -> int:
    """Eager decode's attention span: `needed` rounded up to DECODE_CTX_ROUND, at most `limit`."""
    return min(limit, -(-needed // DECODE_CTX_ROUND) * DECODE_CTX_ROUND)


def resolve_kernel(
    requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool, context: int = 64
) -> tuple[str, str]:
    """The SDPA kernel that really runs for `requested`, and why it differs ('' if not).

    Probes SDPA with two heads of the real dtype and head size, at the shapes the engine
    calls it with up to `context` (the executor's max_context) positions: prefill of 8 and
    of `context` tokens, and masked decode of one query against the shortest and the full
    span, sliced from a larger cache as the engine's are (why: which kernel accepts a
    mask, a dtype, a head size or a sequence length depends on the build and the card, and
    a kernel refused mid-serving would end the run). Fallbacks: flash
    refuses an arbitrary mask on CUDA, so masked decode runs 'efficient'; the CPU has only
    flash and math, so 'efficient'/'cudnn' run 'flash' there.
    """
    if device.type == "cuda":
        chain = [requested] + [k for k in ("efficient", "flash", "math") if k != requested]
    else:
        chain = [requested] + [k for k in ("flash", "math") if k != requested]
    first_error = ""
    for name in chain:
        err = _probe(name, device, dtype, head_dim, masked, context)
        if not err:
            if name == requested:
                return name, ""
            why = first_error or f"{requested!r} is unavailable"
            what = "masked decode" if masked else "prefill"
            return name, f"{what} runs {name!r}: the {requested!r} kernel refused it ({why})"
        if not first_error:
            first_error = err
    raise RuntimeError(f"no SDPA kernel runs on {device} in {dtype}: {first_error}")


def _probe(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool, context: int) -> str:
    if device.type != "cuda" and name in ("efficient", "cudnn"):
        return f"the {name!r} kernel exists only on CUDA"
    if masked:  # one query per row against cache[:2, :, :span] of a 3-slot cache, as decode_logits
        cache = torch.randn(3, 2, context, head_dim, device=device, dtype=dtype)
        spans = sorted({min(DECODE_CTX_ROUND, context), context})
        calls = [
            (torch.randn(2, 2, 1, head_dim, device=device, dtype=dtype), cache[:2, :, :span], _probe_mask(span, device))
            for span in spans
        ]
    else:  # causal prefill of a short and of a full-context prompt
        prompts = [
            torch.randn(2, 2, t, head_dim, device=device, dtype=dtype) for t in sorted({min(8, context), context})
        ]
        calls = [(x, x, None) for x in prompts]
    try:
        with warnings.catch_warnings(), sdpa_kernel([SDPA_BACKENDS[name]]):
            warnings.simplefilter("ignore")
            for q, k, mask in calls:
                F.scaled_dot_product_attention(q, k, k, attn_mask=mask, is_causal=not masked)
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:160]
    return ""


def _probe_mask(span: int, device: torch.device) -> torch.Tensor:
    """Two rows' validity masks over `span` positions: one full, one of a single position."""
    valid = torch.ones(2, 1, 1, span, dtype=torch.bool, device=device)
    valid[1, ..., 1:] = False
    return valid
