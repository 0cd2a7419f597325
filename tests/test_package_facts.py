"""What Core ML models tell about a Stable Diffusion model: the registry's match on package
interfaces (`families.match_packages`) and the reading of compiled models' metadata.json
(`model_description`), including the flexible-shape forms other tools write."""

from __future__ import annotations

import json

import pytest

from coreml_sd import families
from coreml_sd.errors import ModelError
from coreml_sd.model_description import describe_model


@pytest.mark.parametrize("encoders,context,extras,channels,prediction,expected", [
    (["text_encoder"], 768, {}, 4, None, ("sd1", True)),
    (["text_encoder"], 1024, {}, 4, None, ("sd2", True)),
    (["text_encoder"], 1024, {}, 4, "v_prediction", ("sd2-v", True)),
    (["text_encoder"], 768, {}, 4, "v_prediction", ("sd1", True)),  # no v variant: the scheduler says it
    (["text_encoder"], 32, {}, 4, None, ("sd1", False)),  # a tiny test model of SD 1.x layout
    (["text_encoder", "text_encoder_2"], 2048, {"text_embeds": 1280, "time_ids": 6}, 4, None, ("sdxl", True)),
    (["text_encoder_2"], 1280, {"text_embeds": 1280, "time_ids": 5}, 4, None, ("sdxl-refiner", True)),
    ([], 2048, {"text_embeds": 1280, "time_ids": 6}, 4, None, ("sdxl", True)),  # a UNet alone
    (["text_encoder"], None, None, None, None, ("sd1", False)),  # a text encoder alone
])
def test_match_packages(encoders, context, extras, channels, prediction, expected):
    family, standard = families.match_packages(encoders, context, extras, in_channels=channels,
                                               prediction_type=prediction)
    assert (family.name, standard) == expected


def test_match_packages_refuses_what_no_family_has():
    with pytest.raises(ModelError, match=r"no known model family has text encoder\(s\) text_encoder, UNet inputs "
                                         r"beyond the text: class_labels, and 4 input channels; known: sd1"):
        families.match_packages(["text_encoder"], 768, {"class_labels": 512}, in_channels=4)
    with pytest.raises(ModelError, match="no known model family"):  # SDXL's extras with the refiner's 5 time ids
        families.match_packages(["text_encoder", "text_encoder_2"], 2048, {"text_embeds": 1280, "time_ids": 5})


def _compiled(tmp_path, inputs, histogram=None):
    folder = tmp_path / "Unet.mlmodelc"
    folder.mkdir(parents=True)
    (folder / "model.mil").write_text("program(1.0)\n")
    entry = {"specificationVersion": 7, "inputSchema": inputs,
             "outputSchema": [{"name": "noise_pred", "type": "MultiArray", "dataType": "Float32",
                               "shape": "[2, 4, 64, 64]"}],
             "userDefinedMetadata": {"prediction_type": "v_prediction"}}
    if histogram is not None:
        entry["mlProgramOperationTypeHistogram"] = histogram
    (folder / "metadata.json").write_text(json.dumps([entry]))
    return folder


def _sample(**flex):
    return {"name": "sample", "type": "MultiArray", "dataType": "Float16", "shape": "[2, 4, 64, 64]", **flex}


def test_compiled_metadata_flexible_forms(tmp_path):
    ranged = describe_model(_compiled(tmp_path / "a", [_sample(hasShapeFlexibility="1",
                                                                 shapeRange="[[2, 2], [4, 4], [32, 96], [32, 96]]")]))
    assert ranged.ranges == {"sample": ((2, 2), (4, 4), (32, 96), (32, 96))}  # GuernikaKit reads this key
    assert ranged.input("sample").shape == (2, 4, None, None) and ranged.defaults["sample"] == (2, 4, 64, 64)
    text = describe_model(_compiled(tmp_path / "b", [_sample(hasShapeFlexibility="1",
                                                               shapeFlexibility="2 x 4 x 32...96 x 64")]))
    assert text.ranges == {"sample": ((2, 2), (4, 4), (32, 96), (64, 64))}
    enumerated = "2 × 4 × 64 × 64 | 2 × 4 × 96 × 64"
    listed = describe_model(_compiled(tmp_path / "c", [_sample(hasShapeFlexibility="1", shapeFlexibility=enumerated)]))
    assert listed.shapes == {"sample": ((2, 4, 64, 64), (2, 4, 96, 64))}
    assert listed.input("sample").shape == (2, 4, None, 64)
    unknown = describe_model(_compiled(tmp_path / "d", [_sample(hasShapeFlexibility="1")]))
    assert unknown.input("sample").shape == (None,) * 4 and not unknown.shapes and not unknown.ranges


def test_compiled_op_counts_from_histogram_or_text(tmp_path):
    histogram = {"Ios16.einsum": 3, "Ios16.constexprLutToDense": 2, "Ios17.einsum": 1, "Tile": 1}
    counted = describe_model(_compiled(tmp_path / "a", [_sample()], histogram))
    assert counted.op_counts == {"einsum": 4, "constexpr_lut_to_dense": 2, "tile": 1}
    assert counted.user_metadata == {"prediction_type": "v_prediction"}
    folder = _compiled(tmp_path / "b", [_sample()])
    (folder / "model.mil").write_text(
        'program(1.0)\n{\n  func main<ios16>(tensor<fp16, [1]> x) {\n'
        '    tensor<fp16, [1]> y = einsum(equation = "a", values = (x, x))[name = "y"];\n'
        '    tensor<fp16, [1]> z = softmax(axis = 0, x = y)[name = "z"];\n  } -> (z);\n}\n')
    assert describe_model(folder).op_counts == {"einsum": 1, "softmax": 1}


def test_describe_refuses_what_is_not_a_model(tmp_path):
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"expected a Core ML package \(.mlpackage folder\) or compiled model "
                                         r"\(.mlmodelc folder\) at .*file.bin, found a file"):
        describe_model(tmp_path / "file.bin")
