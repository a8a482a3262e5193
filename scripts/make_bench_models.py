#!/usr/bin/env python3
"""Make the benchmark models (random weights; not shipped as defaults).

- `cnn`: a small convolutional network on [-1, 3, 64, 64] FP32 (about 0.2 ms per
  image on two cores); for scaling benchmarks.
- `cnn_head`: the same convolutions with a VGG-style classifier head (dense
  4096 -> 2048 -> 2048 -> 10, 50 MB of weights): about 1.3 ms per image at batch
  1 on two cores, where the head streams its weights once per request; the
  model dynamic batching is for.
- `vision`: a VGG-style image classifier on [-1, 3, 224, 224] FP32 (four stages
  of two 3x3 convolutions, about 2.6 GMAC): tens of milliseconds per image on
  one core, the size of model whose serving overhead must stay under 10%.
- `large`: takes [-1, -1, 512, 512] FP32 (1 MiB per channel: 1 channel is
  1 MiB, 4 channels 4 MiB) and reduces it cheaply (global average pool), for
  request-body-size benchmarks.

The weights are random (fixed seed): these models measure the server, not
accuracy. Usage: scripts/make_bench_models.py [--out bench-models]
"""

import argparse
import pathlib
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(model, out, name, max_batch):
    onnx.checker.check_model(model)
    d = out / name / "1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(model.SerializeToString())
    (out / name / "config.pbtxt").write_text(f'platform: "onnxruntime_onnx"\nmax_batch_size: {max_batch}\n')
    print(f"wrote {d / 'model.onnx'}", file=sys.stderr)


def conv_stack(rng, inits, nodes):
    """Three 3x3 conv + ReLU + 2x2 max-pool stages, 3 -> 32 -> 64 -> 64 channels; returns the last tensor's name."""
    chans = [3, 32, 64, 64]
    x = "image"
    for i in range(3):
        w = (rng.standard_normal((chans[i + 1], chans[i], 3, 3)) * 0.1).astype(np.float32)
        b = np.zeros(chans[i + 1], dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        nodes.append(helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]))
        x = f"p{i}"
    return x


def image_model(nodes, inits, name):
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="tandem-bench")
    m.ir_version = 8
    return m


def cnn(rng):
    inits, nodes = [], []
    x = conv_stack(rng, inits, nodes)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    wf = (rng.standard_normal((64, 10)) * 0.1).astype(np.float32)
    inits += [numpy_helper.from_array(wf, "wf"), numpy_helper.from_array(np.zeros(10, np.float32), "bf")]
    nodes.append(helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    return image_model(nodes, inits, "cnn")


def cnn_head(rng):
    """The same convolutions with a VGG-style classifier head (4096 -> 2048 -> 2048 -> 10)."""
    inits, nodes = [], []
    x = conv_stack(rng, inits, nodes)
    nodes.append(helper.make_node("Flatten", [x], ["h"]))
    dims, h = [64 * 8 * 8, 2048, 2048, 10], "h"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) * 0.02).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fw{i}"), numpy_helper.from_array(np.zeros(dims[i + 1], np.float32), f"fb{i}")]
        nodes.append(helper.make_node("Gemm", [h, f"fw{i}", f"fb{i}"], [f"g{i}"]))
        h = f"g{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [h], [f"gr{i}"]))
            h = f"gr{i}"
    nodes.append(helper.make_node("Softmax", [h], ["probabilities"], axis=1))
    return image_model(nodes, inits, "cnn_head")


def vision(rng):
    chans = [3, 64, 128, 256, 512]
    inits, nodes, x = [], [], "image"
    for stage in range(4):
        for j, (cin, stride) in enumerate([(chans[stage], 2), (chans[stage + 1], 1)]):
            cout = chans[stage + 1]
            w = (rng.standard_normal((cout, cin, 3, 3)) * (2.0 / (9 * cin)) ** 0.5).astype(np.float32)
            name = f"s{stage}c{j}"
            inits += [numpy_helper.from_array(w, f"{name}w"), numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}b")]
            nodes.append(helper.make_node("Conv", [x, f"{name}w", f"{name}b"], [name], pads=[1, 1, 1, 1], strides=[stride, stride]))
            nodes.append(helper.make_node("Relu", [name], [f"{name}r"]))
            x = f"{name}r"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    wf = (rng.standard_normal((512, 1000)) * 0.05).astype(np.float32)
    inits += [numpy_helper.from_array(wf, "wf"), numpy_helper.from_array(np.zeros(1000, np.float32), "bf")]
    nodes.append(helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    g = helper.make_graph(
        nodes, "vision",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 1000])],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="tandem-bench")
    m.ir_version = 8
    return m


def large():
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0)]
    g = helper.make_graph(
        nodes, "large",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", "channels", 512, 512])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", "channels"])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="tandem-bench")
    m.ir_version = 8
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-models")
    out = pathlib.Path(ap.parse_args().out)
    rng = np.random.default_rng(0)
    save(cnn(rng), out, "cnn", 16)
    save(cnn_head(rng), out, "cnn_head", 16)
    save(large(), out, "large", 4)
    save(vision(rng), out, "vision", 16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
