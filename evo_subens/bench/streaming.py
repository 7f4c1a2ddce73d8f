"""Streaming benchmark: training throughput of a streamed image folder against the same folder in memory.

In one process, on one image folder (a synthetic one unless ``folder`` is given), the same model from the
same initialisation is trained for ``epochs`` epochs by :func:`~evo_subens.tasks.classification.training.train`
on the training split loaded three ways:

``in memory``
    ``data.stream: false``: every image decoded once at load into one float32 tensor; batches are indexed.
``streamed, N workers``
    ``data.stream: true``: the training split stays in its files; each batch is read, decoded and
    preprocessed by ``N`` DataLoader worker processes (0: in the training process) while the model trains.

The methods are interleaved (each repeat runs every method once, in turn), so the ratios carry the same
background load; reported are the seconds to load the data, the median training samples per second, its
ratio to the in-memory path measured in this run, and whether the trained weights equal the in-memory
path's (they must: the same batches reach the model). ``--augment`` adds the random crop and flip to every
method alike.

    >>> streaming_bench(images=8000, size=64, workers=[0, 2])
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..core.config import DataConfig, ModelConfig, TrainConfig
from ..tasks.classification.data import load_dataset
from ..tasks.classification.models import build_model
from ..tasks.classification.training import train


def write_image_folder(root: Path, count: int, size: int, classes: int = 4, variants: int = 8,
                       seed: int = 0) -> None:
    """``count`` RGB PNG images of ``size`` x ``size`` in one sub-folder per class: each class a striped
    pattern plus noise, ``variants`` distinct encodings per class written round-robin (so a folder larger
    than memory is written in seconds; every file is still decoded on its own when read)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    columns = np.arange(size)[None, :] / size
    bank = []
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        pattern = np.stack([np.sin((c + 1) * 3 * columns + k) * 0.5 + 0.5 for k in range(3)], -1) * 180
        encoded = []
        for _ in range(variants):
            noise = rng.integers(0, 76, (size, size, 3))
            pixels = (np.broadcast_to(pattern, (size, size, 3)) + noise).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels, "RGB").save(buffer, "PNG", compress_level=1)
            encoded.append(buffer.getvalue())
        bank.append(encoded)
    for i in range(count):
        (root / f"class{i % classes}" / f"{i:06d}.png").write_bytes(bank[i % classes][(i // classes) % variants])


def streaming_bench(folder: str | None = None, images: int = 8000, size: int = 64, workers: list[int] = (0, 2),
                    epochs: int = 1, repeats: int = 3, batch_size: int = 128, model: str = "cnn2d",
                    augment: bool = False) -> list[dict]:
    """Print and return one row per method: load seconds, median training samples/s, ratio to in memory,
    whether the trained weights equal the in-memory path's."""
    with tempfile.TemporaryDirectory(prefix="evo-subens-streaming-") as scratch:
        root = Path(folder) if folder is not None else Path(scratch) / "images"
        if folder is None:
            started = time.perf_counter()
            write_image_folder(root, images, size)
            print(f"streaming: wrote {images:,} synthetic {size}x{size} RGB PNG images in "
                  f"{time.perf_counter() - started:.1f}s to {root}")
        methods = {"in memory": DataConfig(name="imagefolder", path=str(root), stream=False)}
        for count in workers:
            methods[f"streamed, {count} workers"] = DataConfig(name="imagefolder", path=str(root), stream=True,
                                                               num_workers=count)
        loaded, load_seconds = {}, {}
        for name, cfg in methods.items():
            started = time.perf_counter()
            loaded[name] = load_dataset(cfg)
            load_seconds[name] = time.perf_counter() - started
        data = loaded["in memory"]
        model_cfg = ModelConfig(name=model)
        train_cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.01)
        torch.manual_seed(0)
        start = build_model(model_cfg, data.input_shape, data.num_classes).state_dict()
        rates: dict[str, list[float]] = {name: [] for name in methods}
        weights: dict[str, dict] = {}
        for _ in range(repeats):
            for name, splits in loaded.items():
                net = build_model(model_cfg, splits.input_shape, splits.num_classes)
                net.load_state_dict(start)
                started = time.perf_counter()
                train(net, splits.train, train_cfg, seed=0, augment=augment)
                rates[name].append(epochs * len(splits.train) / (time.perf_counter() - started))
                weights[name] = net.state_dict()
    reference = weights["in memory"]
    base = statistics.median(rates["in memory"])
    rows = [{"method": name, "load_seconds": load_seconds[name], "samples_per_s": statistics.median(rates[name]),
             "ratio": statistics.median(rates[name]) / base,
             "same_weights": all(torch.equal(weights[name][k], reference[k]) for k in reference)}
            for name in methods]
    decoded = data.train.x.numel() * 4 + data.validation.x.numel() * 4 + data.test.x.numel() * 4
    print(f"streaming: {len(data.train):,} training images {tuple(data.input_shape)} "
          f"({decoded / 2**20:,.0f} MiB as float32 in memory), model {model}, batch {batch_size}, {epochs} "
          f"epoch(s), median of {repeats} interleaved repeats{', augmented' if augment else ''}")
    print(f"{'method':<22} {'load s':>8} {'samples/s':>10} {'x in memory':>12}  same weights")
    for row in rows:
        print(f"{row['method']:<22} {row['load_seconds']:>8.1f} {row['samples_per_s']:>10,.0f} "
              f"{row['ratio']:>12.2f}  {'yes' if row['same_weights'] else 'NO'}")
    return rows
