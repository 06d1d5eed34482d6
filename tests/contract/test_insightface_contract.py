"""CONTRACT test for InsightFacePack: no real buffalo_l weights exist on these machines.

It builds a stand-in pack with the same ONNX signatures as buffalo_l and checks
that insightface routes it and that our wrapper returns well-formed faces:

- det_10g.onnx (SCRFD): input `input.1` [1, 3, ?, ?] float; 9 outputs in the
  order insightface's SCRFD indexes them: scores, boxes, landmarks, each at
  strides 8, 16, 32, shaped [(H/s)*(W/s)*2, 1 | 4 | 10] (2 anchors per cell).
  insightface's model router calls any ONNX with >= 5 outputs a detector.
- w600k_r50.onnx (ArcFace): input [1, 3, 112, 112], output [1, 512]; the
  router calls a square >= 112 input with one output a recognizer.

The weights are not a network. The detector scores a cell by the mean
brightness of its patch (sigmoid(20 * mean - 10)), so a white square on black
is one confident face and a black image has none; boxes and landmarks are
constants around the cell, big enough that NMS keeps exactly one. The
recognizer is average pooling + a seeded random projection to 512-d.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.facelib.insightface_pack import LICENSE, InsightFacePack
from pipeline.facelib.model import DetectedFace, ModelUnavailable
from pipeline.facelib.packs import load_model
from pipeline.facelib.spec import spec_for

STRIDES = (8, 16, 32)
ANCHORS = 2
BOX_HALF = 200.0  # px: every candidate box overlaps the others enough for NMS to keep one
KPS = np.array([-30, -20, 30, -20, 0, 5, -25, 35, 25, 35], np.float32)  # px around the cell
OPSET = [helper.make_opsetid("", 13)]


def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _head(
    stride: int, kind: str, width: int, bias: np.ndarray, scale: float
) -> tuple[list[onnx.NodeProto], list[TensorProto], str]:
    """Conv 1x1 over the stride-pooled image, then [1,C,h,w] -> [h*w*anchors, width]."""
    name = f"{kind}_{stride}"
    weight = np.full((ANCHORS * width, 3, 1, 1), scale / 3, np.float32)
    inits = [
        _const(f"{name}_w", weight),
        _const(f"{name}_b", np.tile(bias, ANCHORS)),
        numpy_helper.from_array(np.array([-1, width], np.int64), f"{name}_shape"),
    ]
    nodes = [helper.make_node("Conv", [f"pool_{stride}", f"{name}_w", f"{name}_b"], [f"{name}_conv"])]
    last = f"{name}_conv"
    if kind == "score":
        nodes.append(helper.make_node("Sigmoid", [last], [f"{name}_sig"]))
        last = f"{name}_sig"
    nodes += [
        helper.make_node("Transpose", [last], [f"{name}_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [name]),
    ]
    return nodes, inits, name


def build_scrfd_like(path: Path) -> None:
    """An SCRFD-shaped detector (see the module docstring)."""
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    outputs: dict[str, list[onnx.ValueInfoProto]] = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool_{s}"], kernel_shape=[s, s], strides=[s, s]))
        heads = {
            "score": (1, np.array([-10.0]), 20.0),
            "bbox": (4, np.full(4, BOX_HALF / s), 0.0),  # SCRFD multiplies distances by the stride
            "kps": (10, KPS / s, 0.0),
        }
        for kind, (width, bias, scale) in heads.items():
            head_nodes, head_inits, name = _head(s, kind, width, bias, scale)
            nodes += head_nodes
            inits += head_inits
            outputs[kind].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{s}", width]))
    graph = helper.make_graph(
        nodes,
        "scrfd_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        inits,
    )
    _save(graph, path)


def build_arcface_like(path: Path, batch: int | str = 1, dim: int = 512) -> None:
    """An ArcFace-shaped recognizer: 112x112 in, `dim` out, random projection."""
    weights = np.random.default_rng(0).standard_normal((dim, 3 * 4 * 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[28, 28], strides=[28, 28]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "proj"], ["embedding"], transB=1),
        ],
        "arcface_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, dim])],
        [_const("proj", weights)],
    )
    _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def make_pack(root: Path, rec_batch: int | str = 1) -> Path:
    """A stand-in buffalo_l under root/models/buffalo_l/."""
    pack = root / "models" / "buffalo_l"
    build_scrfd_like(pack / "det_10g.onnx")
    build_arcface_like(pack / "w600k_r50.onnx", batch=rec_batch)
    return root


def white_square(size: int = 640) -> np.ndarray:
    """Black image with one 64x64 white square aligned to the 32 px grid."""
    image = np.zeros((size, size, 3), np.uint8)
    image[256:320, 256:320] = 255
    return image


def _assert_face(face: DetectedFace, dim: int) -> None:
    x, y, w, h = face.bbox
    assert w > 0 and h > 0
    assert x <= 288 <= x + w and y <= 288 <= y + h  # the square's centre is inside the box
    assert face.det_score > 0.99
    assert face.landmarks is not None and len(face.landmarks) == 10
    assert face.embedding.dtype == np.float32 and face.embedding.shape == (dim,)
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("rec_batch", [1, "None"], ids=["fixed-batch", "dynamic-batch"])
def test_pack_loads_and_detects(tmp_path: Path, rec_batch: int | str) -> None:
    model = InsightFacePack(make_pack(tmp_path, rec_batch), "buffalo_l", providers=["CPUExecutionProvider"])
    model.load()
    assert model.spec.dim == 512  # read from the recognizer's output shape
    assert model.spec.model_id == "insightface-buffalo_l"
    assert model.provider == "CPUExecutionProvider"
    results = model.detect_and_embed([white_square(), np.zeros((480, 640, 3), np.uint8), white_square()])
    assert [len(faces) for faces in results] == [1, 0, 1]
    _assert_face(results[0][0], 512)
    np.testing.assert_allclose(results[0][0].embedding, results[2][0].embedding, atol=1e-5)
    assert model.detect_and_embed([]) == []


def test_dimension_comes_from_the_model(tmp_path: Path) -> None:
    pack = tmp_path / "models" / "buffalo_l"
    build_scrfd_like(pack / "det_10g.onnx")
    build_arcface_like(pack / "w600k_r50.onnx", dim=256)
    model = InsightFacePack(tmp_path, providers=["CPUExecutionProvider"])
    model.load()
    assert model.spec.dim == 256
    (faces,) = model.detect_and_embed([white_square()])
    assert faces[0].embedding.shape == (256,)


def test_missing_pack_says_where_files_go_and_the_license(tmp_path: Path) -> None:
    model = load_model("buffalo_l", tmp_path)
    assert isinstance(model, InsightFacePack)
    with pytest.raises(ModelUnavailable) as excinfo:
        model.load()
    message = str(excinfo.value)
    assert str(tmp_path / "models" / "buffalo_l") in message
    assert "det_10g.onnx" in message and LICENSE in message
    assert not (tmp_path / "models").exists()  # nothing was downloaded or created


def test_pack_without_a_recognizer_is_refused(tmp_path: Path) -> None:
    build_scrfd_like(tmp_path / "models" / "buffalo_l" / "det_10g.onnx")
    with pytest.raises(ModelUnavailable, match="recognition"):
        InsightFacePack(tmp_path, providers=["CPUExecutionProvider"]).load()


def test_registry_specs() -> None:
    assert spec_for("buffalo_l").license == LICENSE
    assert spec_for("sface").dim == 128
    assert spec_for("none", 64).dim == 64 and spec_for("none").dim == 512
    assert spec_for("none").model_id == "precomputed"
    assert spec_for("antelopev2").model_id == "insightface-antelopev2"
    assert load_model("none", Path(".")) is None
    with pytest.raises(ValueError):
        spec_for("../../etc")
