"""Architecture registry, module:Class loading and parent state_dict files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from evo_subens.core.config import ModelConfig
from evo_subens.errors import ConfigError, ParentFileError
from evo_subens.tasks.classification.models import (
    MODELS,
    build_model,
    classifier_parameter_names,
    load_parent_state,
)
from evo_subens.nn import count_parameters, load_state_file

SIGNAL = (1, 40)       # MNIST-1D
DIGITS = (1, 8, 8)     # sklearn digits
FASHION = (1, 28, 28)  # Fashion-MNIST

# The input kinds each registry entry supports.
SHAPES = {
    "mlp": [SIGNAL, DIGITS, FASHION],
    "cnn1d": [SIGNAL],
    "cnn2d": [DIGITS, FASHION],
    "lenet": [DIGITS, FASHION],
}


class TinyNet(nn.Module):
    """A user architecture loaded through 'module:Class'."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.body = nn.Linear(40, width)
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.body(x.flatten(1))))


class NotAModule:
    pass


def not_a_module_factory() -> object:
    return object()


def test_registry_covers_the_documented_names() -> None:
    assert set(MODELS) == set(SHAPES)


@pytest.mark.parametrize("name,shape", [(n, s) for n, shapes in SHAPES.items() for s in shapes])
def test_forward_shape_and_classifier(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), shape, 10)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 10)
    assert isinstance(model.classifier, nn.Linear)
    assert classifier_parameter_names(model) == ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("name", ["cnn2d", "lenet"])
def test_image_models_reject_signals(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name=name), SIGNAL, 10)
    assert err.value.field == "model.name"
    assert "(C, H, W)" in str(err.value)


def test_cnn1d_rejects_images() -> None:
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="cnn1d"), FASHION, 10)
    assert err.value.field == "model.name"
    assert "(C, L)" in str(err.value)


def test_deterministic_given_seed() -> None:
    torch.manual_seed(3)
    a = build_model(ModelConfig(name="cnn2d"), DIGITS, 10)
    torch.manual_seed(3)
    b = build_model(ModelConfig(name="cnn2d"), DIGITS, 10)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_parameter_counts() -> None:
    cnn = build_model(ModelConfig(name="cnn2d"), FASHION, 10)
    assert 80_000 <= count_parameters(cnn) <= 130_000
    big = build_model(ModelConfig(name="mlp", kwargs={"hidden": [2048, 2048, 2048]}), FASHION, 10)
    assert 9_000_000 <= count_parameters(big) <= 11_000_000
    assert count_parameters(nn.Linear(3, 2)) == 8


def test_kwargs_reach_the_builder() -> None:
    mlp = build_model(ModelConfig(name="mlp", kwargs={"hidden": [7], "dropout": 0.5}), SIGNAL, 3)
    assert mlp.classifier.in_features == 7 and mlp.classifier.out_features == 3
    assert any(isinstance(m, nn.Dropout) for m in mlp.modules())
    small = build_model(ModelConfig(name="lenet", kwargs={"size": "S"}), DIGITS, 10)
    wide = build_model(ModelConfig(name="lenet", kwargs={"width": 2.0}), DIGITS, 10)
    assert count_parameters(wide) > count_parameters(small)


@pytest.mark.parametrize("kwargs", [{"nonsense": 1}, {"hidden": "wide"}, {"hidden": [0]},
                                    {"dropout": 1.5}, {"num_classes": 3}])
def test_bad_registry_kwargs(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="mlp", kwargs=kwargs), SIGNAL, 10)
    assert err.value.field == "model.kwargs"


def test_unknown_name() -> None:
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="resnet999"), FASHION, 10)
    assert err.value.field == "model.name"
    assert "cnn1d" in str(err.value) and "resnet999" in str(err.value)


def test_classifier_parameter_names_takes_last_parameter_owner() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.ReLU())
    assert classifier_parameter_names(model) == ["2.weight", "2.bias"]
    assert classifier_parameter_names(nn.Sequential(nn.ReLU())) == []


def test_architecture_from_module_class() -> None:
    cfg = ModelConfig(architecture=f"{__name__}:TinyNet", kwargs={"width": 6})
    model = build_model(cfg, SIGNAL, 10)
    assert isinstance(model, TinyNet) and model.body.out_features == 6
    assert classifier_parameter_names(model) == ["out.weight", "out.bias"]

    linear = build_model(ModelConfig(architecture="torch.nn:Linear",
                                     kwargs={"in_features": 4, "out_features": 2}), SIGNAL, 10)
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (2, 4)


