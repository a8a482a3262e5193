#!/usr/bin/env python3
"""Builds a Triton model repository of real ONNX models for tandem's engine tests and benchmarks.

Usage: make_test_models.py --out DIR

Deterministic, CPU-only and offline: the graphs are written with onnx.helper
and seeded numpy weights, the scikit-learn models are trained on datasets that
scikit-learn ships and converted with skl2onnx. Each model is one folder with
version 1 (and a config.pbtxt where the model needs one). The shapes follow
what exporters produce in the field:

  detector      CNN, dynamic batch/height/width, stride-2 convs, Resize x2 + Concat
                (the pattern of YOLO-style and OCR text detectors)
  branchy       an If whose branches return different ranks
  lstm          an LSTM over a [time, batch, feature] sequence
  forest        RandomForestClassifier (skl2onnx: unnamed batch, INT64 labels)
  boosting      GradientBoostingRegressor
  scaled_text   StandardScaler + LogisticRegression with string class labels
  zipmap        a classifier with skl2onnx's default ZipMap output (a sequence of maps)
  zipmap_text   the same with string class labels (maps keyed by label)
  text          TfidfVectorizer + LogisticRegression on strings (onnxruntime's
                StringNormalizer: needs the en_US.UTF-8 locale on the machine)
  text_no_locale  the same naming a locale no machine has (unavailable, with a hint)
  sequence      a second output that is a sequence of tensors (no tensor form)
  external      y = x + w, w (64 bytes 0..63) in an external data file beside the model
  external_escape  the same, its external data named "../../../../../../etc/hostname"
  half          FP16 in, FP16 out
  identity_all  one input and output per datatype (BOOL, UINT8-64, INT8-64, FP16, FP32, FP64, BYTES)
  bf16          BF16 in, BF16 and FP32 (widened) out
"""

import argparse
import pathlib
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
RNG = np.random.default_rng(7)


def save(model, out, name, config=None, check=True):
    folder = out / name / "1"
    folder.mkdir(parents=True, exist_ok=True)
    if check:
        # The checker wants a shape on every graph output; branchy's output has no fixed rank.
        onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    if config is not None:
        (out / name / "config.pbtxt").write_text(config)
    print(f"wrote {folder / 'model.onnx'}", file=sys.stderr)


def graph_model(nodes, name, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def weights(name, *shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def detector():
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 5, "h2", "w2"])
    inits = [
        weights("w1", 8, 3, 3, 3), weights("b1", 8),
        weights("w2", 16, 8, 3, 3), weights("b2", 16),
        weights("w3", 5, 24, 1, 1), weights("b3", 5),
        numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Resize", ["r2", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["up", "r1"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w3", "b3"], ["c3"]),
        helper.make_node("Sigmoid", ["c3"], ["scores"]),
    ]
    return graph_model(nodes, "detector", [x], [y], inits)


def branchy():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    then_out = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["n"])
    else_out = helper.make_tensor_value_info("e", TensorProto.FLOAT, ["n", 4])
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    then_graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["t"], keepdims=0)], "then", [], [then_out], initializer=[axes]
    )
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    else_graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["e"])], "else", [], [else_out], initializer=[two])
    cond = helper.make_node("Squeeze", ["flag"], ["cond"])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    return graph_model([cond, node], "branchy", [x, flag], [y])


def lstm():
    i, h = 8, 16
    x = helper.make_tensor_value_info("sequence", TensorProto.FLOAT, ["time", "batch", i])
    y = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "batch", h])
    inits = [weights("W", 1, 4 * h, i), weights("R", 1, 4 * h, h), weights("B", 1, 8 * h)]
    node = helper.make_node("LSTM", ["sequence", "W", "R", "B"], ["", "hidden"], hidden_size=h)
    return graph_model([node], "lstm", [x], [y], inits)


LSTM_CONFIG = """name: "lstm"
backend: "onnxruntime"
max_batch_size: 0
input [ { name: "sequence", data_type: TYPE_FP32, dims: [ -1, -1, 8 ] } ]
output [ { name: "hidden", data_type: TYPE_FP32, dims: [ 1, -1, 16 ] } ]
"""


def half():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 4])
    k = numpy_helper.from_array(np.array([0.5, -1.0, 2.0, 0.25], dtype=np.float16), "k")
    nodes = [helper.make_node("Mul", ["x", "k"], ["m"]), helper.make_node("Tanh", ["m"], ["y"])]
    return graph_model(nodes, "half", [x], [y], [k])


