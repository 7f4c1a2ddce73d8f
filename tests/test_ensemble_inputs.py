"""The ensemble as a user calls it: numpy, lists, tensors, DataFrames matched by column name, PIL images and
channels-last arrays resized as the run resized its files; ``classes_``; what data.json records for that;
and every refusal names what to give instead. Tiny ensembles built directly: no runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from evo_subens.core.config import DataConfig, ModelConfig
from evo_subens.data_info import ImageForm, read_data_info
from evo_subens.ensemble import Ensemble
from evo_subens.errors import RunDirError
from evo_subens.tasks.classification.data import load_dataset
from evo_subens.tasks.classification.models import build_model

from test_own_data import csv_config, write_csv, write_images

FEATURES = ["size", "weight", "constant"]


def _members(shape: tuple[int, ...], classes: int, count: int = 2) -> list[nn.Module]:
    torch.manual_seed(0)
    cfg = ModelConfig(name="mlp", kwargs={"hidden": [8]})
    return [build_model(cfg, shape, classes).eval() for _ in range(count)]


def _recorded(data, tmp_path: Path) -> Ensemble:
    """An ensemble built from what ``data`` writes to data.json, read back as load_ensemble reads it."""
    (tmp_path / "data.json").write_text(json.dumps(data.description()))
    info = read_data_info(tmp_path)
    return Ensemble(_members(info.input_shape, info.num_classes), input_shape=info.input_shape,
                    num_classes=info.num_classes, transform=info.transform, classes=info.classes,
                    features=info.features, image=info.image)


def _model_probs(ensemble: Ensemble, model_inputs: torch.Tensor) -> np.ndarray:
    """The members averaged on inputs already in model form (past the transform)."""
    with torch.no_grad():
        return ensemble.stacked_probs(model_inputs).mean(dim=0).numpy()


# --- tabular ---------------------------------------------------------------------------------------


@pytest.fixture()
def fruit(tmp_path: Path) -> tuple[Ensemble, pd.DataFrame]:
    """A csv run's ensemble (from its data.json) and the CSV's rows."""
    frame = write_csv(tmp_path / "fruit.csv", n=60)
    return _recorded(load_dataset(csv_config(tmp_path / "fruit.csv")), tmp_path), frame


def test_csv_data_json_records_the_feature_columns(tmp_path: Path) -> None:
    write_csv(tmp_path / "fruit.csv", n=60)
    data = load_dataset(csv_config(tmp_path / "fruit.csv"))
    assert data.features == tuple(FEATURES) and data.description()["features"] == FEATURES
    assert data.image is None and data.description()["image"] is None
    ensemble = _recorded(data, tmp_path)
    assert ensemble.features == FEATURES and list(ensemble.feature_names_in_) == FEATURES


def test_every_array_form_gives_numpy_and_a_tensor_gives_a_tensor(fruit) -> None:
    ensemble, frame = fruit
    rows = frame[FEATURES].to_numpy(np.float32)[:5].copy()
    expected = ensemble.predict_proba(torch.from_numpy(rows))
    assert isinstance(expected, torch.Tensor) and expected.shape == (5, 3)
    for form in (rows, rows.tolist(), tuple(map(tuple, rows.tolist())), rows.astype(np.float64),
                 frame.iloc[:5]):
        probs = ensemble.predict_proba(form)
        assert isinstance(probs, np.ndarray) and probs.shape == (5, 3), type(form)
        np.testing.assert_allclose(probs, expected.numpy(), atol=1e-6)
    one = ensemble.predict_proba(rows[2].tolist())
    assert isinstance(one, np.ndarray) and one.shape == (3,)
    np.testing.assert_allclose(one, expected[2].numpy(), atol=1e-6)
    labels = ensemble.predict(frame.iloc[:5])
    assert isinstance(labels, np.ndarray) and labels.tolist() == expected.argmax(dim=1).tolist()
    assert isinstance(ensemble.predict(torch.from_numpy(rows)), torch.Tensor)
    assert list(ensemble.prepare(frame.iloc[:5]).shape) == [5, 3]


def test_classes_are_named_like_scikit_learns(fruit) -> None:
    ensemble, frame = fruit
    assert isinstance(ensemble.classes_, np.ndarray) and ensemble.classes_.tolist() == ["apple", "banana", "cherry"]
    assert ensemble.classes == ["apple", "banana", "cherry"]  # the plain list is still there
    labels = ensemble.classes_[ensemble.predict(frame.iloc[:4])]
    assert set(labels) <= {"apple", "banana", "cherry"} and labels.dtype.kind == "U"
    unnamed = Ensemble(_members((3,), 4), input_shape=(3,), num_classes=4)
    assert unnamed.classes_.tolist() == [0, 1, 2, 3] and unnamed.classes is None
    assert not hasattr(unnamed, "feature_names_in_")  # as on a scikit-learn model fitted without names
    with pytest.raises(ValueError, match="classes names 2 classes, num_classes is 4"):
        Ensemble(_members((3,), 4), input_shape=(3,), num_classes=4, classes=["a", "b"])


def test_a_dataframe_is_matched_by_column_name(fruit) -> None:
    """Another column order and extra columns (the label among them) give what the recorded order gives; a
    Series is one sample."""
    ensemble, frame = fruit
    expected = ensemble.predict_proba(frame[FEATURES].to_numpy(np.float32))
    shuffled = frame[["kind", "constant", "weight", "size"]].assign(note="x")
    np.testing.assert_allclose(ensemble.predict_proba(shuffled), expected, atol=1e-6)
    one = ensemble.predict_proba(shuffled.iloc[7])
    assert one.shape == (3,)
    np.testing.assert_allclose(one, expected[7], atol=1e-6)
    # Taken in order, the shuffled numeric columns would give other probabilities: the match is by name.
    assert not np.allclose(ensemble.predict_proba(shuffled[["constant", "weight", "size"]].to_numpy(np.float32)),
                           expected, atol=1e-3)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.drop(columns=["weight"]), "lacks the feature column\\(s\\) 'weight'; this ensemble takes the "
                                          "columns 'size', 'weight', 'constant'"),
    (lambda f: f.assign(size=f["size"].astype(str)), "must be numeric.*'size' is not"),
    (lambda f: f.assign(weight=f["weight"].where(f.index != 3)), "empty cells: 'weight'"),
    (lambda f: pd.concat([f, f[["size"]]], axis=1), "more than one column named 'size'"),
])
def test_dataframe_errors_name_the_column(fruit, edit, message: str) -> None:
    ensemble, frame = fruit
    with pytest.raises(ValueError, match=message):
        ensemble.predict_proba(edit(frame))


def test_without_recorded_names_a_dataframe_is_taken_in_order(fruit) -> None:
    ensemble, frame = fruit
    unnamed = Ensemble(ensemble.members, input_shape=(3,), num_classes=3)  # a run from before names were kept
    rows = frame[FEATURES]
    np.testing.assert_allclose(unnamed.predict_proba(rows), unnamed.predict_proba(rows.to_numpy()), atol=1e-6)
    with pytest.raises(ValueError, match="recorded no feature names.*needs 3 columns.*got 4"):
        unnamed.predict_proba(frame)


def test_inputs_that_are_not_numbers_are_refused(fruit) -> None:
    ensemble, _ = fruit
    with pytest.raises(ValueError, match=r"expected numbers .*\(B, 3\).*'size', 'weight', 'constant'.*dtype <U"):
        ensemble.predict_proba([["a", "b", "c"]])
    with pytest.raises(ValueError, match=r"expected one sample of shape \(3,\) or a batch of shape \(N, 3\), "
                                         r"got \(2, 4\)"):
        ensemble.predict_proba(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="PIL images are taken by ensembles of image runs"):
        ensemble.predict_proba(Image.new("RGB", (3, 1)))


# --- images ----------------------------------------------------------------------------------------


def _image_ensemble(tmp_path: Path, mode: str = "RGB", image_size: list[int] | None = None):
    """An image-folder run's ensemble (from its data.json), its splits and its test folder."""
    write_images(tmp_path / "train", {"cat": 6, "dog": 6}, size=(10, 7), mode=mode)
    write_images(tmp_path / "test", {"cat": 2, "dog": 2}, size=(10, 7), mode=mode, seed=1)
    data = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "train"), validation_size=4,
                                   test_path=str(tmp_path / "test"), image_size=image_size))
    return _recorded(data, tmp_path), data, tmp_path / "test"