@pytest.mark.parametrize("spec", [
    "no_colon_here",
    "no_such_module_xyz:Net",
    "torch.nn:NoSuchClass",
    ":Linear",
    "torch.nn:",
    f"{__name__}:NotAModule",
    f"{__name__}:not_a_module_factory",
    f"{__name__}:SHAPES",
])
def test_bad_architecture_strings(spec: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(architecture=spec), SIGNAL, 10)
    assert err.value.field == "model.architecture"
    assert spec in str(err.value)


def test_bad_architecture_kwargs() -> None:
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(architecture="torch.nn:Linear", kwargs={"in_features": 4}), SIGNAL, 10)
    assert err.value.field == "model.kwargs"
    assert "out_features" in str(err.value)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    parent = build_model(ModelConfig(name="cnn1d"), SIGNAL, 10)
    path = tmp_path / "parent.pt"
    torch.save(parent.state_dict(), path)
    torch.manual_seed(1)
    child = build_model(ModelConfig(name="cnn1d"), SIGNAL, 10)
    load_parent_state(str(path), child)
    for (name, p), q in zip(parent.state_dict().items(), child.state_dict().values()):
        assert torch.equal(p, q), name


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParentFileError, match="nowhere.pt"):
        load_parent_state(tmp_path / "nowhere.pt", nn.Linear(2, 2))


def test_state_dict_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "lenet_parent.pt"
    torch.save(build_model(ModelConfig(name="lenet"), DIGITS, 10).state_dict(), path)
    model = build_model(ModelConfig(name="cnn2d"), DIGITS, 10)
    with pytest.raises(ParentFileError) as err:
        load_parent_state(path, model)
    message = str(err.value)
    assert "lenet_parent.pt" in message and "does not fit" in message
    assert "head.4.weight" in message  # a key only LeNet has


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "narrow.pt"
    torch.save(build_model(ModelConfig(name="mlp", kwargs={"hidden": [8]}), SIGNAL, 10).state_dict(), path)
    model = build_model(ModelConfig(name="mlp", kwargs={"hidden": [16]}), SIGNAL, 10)
    with pytest.raises(ParentFileError, match=r"narrow\.pt.*shape"):
        load_parent_state(path, model)


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b"", b"PK\x03\x04truncated zip"])
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(content)
    with pytest.raises(ParentFileError, match="corrupt.pt"):
        load_parent_state(path, nn.Linear(2, 2))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    # Saved through torch.save, so only weights_only keeps NotAModule from being unpickled.
    torch.save({"weight": NotAModule()}, path)
    with pytest.raises(ParentFileError, match="evil.pt"):
        load_parent_state(path, nn.Linear(2, 2))
    plain = tmp_path / "plain.pickle"
    plain.write_bytes(pickle.dumps(NotAModule()))
    with pytest.raises(ParentFileError, match="plain.pickle"):
        load_parent_state(plain, nn.Linear(2, 2))


@pytest.mark.parametrize("payload", [[torch.zeros(2)], {"weight": 3.0}, {0: torch.zeros(2)}])
def test_non_state_dict_contents(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    with pytest.raises(ParentFileError, match=r"odd\.pt.*not a state_dict"):
        load_parent_state(path, nn.Linear(2, 2))


def test_parent_files_may_be_safetensors(tmp_path: Path) -> None:
    """A parent file in the safetensors format loads, recognised by its suffix or by its header; torch files
    still load through the same reader."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_model(ModelConfig(name="mlp", kwargs={"hidden": [8]}), SIGNAL, 10).state_dict()
    target = build_model(ModelConfig(name="mlp", kwargs={"hidden": [8]}), SIGNAL, 10)

    def same(state: dict) -> bool:
        return state.keys() == source.keys() and all(torch.equal(state[k], v) for k, v in source.items())

    for name in ("parent.safetensors", "parent-in-safetensors.pt"):
        save_file(source, tmp_path / name)
        assert same(load_state_file(tmp_path / name))
        load_parent_state(tmp_path / name, target)
        assert same(target.state_dict())
    torch.save(source, tmp_path / "parent.pt")
    assert same(load_state_file(tmp_path / "parent.pt"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_a_broken_safetensors_parent_is_a_parent_file_error(tmp_path: Path, damage: str) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "parent.safetensors"
    model = build_model(ModelConfig(name="mlp", kwargs={"hidden": [8]}), SIGNAL, 10)
    save_file(model.state_dict(), path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    else:  # readable, but another architecture's weights
        save_file({"weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ParentFileError, match="parent.safetensors"):
        load_parent_state(path, model)
