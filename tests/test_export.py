"""The ensemble as a module (load_ensemble, Ensemble) and its export (evo-subens export): predictions equal
the mean of the members' softmax however they are run, and every exported file predicts the same in a
Python that cannot import evo_subens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import evo_subens
from evo_subens import cli
from evo_subens.core.config import ModelConfig
from evo_subens.data_info import InputTransform, read_data_info
from evo_subens.ensemble import Ensemble, load_ensemble
from evo_subens.errors import ExportError, ParentFileError, RunDirError
from evo_subens.export import FORMATS, export_ensemble, write_ensemble
from evo_subens.nn import load_state_file
from evo_subens.tasks.classification.data import load_dataset
from evo_subens.tasks.classification.models import build_model

SHAPE = (1, 8, 8)
TRANSFORM = {"scale": 16.0, "mean": [[[0.3]]], "std": [[[0.2]]]}
GRAPH_FORMATS = ["torchscript", "pt2", "onnx"]
# Fine-tuned members are stored in members/ (the rest of the tiny config: conftest.TINY).
EXPORT_RUN = {"name": "export", "finetune": {"epochs": 1}}


def _members(name: str, count: int = 3, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    kwargs = {"hidden": [16]} if name == "mlp" else {"channels": [4, 8], "hidden": 16}
    return [build_model(ModelConfig(name=name, kwargs=kwargs), SHAPE, 10).eval() for _ in range(count)]


def _raw_batch(count: int, seed: int = 0) -> np.ndarray:
    """Digits-like raw pixels: integers 0..16, as uint8."""
    return np.random.default_rng(seed).integers(0, 17, size=(count, *SHAPE)).astype(np.uint8)


def _by_hand(members: list[nn.Module], x: torch.Tensor, transform: dict | None) -> torch.Tensor:
    """The mean of the members' softmax outputs, computed plainly."""
    if transform is not None:
        x = (x.float() / transform["scale"] - torch.tensor(transform["mean"])) / torch.tensor(transform["std"])
    with torch.no_grad():
        return torch.stack([m(x.float()).softmax(dim=1) for m in members]).mean(dim=0)


# --- Ensemble, built from modules ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn2d"])
def test_predict_proba_is_the_mean_of_the_members_softmax(name: str) -> None:
    """numpy in -> numpy out, tensor in -> tensor out, one sample in -> no batch dimension out; the raw
    input goes through the transform; chunking changes nothing."""
    members = _members(name)
    ensemble = Ensemble(members, input_shape=SHAPE, num_classes=10, transform=TRANSFORM)
    raw = _raw_batch(7)
    expected = _by_hand(members, torch.from_numpy(raw), TRANSFORM)

    probs = ensemble.predict_proba(raw)
    assert isinstance(probs, np.ndarray) and probs.shape == (7, 10)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-6)
    one = ensemble.predict_proba(raw[3])
    assert isinstance(one, np.ndarray) and one.shape == (10,)
    np.testing.assert_allclose(one, expected[3].numpy(), atol=1e-6)
    tensor = ensemble.predict_proba(torch.from_numpy(raw).float(), batch_size=2)
    assert isinstance(tensor, torch.Tensor) and not tensor.requires_grad
    torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=0)
    assert ensemble.predict_proba(torch.from_numpy(raw[0])).shape == (10,)

    assert np.array_equal(ensemble.predict(raw), expected.argmax(dim=1).numpy())
    assert ensemble.predict(raw[3]) == expected[3].argmax().item()
    member_probs = ensemble.member_probs(raw)
    assert member_probs.shape == (3, 7, 10) and ensemble.member_probs(raw[0]).shape == (3, 10)
    np.testing.assert_allclose(member_probs.mean(axis=0), probs, atol=1e-6)
    assert ensemble.vectorise and ensemble.vmap_error is None


@pytest.mark.parametrize("name", ["mlp", "cnn2d"])
def test_vmap_and_the_loop_agree(name: str) -> None:
    ensemble = Ensemble(_members(name), input_shape=SHAPE, num_classes=10)
    x = torch.from_numpy(_raw_batch(5)).float()
    with torch.no_grad():
        vectorised = ensemble.vmapped_probs(x)
        looped = ensemble.looped_probs(x)
    assert vectorised.shape == (3, 5, 10)
    torch.testing.assert_close(vectorised, looped, atol=1e-6, rtol=0)
    # The loop runs each member with its slice of the stacked weights: exactly the member itself.
    with torch.no_grad():
        assert all(torch.equal(looped[i], m(x).softmax(dim=1)) for i, m in enumerate(ensemble.members))


