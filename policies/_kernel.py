"""The body of `RuntimePolicy.act`: templates rebound to each policy's preallocated buffers.

Why templates: a closure copies its free variables into the frame on every call (~0.2 us for
the ~25 buffers here, 5% of a call), while global names are read from a dict with cached
lookups. So `bind` makes, per policy, a function with these templates' code and a globals dict
holding that policy's buffers and ufuncs. The module-level names below are placeholders that
only document what `bind` must supply; they are never used from this module.

The arithmetic is described in `RuntimePolicy._build_matrices`.
"""

from __future__ import annotations

import builtins
from types import FunctionType
from typing import Any

# ---- supplied by bind (placeholders) ----
ndarray: Any = None  # np.ndarray
shape: Any = None  # (obs_dim,)
bad_obs: Any = None  # coerce-or-refuse for inputs that are not a float array of `shape`
mean: Any = None  # None when the policy has no observation normalisation
std: Any = None
lo: Any = None
hi: Any = None
sub: Any = None
div: Any = None
clip: Any = None
x64: Any = None  # float64 scratch for normalisation
x_view: Any = None  # the first layer's input: x_aug[:obs_dim]
x_aug: Any = None  # float32 [obs_dim + 1], last entry 1 (the folded bias)
dot: Any = None
act_fn: Any = None  # tanh or relu, in place
hidden: Any = None  # ((matrix, out view, augmented buffer), ...) per hidden layer
m0: Any = None
v0: Any = None
b0: Any = None
m1: Any = None
v1: Any = None
b1: Any = None
head_m: Any = None
logits: Any = None  # float32 [2 * heads * widest]
logits2: Any = None  # the same as [2 * heads, widest]
mask_bias: Any = None  # checks a new mask (shape, no empty head) and caches its bias
mask_cache: Any = None  # mask bytes -> bias
bool_dtype: Any = None
add: Any = None
argmax_into: Any = None  # logits2.argmax, bound once
picks: Any = None  # int64 [2 * heads]: plain argmaxes, then the bonus rows' argmaxes
picks_plain: Any = None  # picks[:heads]
halves: Any = None  # picks viewed as two byte strings
near_tie: Any = None  # the slow path when the halves differ

NAN_MESSAGE = "observation contains NaN (or values that make the network's output NaN)"


def act_two_hidden(obs: Any, mask: Any = None) -> Any:
    """act for the usual two hidden layers, unrolled (`out` passed positionally: keywords cost ~40 ns a call)."""
    if obs.__class__ is not ndarray or obs.shape != shape:
        obs = bad_obs(obs)
    if mean is None:
        x_view[...] = obs
    else:
        sub(obs, mean, x64)
        div(x64, std, x64)
        clip(x64, lo, hi, x64)
        x_view[...] = x64
    dot(x_aug, m0, v0)
    act_fn(v0, v0)
    dot(b0, m1, v1)
    act_fn(v1, v1)
    dot(b1, head_m, logits)
    # A NaN anywhere in the input reaches every logit (NaN * w is NaN, tanh and max keep it).
    s = logits.item(0)
    if s != s:
        raise ValueError(NAN_MESSAGE)
    if mask is not None:
        # 0 / -inf added to the logits; a mask seen before costs a bytes lookup, a new one is checked first
        bias = mask_cache.get(mask.tobytes()) if mask.__class__ is ndarray and mask.dtype is bool_dtype else None
        if bias is None:
            bias = mask_bias(mask)
        add(logits, bias, logits)
    argmax_into(1, picks)
    if halves[0] != halves[1]:
        return near_tie()
    return picks_plain.copy()


def act_any_depth(obs: Any, mask: Any = None) -> Any:
    """act for any number of hidden layers."""
    if obs.__class__ is not ndarray or obs.shape != shape:
        obs = bad_obs(obs)
    if mean is None:
        x_view[...] = obs
    else:
        sub(obs, mean, x64)
        div(x64, std, x64)
        clip(x64, lo, hi, x64)
        x_view[...] = x64
    prev = x_aug
    for m, v, buf in hidden:
        dot(prev, m, v)
        act_fn(v, v)
        prev = buf
    dot(prev, head_m, logits)
    s = logits.item(0)
    if s != s:
        raise ValueError(NAN_MESSAGE)
    if mask is not None:
        # 0 / -inf added to the logits; a mask seen before costs a bytes lookup, a new one is checked first
        bias = mask_cache.get(mask.tobytes()) if mask.__class__ is ndarray and mask.dtype is bool_dtype else None
        if bias is None:
            bias = mask_bias(mask)
        add(logits, bias, logits)
    argmax_into(1, picks)
    if halves[0] != halves[1]:
        return near_tie()
    return picks_plain.copy()


def bind(template: FunctionType, names: dict[str, Any], doc: str | None = None) -> FunctionType:
    """`template`'s code running on `names` as its globals."""
    namespace = {"__builtins__": builtins, "NAN_MESSAGE": NAN_MESSAGE, **names}
    fn = FunctionType(template.__code__, namespace, "act", template.__defaults__)
    fn.__doc__ = doc
    fn.__qualname__ = "RuntimePolicy.act"
    return fn
