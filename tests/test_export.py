"""data.json and the input transform: what a run's models take as input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evo_subens.data_info import InputTransform, read_data_info
from evo_subens.errors import RunDirError


def test_input_transform_is_the_identity_without_one() -> None:
    x = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    assert torch.equal(InputTransform(None)(x), x.float()) and InputTransform(None).to_dict() is None
    transform = InputTransform({"scale": 2.0, "mean": [1.0, 0.0, 0.0], "std": None})
    assert torch.equal(transform(x), x.float() / 2 - torch.tensor([1.0, 0.0, 0.0]))
    assert transform.to_dict() == {"scale": 2.0, "mean": [1.0, 0.0, 0.0], "std": None}


def test_data_json_is_read(tmp_path: Path) -> None:
    assert read_data_info(tmp_path) is None  # runs from before data.json
    (tmp_path / "data.json").write_text(json.dumps({"input_shape": [3, 4, 4], "num_classes": 2,
                                                    "classes": ["cat", "dog"], "transform": {
                                                        "scale": 255.0, "mean": [[[0.5]], [[0.4]], [[0.3]]],
                                                        "std": [[[0.2]], [[0.2]], [[0.2]]]}}))
    info = read_data_info(tmp_path)
    assert info.input_shape == (3, 4, 4) and info.num_classes == 2 and info.classes == ["cat", "dog"]
    assert InputTransform(info.transform).mean.shape == (3, 1, 1)


@pytest.mark.parametrize("text, field", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "holds a list"),
    ('{"input_shape": [], "num_classes": 3}', "'input_shape'"),
    ('{"input_shape": [4], "num_classes": 1}', "'num_classes'"),
    ('{"input_shape": [4], "num_classes": 2, "classes": ["a"]}', "'classes'"),
    ('{"input_shape": [4], "num_classes": 2, "transform": {"scale": 0}}', "'transform.scale'"),
    ('{"input_shape": [4], "num_classes": 2, "transform": {"mean": [1, 2, 3]}}', "'transform.mean'"),
    ('{"input_shape": [4], "num_classes": 2, "transform": {"std": [1, 1, 0, 1]}}', "'transform.std'"),
    ('{"input_shape": [4], "num_classes": 2, "transform": {"shift": 1}}', "'transform'"),
])
def test_a_corrupt_data_json_is_named(tmp_path: Path, text: str, field: str) -> None:
    (tmp_path / "data.json").write_text(text)
    with pytest.raises(RunDirError, match="data.json") as info:
        read_data_info(tmp_path)
    assert field in str(info.value)