class Branchy(nn.Module):
    """Data-dependent control flow, which vmap cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if out.sum() > 0 else -out


def test_an_architecture_vmap_cannot_run_falls_back_to_a_loop_once() -> None:
    torch.manual_seed(0)
    members = [Branchy().eval() for _ in range(3)]
    ensemble = Ensemble(members, input_shape=(4,), num_classes=3)
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"expected one sample of shape \(4,\)"):
        ensemble.predict_proba(torch.randn(6, 5))
    assert ensemble.vectorise  # a wrong input is not held against vmap
    probs = ensemble.predict_proba(x)
    assert not ensemble.vectorise and "Error" in ensemble.vmap_error  # remembered, with the reason
    torch.testing.assert_close(probs, _by_hand(members, x, None), atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError):  # the loop's own error for an input the members reject
        ensemble.stacked_probs(torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"expected a batch of shape \(B, 4\), got a tensor of shape \(6, 5\)"):
        ensemble(torch.randn(6, 5))  # the module names the shape it takes before any member runs


def test_the_module_state_is_the_stacked_weights_and_the_transform() -> None:
    ensemble = Ensemble(_members("mlp"), input_shape=SHAPE, num_classes=10, transform=TRANSFORM)
    state = ensemble.state_dict()
    assert set(state) == {"transform.scale", "transform.mean", "transform.std", "stack.features.1.weight",
                          "stack.features.1.bias", "stack.classifier.weight", "stack.classifier.bias"}
    assert state["stack.classifier.weight"].shape == (3, 10, 16)
    assert torch.equal(state["stack.classifier.weight"][1], ensemble.members[1].classifier.weight)
    x = torch.from_numpy(_raw_batch(4)).float()
    before = ensemble.predict_proba(x)
    ensemble.double()  # .to() reaches the stacked weights and the transform's buffers alike
    assert all(t.dtype == torch.float64 for t in ensemble.state_dict().values())
    torch.testing.assert_close(ensemble.predict_proba(x).float(), before, atol=1e-6, rtol=0)
    assert not ensemble.training and ensemble(x).requires_grad  # the module itself keeps gradients


def test_input_transform_is_the_identity_without_one() -> None:
    x = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    assert torch.equal(InputTransform(None)(x), x.float()) and InputTransform(None).to_dict() is None
    transform = InputTransform({"scale": 2.0, "mean": [1.0, 0.0, 0.0], "std": None})
    assert torch.equal(transform(x), x.float() / 2 - torch.tensor([1.0, 0.0, 0.0]))
    assert transform.to_dict() == {"scale": 2.0, "mean": [1.0, 0.0, 0.0], "std": None}


# --- what the files record ------------------------------------------------------------------------------


def test_the_description_holds_only_what_was_used(tmp_path: Path) -> None:
    """A user architecture is recorded without the registry name it made unused, in config.yaml (which still
    loads) and in the exported metadata; a CSV run's columns are recorded in order."""
    from safetensors import safe_open

    from conftest import build_tiny_config
    from evo_subens.core.config import config_from_dict
    from evo_subens.core.logs import read_run_config
    from evo_subens.core.rundir import write_run_config
    from evo_subens.export import description

    cfg = build_tiny_config(tmp_path, {"model": {"architecture": "fruitnets:FruitNet", "kwargs": {"hidden": [4]}}})
    assert cfg.model.name == "mlp"  # given beside the architecture, as a config may
    write_run_config(tmp_path, cfg)
    assert "name" not in read_run_config(tmp_path)["model"]
    assert config_from_dict(read_run_config(tmp_path)).model.architecture == "fruitnets:FruitNet"
    ensemble = Ensemble(_members("mlp"), input_shape=SHAPE, num_classes=10, config=cfg)
    assert description(ensemble)["model"] == {"architecture": "fruitnets:FruitNet", "kwargs": {"hidden": [4]}}
    registry = build_tiny_config(tmp_path)
    write_run_config(tmp_path, registry)
    assert read_run_config(tmp_path)["model"] == {"name": "mlp", "kwargs": {"hidden": [32]}, "architecture": None,
                                                  "parent_path": None}

    torch.manual_seed(0)
    tabular = Ensemble([build_model(ModelConfig(name="mlp", kwargs={"hidden": [4]}), (3,), 2)], input_shape=(3,),
                       num_classes=2, features=["size", "weight", "constant"], classes=["no", "yes"], config=cfg)
    write_ensemble(tabular, "safetensors", tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as handle:
        described = json.loads(handle.metadata()["evo_subens"])
    assert described["features"] == ["size", "weight", "constant"] and described["classes"] == ["no", "yes"]
    assert described["input"] == ("a float32 batch of shape (B, 3): the columns 'size', 'weight', 'constant' in "
                                  "that order")
    assert described["model"] == {"architecture": "fruitnets:FruitNet", "kwargs": {"hidden": [4]}}


# --- data.json -------------------------------------------------------------------------------------------


def test_data_json_is_read(tmp_path: Path) -> None:
    assert read_data_info(tmp_path) is None  # runs from before data.json
    (tmp_path / "data.json").write_text(json.dumps({"input_shape": [3, 4, 4], "num_classes": 2,
                                                    "classes": ["cat", "dog"], "transform": {
                                                        "scale": 255.0, "mean": [[[0.5]], [[0.4]], [[0.3]]],
                                                        "std": [[[0.2]], [[0.2]], [[0.2]]]}}))
    info = read_data_info(tmp_path)
    assert info.input_shape == (3, 4, 4) and info.num_classes == 2 and info.classes == ["cat", "dog"]
    assert info.features is None and info.image is None  # as written before runs recorded them
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
    ('{"input_shape": [3], "num_classes": 2, "features": ["a", "b"]}', "'features'"),
    ('{"input_shape": [2], "num_classes": 2, "features": ["a", 1]}', "'features'"),
    ('{"input_shape": [1, 2], "num_classes": 2, "features": ["a", "b"]}', "'features'"),
])
def test_a_corrupt_data_json_is_named(tmp_path: Path, text: str, field: str) -> None:
    (tmp_path / "data.json").write_text(text)
    with pytest.raises(RunDirError, match="data.json") as info:
        read_data_info(tmp_path)
    assert field in str(info.value)


