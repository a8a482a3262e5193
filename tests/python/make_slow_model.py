#!/usr/bin/env python3
"""A model that takes a while: digits' interface (pixels [-1, 64] FP32 in,
probabilities [-1, 10] out) over an ONNX Loop of two matrix products per
turn, with the turns calibrated here on ONNX Runtime so one inference of one
row takes about SECONDS on this machine. For tests that need requests to stay
in flight (deadlines, in-flight caps, batches forming behind a busy model).

With --linear, each turn is elementwise work on 262144 values per row
instead: a row costs the same run alone or stacked with others (no weights
to share), so dynamic batching saves nothing on it.

Usage: make_slow_model.py OUT_FILE SECONDS [--linear]
"""

import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def turn(nodes, width):
    """A Loop body: `nodes` from x_in to x_out, both [n, width], the loop running on."""
    return helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), *nodes],
        "turn",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["n", width]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["n", width]),
        ],
    )


def build(turns):
    rng = np.random.default_rng(7)
    w1 = numpy_helper.from_array((rng.standard_normal((64, 2048)) * 0.02).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((2048, 64)) * 0.02).astype(np.float32), "w2")
    w3 = numpy_helper.from_array((rng.standard_normal((64, 10)) * 0.1).astype(np.float32), "w3")
    body = turn(
        [
            helper.make_node("MatMul", ["x_in", "w1"], ["h"]),
            helper.make_node("Tanh", ["h"], ["t"]),
            helper.make_node("MatMul", ["t", "w2"], ["x_out"]),
        ],
        64,
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["turns", "", "pixels"], ["x"], body=body),
            helper.make_node("MatMul", ["x", "w3"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "slow",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(np.array(turns, dtype=np.int64), "turns"), w1, w2, w3],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_linear(turns):
    """pixels [n, 64] tiled to [n, 262144], `turns` rounds of Tanh over it, then its mean per row into 10 scores."""
    w = numpy_helper.from_array((np.arange(10, dtype=np.float32) - 4.5).reshape(1, 10), "w")
    body = turn([helper.make_node("Tanh", ["x_in"], ["x_out"])], 262144)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["pixels", "scale"], ["small"]),
            helper.make_node("Tile", ["small", "repeats"], ["wide"]),
            helper.make_node("Loop", ["turns", "", "wide"], ["x"], body=body),
            helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=1),
            helper.make_node("MatMul", ["mean", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "slow_linear",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 10])],
        [
            numpy_helper.from_array(np.array(turns, dtype=np.int64), "turns"),
            numpy_helper.from_array(np.array(1 / 16, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array([1, 4096], dtype=np.int64), "repeats"),
            w,
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def timed(turns, make):
    """The quickest of several runs: a probe of milliseconds that loses the core
    once (other tests run beside this one) would otherwise make the model
    several times quicker than asked (seen in CI: a 2 s model that ran in 0.3 s)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(make(turns).SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.ones((1, 64), dtype=np.float32)
    session.run(None, {"pixels": x})
    runs = []
    for _ in range(7):
        started = time.perf_counter()
        session.run(None, {"pixels": x})
        runs.append(time.perf_counter() - started)
    return min(runs)


def main():
    out, seconds = sys.argv[1], float(sys.argv[2])
    make = build_linear if "--linear" in sys.argv[3:] else build
    probe = 200
    per_turn = timed(probe, make) / probe
    turns = max(1, int(seconds / per_turn))
    onnx.save(make(turns), out)
    print(f"{turns} turns, about {turns * per_turn:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