def test_image_runs_record_their_raw_form(tmp_path: Path) -> None:
    write_images(tmp_path / "g", {"a": 4, "b": 4}, mode="L")
    resized = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "g"), image_size=[4, 3]))
    assert resized.image == {"size": [4, 3], "mode": "L", "resize": "bilinear"}
    assert resized.description()["image"] == resized.image and resized.features is None
    kept = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "g"), channels=3))
    assert kept.image == {"size": [6, 5], "mode": "RGB", "resize": None}
    info_path = tmp_path / "run"
    info_path.mkdir()
    (info_path / "data.json").write_text(json.dumps(resized.description()))
    assert read_data_info(info_path).image == resized.image


def test_pil_images_and_channels_last_arrays_are_resized_as_the_run_resized(tmp_path: Path) -> None:
    """The run read 10x7 files resized to 8x8: a PIL image of such a file (and its uint8 HWC array, and a
    batch of either) gives the probabilities of the run's own model input for that file."""
    ensemble, data, test = _image_ensemble(tmp_path, image_size=[8, 8])
    assert ensemble.input_shape == (3, 8, 8) and ensemble.image == ImageForm((8, 8), "RGB", "bilinear")
    expected = _model_probs(ensemble, data.test.x[:2])  # test/cat/0.png and 1.png, sorted
    files = [test / "cat" / "0.png", test / "cat" / "1.png"]
    images = [Image.open(f) for f in files]
    np.testing.assert_allclose(ensemble.predict_proba(images[0]), expected[0], atol=1e-6)
    np.testing.assert_allclose(ensemble.predict_proba(images), expected, atol=1e-6)
    hwc = np.stack([np.asarray(i) for i in images])
    assert hwc.shape == (2, 10, 7, 3)
    np.testing.assert_allclose(ensemble.predict_proba(hwc), expected, atol=1e-6)
    np.testing.assert_allclose(ensemble.predict_proba(hwc[1]), expected[1], atol=1e-6)
    np.testing.assert_allclose(ensemble.predict_proba(hwc.transpose(0, 3, 1, 2)), expected, atol=1e-6)
    # A grayscale PIL image is converted to RGB as the run converted its files.
    gray = images[0].convert("L")
    np.testing.assert_allclose(ensemble.predict_proba(gray), ensemble.predict_proba(gray.convert("RGB")), atol=1e-7)
    # At the run's size, a channels-last tensor is laid out too, and stays a tensor.
    small = torch.from_numpy(ensemble.prepare(images).numpy().transpose(0, 2, 3, 1).copy())
    out = ensemble.predict_proba(small)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_grayscale_images_take_height_width_arrays(tmp_path: Path) -> None:
    ensemble, data, test = _image_ensemble(tmp_path, mode="L")
    assert ensemble.input_shape == (1, 10, 7) and ensemble.image.resize is None
    expected = _model_probs(ensemble, data.test.x[:2])
    pixels = np.stack([np.asarray(Image.open(test / "cat" / f"{i}.png")) for i in range(2)])
    assert pixels.shape == (2, 10, 7)
    np.testing.assert_allclose(ensemble.predict_proba(pixels), expected, atol=1e-6)
    np.testing.assert_allclose(ensemble.predict_proba(pixels[0]), expected[0], atol=1e-6)
    np.testing.assert_allclose(ensemble.predict_proba(pixels[..., None]), expected, atol=1e-6)
    np.testing.assert_allclose(ensemble.predict_proba(pixels[:, None]), expected, atol=1e-6)