# --- a finished run --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tiny_config, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    return evo_subens.run(tiny_config(folder / "runs", EXPORT_RUN), progress=lambda line: None).run_dir


@pytest.fixture(scope="module")
def test_x(run_dir) -> torch.Tensor:
    """Raw test inputs of the run (digits has no transform: the splits are the raw form)."""
    return load_dataset(load_ensemble(run_dir).config.data).test.x[:7]


@pytest.mark.slow
def test_load_ensemble_is_a_module_that_needs_no_data(run_dir, test_x) -> None:
    ensemble = load_ensemble(run_dir)
    assert isinstance(ensemble, nn.Module) and isinstance(ensemble, evo_subens.Ensemble)
    assert (run_dir / "members" / "0.pt").is_file()  # fine-tuned members are loaded from their files
    assert ensemble.num_members == len(ensemble.members) == 3 and ensemble.input_shape == SHAPE
    assert ensemble.classes is None and ensemble.num_classes == 10 and ensemble.parent is not None
    assert not any(m.training for m in [*ensemble.members, ensemble.parent])
    expected = _by_hand(ensemble.members, test_x, None)
    np.testing.assert_allclose(ensemble.predict_proba(test_x.numpy()), expected.numpy(), atol=1e-6)
    torch.testing.assert_close(ensemble.predict_proba(test_x[2]), expected[2], atol=1e-6, rtol=0)
    ensemble.vectorise = False
    torch.testing.assert_close(ensemble.predict_proba(test_x), expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_data_json_gives_the_ensemble_its_raw_form(run_dir, test_x, tmp_path: Path) -> None:
    """With a data.json, the ensemble takes data in its raw form: here pixels x 16 (digits' own scale)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "data.json").write_text(json.dumps({"input_shape": list(SHAPE), "num_classes": 10,
                                                "classes": [str(d) for d in range(10)],
                                                "transform": {"scale": 16.0, "mean": None, "std": None}}))
    ensemble = load_ensemble(copy)
    assert ensemble.classes == [str(d) for d in range(10)]
    torch.testing.assert_close(ensemble.predict_proba(test_x * 16), load_ensemble(run_dir).predict_proba(test_x),
                               atol=1e-6, rtol=0)


def _predict_without_evo_subens(fmt: str, path: Path, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    """``path`` loaded and run on ``x`` in a fresh Python in which evo_subens cannot be imported."""
    np.save(tmp_path / "x.npy", x)
    loaders = {
        "torchscript": "model = torch.jit.load(path)\npredict = lambda x: model(torch.from_numpy(x)).detach().numpy()",
        "pt2": ("model = torch.export.load(path).module()\n"
                "predict = lambda x: model(torch.from_numpy(x)).detach().numpy()"),
        "onnx": ("import onnxruntime\nsession = onnxruntime.InferenceSession(path)\n"
                 "predict = lambda x: session.run(None, {'x': x})[0]"),
    }
    script = "\n".join([
        "import sys", "sys.modules['evo_subens'] = None",
        "try:\n    import evo_subens\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('evo_subens imported')",
        "import numpy as np, torch", f"path = {str(path)!r}", loaders[fmt],
        "x = np.load('x.npy')",
        "np.save('out.npy', np.stack([predict(x)[0], predict(x[:1])[0]]))",
        "np.save('all.npy', predict(x))",
    ])
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(first[0], first[1], atol=1e-5)  # batch 1 gives what batch 7 gave
    return np.load(tmp_path / "all.npy")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
def test_exported_graphs_predict_like_the_ensemble(run_dir, test_x, fmt: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    path = export_ensemble(run_dir, fmt)
    assert path == run_dir / "export" / f"ensemble{FORMATS[fmt]}" and path.stat().st_size > 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"[export] wrote {path} ({fmt}, 3 members") and line.endswith("B)")
    assert not list(path.parent.glob(".*.tmp"))
    x = test_x.numpy()
    probs = _predict_without_evo_subens(fmt, path, x, tmp_path)
    assert probs.shape == (7, 10)
    np.testing.assert_allclose(probs, load_ensemble(run_dir).predict_proba(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_an_architecture_exported_in_a_loop_predicts_alike(fmt: str, tmp_path: Path) -> None:
    """Vmapped convolutions fix the batch size under torch.export: the exporter falls back to the loop."""
    members = _members("cnn2d")
    ensemble = Ensemble(members, input_shape=SHAPE, num_classes=10, transform=TRANSFORM)
    assert write_ensemble(ensemble, fmt, tmp_path / "cnn.bin") == ", in a loop"
    x = _raw_batch(7).astype(np.float32)
    probs = _predict_without_evo_subens(fmt, tmp_path / "cnn.bin", x, tmp_path)
    np.testing.assert_allclose(probs, _by_hand(members, torch.from_numpy(x), TRANSFORM).numpy(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
def test_exported_image_ensembles_say_and_check_the_input_they_take(fmt: str, tmp_path: Path) -> None:
    """The graphs take the module's batch form (channels first, the run's size): what the ensemble makes of
    PIL images gives the ensemble's probabilities; another size is refused naming the size; the metadata
    says the form."""
    from PIL import Image

    torch.manual_seed(0)
    members = [build_model(ModelConfig(name="mlp", kwargs={"hidden": [8]}), (3, 8, 8), 4).eval() for _ in range(2)]
    ensemble = Ensemble(members, input_shape=(3, 8, 8), num_classes=4, transform={"scale": 255.0},
                        image={"size": [8, 8], "mode": "RGB", "resize": "bilinear"})
    path = tmp_path / f"images{FORMATS[fmt]}"
    write_ensemble(ensemble, fmt, path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)) for _ in range(3)]
    x = ensemble.prepare(images).numpy().astype(np.float32)
    assert x.shape == (3, 3, 8, 8)
    probs = _predict_without_evo_subens(fmt, path, x, tmp_path)
    np.testing.assert_allclose(probs, ensemble.predict_proba(images), atol=1e-5)

    if fmt == "onnx":
        import onnx
        import onnxruntime

        described = {p.key: p.value for p in onnx.load(str(path)).metadata_props}["evo_subens"]
        run = lambda batch: onnxruntime.InferenceSession(str(path)).run(None, {"x": batch})[0]  # noqa: E731
    else:
        extra = {"ensemble.json": ""}
        module = (torch.jit.load(str(path), _extra_files=extra) if fmt == "torchscript" else
                  torch.export.load(str(path), extra_files=extra).module())
        described = extra["ensemble.json"]
        run = lambda batch: module(torch.from_numpy(batch))  # noqa: E731
    described = json.loads(described)
    assert described["image"] == {"size": [8, 8], "mode": "RGB", "resize": "bilinear"}
    assert described["input"].startswith("a float32 batch of shape (B, 3, 8, 8): RGB images 8 high and 8 wide, "
                                         "channels first") and "resize((8, 8), Image.BILINEAR)" in described["input"]
    # Each runtime's own error type; each names the size: TorchScript the whole form, the others the dimension.
    with pytest.raises(Exception, match=r"\(B, 3, 8, 8\)|size\(\)\[2\] == 8|Expected: 8"):
        run(np.zeros((1, 3, 9, 9), np.float32))


@pytest.mark.slow
def test_safetensors_export_holds_the_members_and_a_description(run_dir, tmp_path: Path) -> None:
    out = tmp_path / "weights" / "ensemble.safetensors"
    assert export_ensemble(run_dir, "safetensors", out, progress=lambda line: None) == out
    script = ("import sys, json\nsys.modules['evo_subens'] = None\nfrom safetensors import safe_open\n"
              f"with safe_open({str(out)!r}, 'pt') as f:\n    print(json.dumps([sorted(f.keys()), f.metadata()]))")
    proc = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60)
    keys, metadata = json.loads(proc.stdout)
    ensemble = load_ensemble(run_dir)
    states = [m.state_dict() for m in ensemble.members]
    assert keys == sorted(f"member.{i}.{k}" for i, s in enumerate(states) for k in s)
    tensors = load_state_file(out)
    assert all(torch.equal(tensors[f"member.{i}.{k}"], v) for i, s in enumerate(states) for k, v in s.items())
    described = json.loads(metadata["evo_subens"])
    assert described["input_shape"] == list(SHAPE) and described["num_classes"] == 10
    assert described["members"] == 3 and described["format_version"] == 1 and described["transform"] is None
    assert described["model"] == {"name": "mlp", "kwargs": {"hidden": [32]}}
    assert described["features"] is None and described["image"] is None
    assert described["input"] == "a float32 batch of shape (B, 1, 8, 8)"


@pytest.mark.slow
def test_a_safetensors_parent_starts_a_run(run_dir, tiny_config, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    parent = load_state_file(run_dir / "parent.pt")
    save_file(parent, tmp_path / "parent.safetensors")
    small = {"search": {"population": 4, "generations": 1}, "ensemble": {"size": 2}}
    result = evo_subens.run(tiny_config(tmp_path / "runs", dict(small, name="given", model={
        "name": "mlp", "kwargs": {"hidden": [32]}, "parent_path": str(tmp_path / "parent.safetensors")})),
        progress=lambda line: None)
    given = load_state_file(result.run_dir / "parent.pt")
    assert given.keys() == parent.keys() and all(torch.equal(given[k], parent[k]) for k in parent)
    (tmp_path / "broken.safetensors").write_bytes((tmp_path / "parent.safetensors").read_bytes()[:50])
    with pytest.raises(ParentFileError, match="broken.safetensors"):
        evo_subens.run(tiny_config(tmp_path / "runs", dict(small, name="broken", model={
            "name": "mlp", "kwargs": {"hidden": [32]}, "parent_path": str(tmp_path / "broken.safetensors")})),
            progress=lambda line: None)


# --- the command line ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_export_writes_where_asked(run_dir, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ensemble.pt"
    out.write_bytes(b"old")  # replaced whole
    assert cli.main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 0
    assert torch.jit.load(str(out))(torch.zeros(1, *SHAPE)).shape == (1, 10)
    assert f"[export] wrote {out} (torchscript, 3 members, in a loop," in capsys.readouterr().out


@pytest.mark.slow
def test_cli_export_errors_exit_2(run_dir, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["export", str(run_dir), "--format", "keras"]) == 2
    assert "unknown export format 'keras'; expected one of torchscript, pt2, onnx, safetensors" in \
        capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "config.yaml", unfinished / "config.yaml")
    assert cli.main(["export", str(unfinished), "--format", "pt2"]) == 2
    assert "the run has not finished" in capsys.readouterr().err and not (unfinished / "export").exists()
    assert cli.main(["export", str(tmp_path / "nowhere"), "--format", "pt2"]) == 2
    assert "does not exist" in capsys.readouterr().err
    blocked = run_dir / "config.yaml" / "ensemble.pt"  # its folder would be a file
    assert cli.main(["export", str(run_dir), "--format", "torchscript", "--out", str(blocked)]) == 2
    assert f"cannot write {blocked}" in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_without_its_packages_says_what_to_install(run_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ExportError, match=r"onnxscript: pip install -e '\.\[export\]'"):
        export_ensemble(run_dir, "onnx", progress=lambda line: None)
