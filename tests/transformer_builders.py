"""Graphs shaped like real third-party exports, built with onnx.helper: a BERT-style encoder block with
mean pooling (int64 input_ids + attention_mask), and an NHWC conv block wrapped in Transposes with a
Cast, bias Adds and BatchNorm decomposed into Sub/Mul/Add constants."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builders import IR_VERSION, NetBuilder

VOCAB = 50


class Builder(NetBuilder):
    def const_int(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
        return name

    def matmul(self, name: str, x: str, k: int, n: int, bias: bool = True) -> str:
        y = self.node("MatMul", name, [x, self.const(f"{name}.w", self.rng.normal(0, 1 / np.sqrt(k), (k, n)))])
        return self.node("Add", f"{name}.bias", [y, self.const(f"{name}.b", self.rng.normal(0, 0.1, n))]) if bias else y

    def layer_norm(self, name: str, x: str, width: int) -> str:
        return self.node("LayerNormalization", name, [x, self.const(f"{name}.g", self.rng.uniform(0.8, 1.2, width)),
                                                       self.const(f"{name}.b", self.rng.normal(0, 0.1, width))],
                         axis=-1, epsilon=1e-5)

    def gelu(self, name: str, x: str) -> str:
        """GELU as PyTorch exports it: x · 0.5 · (1 + erf(x / √2))."""
        erf = self.node("Erf", f"{name}.erf", [self.node("Div", f"{name}.div", [x, self.const(f"{name}.sqrt2", np.array(np.sqrt(2.0)))])])
        inner = self.node("Add", f"{name}.add", [erf, self.const(f"{name}.one", np.array(1.0))])
        return self.node("Mul", f"{name}.half", [self.node("Mul", f"{name}.mul", [x, inner]), self.const(f"{name}.h", np.array(0.5))])


def bert_block(seed: int = 0, width: int = 16, heads: int = 4, ffn: int = 32, layers: int = 1) -> onnx.ModelProto:
    """Embedding Gather → LayerNorm → [attention (Q/K/V MatMul+bias, Reshape/Transpose head split, masked
    softmax, Transpose/Reshape merge — its shape assembled from Shape at run time — output projection,
    residual, LayerNorm) → FFN (MatMul+bias, Erf-GELU, MatMul+bias, residual, LayerNorm)] × layers →
    masked mean pooling. Inputs int64 (batch, seq); output the (batch, width) embedding."""
    b = Builder(seed)
    head = width // heads
    x = b.node("Gather", "embed", [b.const("embed.table", b.rng.normal(0, 1, (VOCAB, width))), "input_ids"], axis=0)
    x = b.layer_norm("embed.ln", b.node("Add", "embed.type", [x, b.const("embed.type.v", b.rng.normal(0, 0.1, width))]), width)
    mask = b.node("Cast", "mask.float", ["attention_mask"], to=TensorProto.FLOAT)
    bias = b.node("Mul", "mask.scale", [b.node("Sub", "mask.invert", [b.const("mask.one", np.array(1.0)), mask]),
                                        b.const("mask.big", np.array(-1e4))])
    bias = b.node("Unsqueeze", "mask.bias", [bias, b.const_int("mask.axes", [1, 2])])            # (N, 1, 1, S)
    for layer in range(layers):
        p = f"l{layer}"
        split = b.const_int(f"{p}.split", [0, 0, heads, head])
        q = b.node("Transpose", f"{p}.q.t", [b.node("Reshape", f"{p}.q.r", [b.matmul(f"{p}.q", x, width, width), split])], perm=[0, 2, 1, 3])
        k = b.node("Transpose", f"{p}.k.t", [b.node("Reshape", f"{p}.k.r", [b.matmul(f"{p}.k", x, width, width), split])], perm=[0, 2, 3, 1])
        v = b.node("Transpose", f"{p}.v.t", [b.node("Reshape", f"{p}.v.r", [b.matmul(f"{p}.v", x, width, width), split])], perm=[0, 2, 1, 3])
        scores = b.node("Div", f"{p}.scale", [b.node("MatMul", f"{p}.qk", [q, k]), b.const(f"{p}.sqrt_d", np.array(np.sqrt(head)))])
        probs = b.node("Softmax", f"{p}.softmax", [b.node("Add", f"{p}.masked", [scores, bias])], axis=-1)
        context = b.node("Transpose", f"{p}.ctx.t", [b.node("MatMul", f"{p}.pv", [probs, v])], perm=[0, 2, 1, 3])
        batch_seq = b.node("Slice", f"{p}.ctx.ns", [b.node("Shape", f"{p}.ctx.shape", [x]), b.const_int(f"{p}.zero", [0]),
                                                     b.const_int(f"{p}.two", [2])])
        merged_shape = b.node("Concat", f"{p}.ctx.target", [batch_seq, b.const_int(f"{p}.width", [width])], axis=0)
        context = b.node("Reshape", f"{p}.ctx.r", [context, merged_shape])
        x = b.layer_norm(f"{p}.ln1", b.node("Add", f"{p}.res1", [x, b.matmul(f"{p}.o", context, width, width)]), width)
        hidden = b.gelu(f"{p}.gelu", b.matmul(f"{p}.ffn1", x, width, ffn))
        x = b.layer_norm(f"{p}.ln2", b.node("Add", f"{p}.res2", [x, b.matmul(f"{p}.ffn2", hidden, ffn, width)]), width)
    weights = b.node("Unsqueeze", "pool.w", [mask, b.const_int("pool.axes", [2])])               # (N, S, 1)
    total = b.node("ReduceSum", "pool.sum", [b.node("Mul", "pool.mul", [x, weights]), b.const_int("pool.seq", [1])], keepdims=0)
    count = b.node("ReduceSum", "pool.count", [weights, b.const_int("pool.seq2", [1])], keepdims=0)
    embedding = b.node("Div", "embedding", [total, count])
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"]) for name in ("input_ids", "attention_mask")]
    graph = helper.make_graph(b.nodes, "bert_block", inputs,
                              [helper.make_tensor_value_info(embedding, TensorProto.FLOAT, ["batch", width])], b.inits)
    return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 17)])


def token_batch(n: int = 64, seq: int = 10, seed: int = 1) -> dict[str, np.ndarray]:
    """Random token ids with right padding (each row keeps at least 3 tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (n, seq)).astype(np.int64)
    lengths = rng.integers(3, seq + 1, n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def nhwc_block(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """An NHWC image input; each Conv is wrapped Transpose → Conv → Transpose → Cast, its bias an Add and its
    BatchNorm Sub/Mul/Add constants over the last axis; a residual Add; mean over H, W; MatMul classifier."""
    b = Builder(seed)

    def conv(name: str, x: str, cin: int, cout: int, relu: bool = True) -> str:
        x = b.node("Transpose", f"{name}.to_nchw", [x], perm=[0, 3, 1, 2])
        x = b.conv(name, x, cin, cout, bias=False)
        x = b.node("Cast", f"{name}.cast", [b.node("Transpose", f"{name}.to_nhwc", [x], perm=[0, 2, 3, 1])], to=TensorProto.FLOAT)
        x = b.node("Add", f"{name}.bias", [x, b.const(f"{name}.b", b.rng.normal(0, 0.1, cout))])
        x = b.node("Sub", f"{name}.bn.sub", [x, b.const(f"{name}.bn.mean", b.rng.normal(0, 0.1, cout))])
        x = b.node("Mul", f"{name}.bn.mul", [x, b.const(f"{name}.bn.scale", b.rng.uniform(0.5, 1.5, cout))])
        x = b.node("Add", f"{name}.bn.add", [x, b.const(f"{name}.bn.shift", b.rng.normal(0, 0.1, cout))])
        return b.node("Relu", f"{name}.relu", [x]) if relu else x

    stem = conv("stem", "input", 3, 8)
    x = conv("c1", stem, 8, 16)
    x = b.node("Relu", "res.relu", [b.node("Add", "res", [stem, conv("c2", x, 16, 8, relu=False)])])
    x = conv("c3", x, 8, 12)
    pooled = b.node("ReduceMean", "pool", [x], axes=[1, 2], keepdims=0)
    logits = b.matmul("fc", pooled, 12, classes)
    graph = helper.make_graph(b.nodes, "nhwc_block", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8, 8, 3])],
                              [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", classes])], b.inits)
    return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 17)])