IDENTITY_TYPES = {
    "bool": TensorProto.BOOL,
    "uint8": TensorProto.UINT8,
    "uint16": TensorProto.UINT16,
    "uint32": TensorProto.UINT32,
    "uint64": TensorProto.UINT64,
    "int8": TensorProto.INT8,
    "int16": TensorProto.INT16,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "fp16": TensorProto.FLOAT16,
    "fp32": TensorProto.FLOAT,
    "fp64": TensorProto.DOUBLE,
    "bytes": TensorProto.STRING,
}


def identity_all():
    inputs, outputs, nodes = [], [], []
    for name, ty in IDENTITY_TYPES.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", ty, ["n", 3]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", ty, ["n", 3]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    return graph_model(nodes, "identity_all", inputs, outputs)


def bf16():
    x = helper.make_tensor_value_info("in_bf16", TensorProto.BFLOAT16, ["n", 3])
    same = helper.make_tensor_value_info("out_bf16", TensorProto.BFLOAT16, ["n", 3])
    wide = helper.make_tensor_value_info("widened", TensorProto.FLOAT, ["n", 3])
    nodes = [
        helper.make_node("Identity", ["in_bf16"], ["out_bf16"]),
        helper.make_node("Cast", ["in_bf16"], ["widened"], to=TensorProto.FLOAT),
    ]
    return graph_model(nodes, "bf16", [x], [same, wide])


def sklearn_models(out):
    from skl2onnx import to_onnx
    from sklearn.datasets import load_diabetes, load_iris
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    iris = load_iris()
    x = iris.data.astype(np.float32)
    y = iris.target
    names = np.array(iris.target_names)[y]

    forest = RandomForestClassifier(n_estimators=20, max_depth=5, random_state=0).fit(x, y)
    save(to_onnx(forest, x[:1], options={"zipmap": False}, target_opset=OPSET), out, "forest")

    diabetes = load_diabetes()
    xd = diabetes.data.astype(np.float32)
    boosting = GradientBoostingRegressor(n_estimators=30, max_depth=3, random_state=0).fit(xd, diabetes.target)
    save(to_onnx(boosting, xd[:1], target_opset=OPSET), out, "boosting")

    scaled = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x * 10.0, names)
    save(to_onnx(scaled, x[:1], options={"zipmap": False}, target_opset=OPSET), out, "scaled_text")

    zipmap = LogisticRegression(max_iter=500).fit(x, y)
    save(to_onnx(zipmap, x[:1], target_opset=OPSET), out, "zipmap")
    zipmap_text = LogisticRegression(max_iter=500).fit(x, names)
    save(to_onnx(zipmap_text, x[:1], target_opset=OPSET), out, "zipmap_text")

    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = ["the cat sat on the mat", "a dog ran in the park", "cats and dogs play", "the bird flew away",
             "a cat ran after the bird", "dogs sat in the sun", "Birds sing", "the mat is red"]
    topics = ["cat", "dog", "dog", "bird", "cat", "dog", "bird", "cat"]
    text = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=500)).fit(texts, topics)
    converted = convert_sklearn(text, initial_types=[("text", StringTensorType([None, 1]))], target_opset=OPSET)
    save(converted, out, "text")
    # The same, its StringNormalizer naming a locale no machine has.
    for node in converted.graph.node:
        if node.op_type == "StringNormalizer":
            node.attribute.append(helper.make_attribute("locale", "zz_ZZ"))
    save(converted, out, "text_no_locale")


def sequence():
    """y = x, and `parts`: x split into its rows, a sequence of tensors."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    parts = helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("SplitToSequence", ["x"], ["parts"], axis=0, keepdims=0),
    ]
    return graph_model(nodes, "sequence", [x], [y, parts])


def external(location):
    """y = x + w (UINT8 [64]), w's bytes in the external data file `location`."""
    w = TensorProto(name="w", data_type=TensorProto.UINT8, dims=[64], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("length", "64")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [64])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [64])
    return graph_model([helper.make_node("Add", ["x", "w"], ["y"])], "external", [x], [y], [w])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save(detector(), out, "detector")
    save(branchy(), out, "branchy", check=False)
    # The first dimension is time, not a batch: the configuration says so (no batching).
    save(lstm(), out, "lstm", config=LSTM_CONFIG)
    save(half(), out, "half")
    save(identity_all(), out, "identity_all")
    save(bf16(), out, "bf16")
    save(sequence(), out, "sequence")
    save(external("weights.bin"), out, "external", check=False)
    (out / "external" / "1" / "weights.bin").write_bytes(bytes(range(64)))
    save(external("../../../../../../etc/hostname"), out, "external_escape", check=False)
    sklearn_models(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