def test_images_of_another_size_are_refused_with_the_size_to_use(tmp_path: Path) -> None:
    never_resized, _, _ = _image_ensemble(tmp_path / "a")
    with pytest.raises(ValueError, match=r"RGB images of 10x7 \(height x width\), got 9x9; the run never resized"):
        never_resized.predict_proba(Image.new("RGB", (9, 9)))
    with pytest.raises(ValueError, match="of 10x7 .* got 12x12; the run never resized"):
        never_resized.predict_proba(np.zeros((12, 12, 3), np.uint8))
    resized, _, _ = _image_ensemble(tmp_path / "b", image_size=[8, 8])
    assert resized.predict_proba(np.zeros((12, 12, 3), np.uint8)).shape == (2,)
    with pytest.raises(ValueError, match="of 8x8 .* got 12x12; .* from PIL images or uint8 arrays .* resize to 8x8"):
        resized.predict_proba(np.zeros((12, 12, 3), np.float32))
    with pytest.raises(ValueError, match="of 8x8 .* got 12x12"):
        resized.predict_proba(torch.zeros(12, 12, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected a batch of shape \(B, 3, 8, 8\), one such image, .*got an input "
                                         r"of shape \(5, 5\)"):
        resized.predict_proba(np.zeros((5, 5)))
    # The module itself takes only its batch form, and names it.
    with pytest.raises(ValueError, match=r"expected a batch of shape \(B, 3, 8, 8\): RGB images 8 high and 8 wide, "
                                         r"channels first.*resized to 8x8 first.*got a tensor of shape \(1, 8, 8, 3\)"):
        resized(torch.zeros(1, 8, 8, 3))


@pytest.mark.parametrize("record, field", [
    ({"size": [8], "mode": "RGB"}, "size should be"),
    ({"size": [8, 8], "mode": "CMYK"}, "mode should be"),
    ({"size": [8, 8], "mode": "RGB", "resize": "nearest"}, "resize should be"),
    ({"size": [8, 8], "mode": "L"}, "samples of shape \\(1, 8, 8\\)"),
    ({"size": [8, 8], "mode": "RGB", "crop": 2}, "an object with size, mode and resize"),
])
def test_a_wrong_image_record_is_named(tmp_path: Path, record: dict, field: str) -> None:
    (tmp_path / "data.json").write_text(json.dumps({"input_shape": [3, 8, 8], "num_classes": 2, "image": record}))
    with pytest.raises(RunDirError, match=f"data.json: 'image' .*{field}"):
        read_data_info(tmp_path)
