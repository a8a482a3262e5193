#!/usr/bin/env python3
"""Train the built-in `digits` model and export it to ONNX.

Data: scikit-learn's bundled 8x8 digits dataset (no download). Model: an MLP
trained with scikit-learn, written as plain ONNX Gemm/Relu/Softmax nodes with
onnx.helper so that any ONNX runtime (tract included) loads it.

Input  `pixels`: FP32 [-1, 64], raw pixel values 0-16 as load_digits gives them
                 (scaled to 0-1 inside the graph).
Output `probabilities`: FP32 [-1, 10], class probabilities for digits 0-9.

Deterministic: fixed split and seeds, so the same package versions reproduce
the same file. Prints the held-out accuracy to stdout; progress to stderr.

Usage: scripts/train_digits.py [--out models/digits]
"""

import argparse
import pathlib
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

SPLIT_SEED = 42
TEST_SIZE = 0.25
MAX_BATCH = 256


def held_out():
    """The held-out split used for accuracy here and in the tests."""
    x, y = load_digits(return_X_y=True)
    return train_test_split(x.astype(np.float32), y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)


def export(clf, path):
    w1, w2 = (w.astype(np.float32) for w in clf.coefs_)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
    inits = [
        numpy_helper.from_array(np.array([1.0 / 16.0], dtype=np.float32), "scale"),
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    nodes = [
        helper.make_node("Mul", ["pixels", "scale"], ["scaled"], name="scale"),
        helper.make_node("Gemm", ["scaled", "w1", "b1"], ["hidden_pre"], name="dense1"),
        helper.make_node("Relu", ["hidden_pre"], ["hidden"], name="relu1"),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], name="dense2"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tandem-train-digits")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent.parent / "models" / "digits"))
    args = ap.parse_args()
    out = pathlib.Path(args.out)

    x_train, x_test, y_train, y_test = held_out()
    print(f"training on {len(x_train)} digits, holding out {len(x_test)}", file=sys.stderr)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=0)
    clf.fit(x_train / 16.0, y_train)
    accuracy = float((clf.predict(x_test / 16.0) == y_test).mean())

    export(clf, out / "1" / "model.onnx")
    config = f"""# MLP classifier of scikit-learn's 8x8 digits (scripts/train_digits.py); input: raw pixels 0-16.
name: "digits"
platform: "onnxruntime_onnx"
max_batch_size: {MAX_BATCH}
input [
  {{ name: "pixels", data_type: TYPE_FP32, dims: [ 64 ] }}
]
output [
  {{ name: "probabilities", data_type: TYPE_FP32, dims: [ 10 ], label_filename: "labels.txt" }}
]
"""
    (out / "config.pbtxt").write_text(config)
    (out / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    print(f"wrote {out / '1' / 'model.onnx'}", file=sys.stderr)
    print(f"held-out accuracy: {accuracy:.4f}")
    if accuracy < 0.95:
        print("accuracy below 0.95", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
