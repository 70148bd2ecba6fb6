"""Image folders as data: decoding, resizing, normalization, layout, and their errors.

Real photos: scikit-image's sample images, written as PNG/JPEG files in the test.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphq import PassManager
from graphq.data import DataSource, ImageOptions, load_image
from graphq.errors import DataError
from graphq.quant import QuantTable
from tests.helpers import make_model, tensor

Image = pytest.importorskip("PIL.Image")
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket", "camera")):
        pixels = getattr(skimage_data, name)()
        Image.fromarray(pixels).save(folder / f"{i}_{name}.{'png' if i % 2 else 'jpg'}")
    return folder


def conv_model(size: int = 32, layout: str = "NCHW") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    shape = ["N", 3, size, size] if layout == "NCHW" else ["N", size, size, 3]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["y"])]
    return make_model(nodes, [tensor("x", shape)], [tensor("y", ["N", 4, 1, 1])],
                      {"W": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)})


def test_load_image_normalizes_as_written(photos):
    path = sorted(photos.iterdir())[1]  # a PNG: lossless, so the pixels are known
    options = ImageOptions(size=[16, 24], mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5])
    x = load_image(path, options)
    assert x.shape == (3, 16, 24) and x.dtype == np.float32
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB").resize((24, 16), Image.Resampling.BILINEAR),
                            np.float32)
    expected = (pixels / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5])
    np.testing.assert_allclose(x, expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    bgr = load_image(path, ImageOptions(size=[16, 24], mean=[0.0], std=[1.0], channels="BGR",
                                        layout="NHWC"))
    np.testing.assert_allclose(bgr[:, :, ::-1], pixels / 255, atol=1e-6)


def test_image_folder_feeds_batches(photos):
    source = DataSource(photos, batch_size=2, image=ImageOptions(size=[32, 32]))
    batches = list(source.feeds(conv_model()))
    assert [b["x"].shape for b in batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    assert len({float(b["x"].mean()) for b in batches}) == 3  # different photos


def test_int8_pipeline_calibrates_on_an_image_folder(photos, tmp_path):
    model_path = tmp_path / "net.onnx"
    onnx.save(conv_model(), model_path)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f"""
[data]
source = "{photos}"
batch_size = 2
image = {{ size = [32, 32] }}

[[passes]]
name = "insert-qdq"

[[passes]]
name = "calibrate"
method = "minmax"

[[passes]]
name = "emit"
""")
    pm = PassManager.from_toml(pipeline)
    assert "image = { size = [32, 32]" in pm.to_toml()
    result = pm.run(model_path, tmp_path / "out")
    table = QuantTable.of(onnx.load(str(result.files["net.fakequant.onnx"])))
    assert table.get("x").quantized and table.get("x").range[0] < -1.5  # ImageNet-normalized
    assert result.report["quantization"]["outputs"]["y"]["cosine"] > 0.99


def test_images_without_an_image_table_are_a_clear_error(photos):
    with pytest.raises(DataError, match=r"add a \[data.image\] table"):
        list(DataSource(photos).feeds(conv_model()))


def test_images_for_a_two_input_model_are_a_clear_error(photos):
    model = make_model([helper.make_node("Add", ["x", "z"], ["y"])],
                       [tensor("x", [1, 3, 8, 8]), tensor("z", [1, 3, 8, 8])],
                       [tensor("y", [1, 3, 8, 8])])
    with pytest.raises(DataError, match="one input"):
        list(DataSource(photos, image=ImageOptions(size=[8, 8])).feeds(model))


def test_a_broken_image_file_is_named(photos):
    (photos / "9_broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="9_broken.png"):
        list(DataSource(photos, image=ImageOptions(size=[8, 8])).feeds(conv_model(8)))


def test_an_image_folder_feeds_a_fixed_batch_in_batches_of_that_size(photos, caplog):
    """A model whose batch is fixed at 2 reads the 5 photos 2 at a time whatever batch_size
    says (batches of 4 and 1 had been read: the 4 cut in two, the 1 refused as a batch of
    the wrong size), the fifth left out with one warning."""
    model = conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    source = DataSource(photos, batch_size=4, image=ImageOptions(size=[32, 32]))
    with caplog.at_level("WARNING", logger="graphq.data"):
        batches = list(source.feeds(model)) + list(source.feeds(model))
    assert [b["x"].shape[0] for b in batches] == [2, 2, 2, 2]
    assert caplog.text.count("the last 1 of 5 images are left out") == 1
