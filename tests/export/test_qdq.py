"""keras_quant.export.qdq: the ONNX graph rewrites, on hand-made QDQ graphs run in onnxruntime."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from keras_quant.export import qdq  # noqa: E402

SCALE, ZERO_POINT = 0.05, -3


def _q_reshape_dq(opset=13):
    """x -> Q(int8) -> Reshape -> Transpose -> DQ -> y: tf2onnx's int8 data movement."""
    inits = [numpy_helper.from_array(np.array(SCALE, np.float32), "s"),
             numpy_helper.from_array(np.array(ZERO_POINT, np.int8), "z"),
             numpy_helper.from_array(np.array([-1, 3, 2], np.int64), "shape")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("Reshape", ["xq", "shape"], ["r"], name="reshape"),
             helper.make_node("Transpose", ["r"], ["t"], name="transpose", perm=[0, 2, 1]),
             helper.make_node("DequantizeLinear", ["t", "s", "z"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_one_qdq_pair_around_a_chain_and_uint8_activations_give_the_same_values():
    x = np.linspace(-4, 4, 12, dtype=np.float32).reshape(2, 6)
    proto = _q_reshape_dq()
    expected = _run(proto, x)
    assert qdq.qdq_around_data_movement(proto) == 2
    ops = [n.op_type for n in proto.graph.node]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "Reshape", "Transpose", "QuantizeLinear", "DequantizeLinear"]
    onnx.checker.check_model(proto)
    np.testing.assert_array_equal(_run(proto, x), expected)
    assert qdq.activations_to_uint8(proto) == 2
    zero_points = {numpy_helper.to_array(i).dtype for i in proto.graph.initializer if i.name.startswith("z")}
    assert zero_points == {np.dtype(np.uint8)}
    np.testing.assert_array_equal(_run(proto, x), expected)


def test_tables_and_batch_name():
    proto = _q_reshape_dq()
    qdq.name_batch_dimension(proto, "n")
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "n"
    activations, weights = qdq.qdq_tables(proto)
    assert activations == [("xq", pytest.approx(SCALE), ZERO_POINT)] and weights == []
