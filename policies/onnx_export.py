"""Optional ONNX export of the runtime actor, for serving stacks that prefer onnxruntime.

The graph is built from the exported `weights.npz` and manifest with the onnx helper API (no
torch): normalisation in float64 as VecNormalize does it, the cast to float32, the Linear
layers as Gemm, and one ArgMax per action head. Input `obs` is float64 `[N, obs_dim]`; output
`action` is int64 `[N, heads]`. `check_onnx` compares it with `RuntimePolicy` on onnxruntime.
ONNX's ArgMax takes the plain argmax of the logits; RuntimePolicy also reproduces SB3's rounding
of near ties (logits within ~1e-7), so the two can differ on such observations (a few per million).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .runtime import RuntimePolicy

OPSET = 17


def build_onnx(policy: RuntimePolicy) -> Any:
    """The actor as an `onnx.ModelProto` (checked with onnx.checker)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = policy.manifest
    inits: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    x = "obs"
    norm = m.get("obs_norm")
    if norm is not None:
        mean = np.asarray(norm["mean"], dtype=np.float64)
        std = np.sqrt(np.asarray(norm["var"], dtype=np.float64) + float(norm["epsilon"]))
        clip = float(norm["clip_obs"])
        nodes.append(helper.make_node("Sub", [x, const("obs_mean", mean)], ["obs_centred"]))
        nodes.append(helper.make_node("Div", ["obs_centred", const("obs_std", std)], ["obs_scaled"]))
        nodes.append(
            helper.make_node(
                "Clip",
                ["obs_scaled", const("clip_lo", np.array(-clip)), const("clip_hi", np.array(clip))],
                ["obs_norm"],
            )
        )
        x = "obs_norm"
    nodes.append(helper.make_node("Cast", [x], ["x_0"], to=TensorProto.FLOAT))
    x = "x_0"
    arrays = _layer_arrays(policy)
    activation = {"tanh": "Tanh", "relu": "Relu"}[m["activation"]]
    for i, (w, b) in enumerate(arrays[:-1]):
        nodes.append(helper.make_node("Gemm", [x, const(f"w_{i}", w), const(f"b_{i}", b)], [f"z_{i}"], transB=1))
        nodes.append(helper.make_node(activation, [f"z_{i}"], [f"x_{i + 1}"]))
        x = f"x_{i + 1}"
    w, b = arrays[-1]
    nodes.append(helper.make_node("Gemm", [x, const("w_head", w), const("b_head", b)], ["logits"], transB=1))
    heads = []
    axes = const("axis_1", np.array([1], dtype=np.int64))
    start = 0
    for i, n in enumerate(policy.action_dims):
        s = const(f"start_{i}", np.array([start], dtype=np.int64))
        e = const(f"end_{i}", np.array([start + n], dtype=np.int64))
        nodes.append(helper.make_node("Slice", ["logits", s, e, axes], [f"logits_{i}"]))
        nodes.append(helper.make_node("ArgMax", [f"logits_{i}"], [f"action_{i}"], axis=1, keepdims=1))
        heads.append(f"action_{i}")
        start += n
    nodes.append(helper.make_node("Concat", heads, ["action"], axis=1))
    graph = helper.make_graph(
        nodes,
        "autoopt_actor",
        [helper.make_tensor_value_info("obs", TensorProto.DOUBLE, ["N", policy.obs_dim])],
        [helper.make_tensor_value_info("action", TensorProto.INT64, ["N", len(policy.action_dims)])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="autoopt")
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


def _layer_arrays(policy: RuntimePolicy) -> list[tuple[np.ndarray, np.ndarray]]:
    return [*policy._layers, policy._head]  # noqa: SLF001 - same package


def export_onnx(policy_dir: str | Path, out_path: str | Path) -> Path:
    """Write the ONNX graph of the policy at `policy_dir` (loaded and checked first) to `out_path`."""
    import onnx

    policy = RuntimePolicy.load(policy_dir)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_onnx(policy), str(out_path))
    return out_path


def onnx_session(onnx_path: str | Path) -> Any:
    """A single-threaded onnxruntime session (one observation per call: threads only add latency)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def check_onnx(policy_dir: str | Path, onnx_path: str | Path, n: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Compare the ONNX actor with RuntimePolicy on `n` random observations.

    Returns {"n", "mismatches", "onnx_us_median"}; the time is per single observation.
    """
    from .export import sample_observations

    policy = RuntimePolicy.load(policy_dir)
    sess = onnx_session(onnx_path)
    obs = sample_observations(policy, n, seed=seed)
    ours = policy.act_batch(obs)
    theirs = sess.run(["action"], {"obs": obs})[0]
    mismatches = int((ours != theirs).any(axis=1).sum())
    times = []
    for row in obs[: min(n, 2000)]:
        feed = {"obs": row[None, :]}
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        times.append(time.perf_counter_ns() - t0)
    return {"n": n, "mismatches": mismatches, "onnx_us_median": float(np.median(times)) / 1e3}
