"""The classification task's config section: ``data`` (which dataset, where its files are, how it is split
and preprocessed). ``evo_subens.core.config.RunConfig`` composes it; ``evo-subens config --fields`` prints it."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.options import option
from ...errors import ConfigError

# Datasets ``data.name`` may name: the built-ins, then the formats of one's own data
# (evo_subens.tasks.classification.data.DATASETS holds their loaders).
DATASET_NAMES = ("mnist1d", "digits", "fashion-mnist", "csv", "npz", "imagefolder", "cifar10", "cifar100", "custom")
# Those whose preprocessing the config sets (data.scale, standardize, mean, std); the built-ins have theirs fixed.
OWN_DATA = ("csv", "npz", "imagefolder", "cifar10", "cifar100", "custom")
# Those that can be read on demand (data.stream).
STREAMABLE = ("csv", "npz", "imagefolder", "custom")


@dataclass
class DataConfig:
    name: str = option("mnist1d", "dataset: a built-in (mnist1d, digits, fashion-mnist), a format of your own data "
                                  "read from data.path (csv, npz, imagefolder, cifar10, cifar100), or custom "
                                  "(data.loader)", choices=DATASET_NAMES)
    path: str | None = option(None, "file or folder the data is read from: csv/npz: the file; imagefolder: a "
                                    "folder with one sub-folder of images per class; cifar10/cifar100: the "
                                    "folder of the python batches; fashion-mnist: the IDX files' folder "
                                    "(null = the Debian package's)")
    target: str | None = option(None, "csv: the label column (every other column is a numeric feature)")
    test_path: str | None = option(None, "csv/npz/imagefolder: a separate test set in the same format; null = "
                                         "the test split is carved from the data (data.test_size, seeded)")
    test_size: float = option(0.2, "share of the data carved off as the test split when the data has no test "
                                   "set of its own", gt=0, le=0.9)
    loader: str | None = option(None, "custom: an importable 'module:function' taking this DataConfig and "
                                      "returning (x, y), (x, y, x_test, y_test), a dict of those keys or a "
                                      "torch Dataset")
    seed: int = option(0, "seed of data generation (mnist1d) and of the train/validation/test split", ge=0)
    validation_size: float = option(0.2, "validation split carved from the training pool: a fraction "
                                         "(0 < v < 1) or a number of samples (>= 1)", gt=0)
    num_samples: int | None = option(None, "mnist1d: samples generated (default 5000, 80% training pool, "
                                           "20% test); other datasets: cap on the training pool", ge=10)
    scale: float | None = option(None, "own data: inputs are divided by this first (null = 255 for images, "
                                       "so pixels lie in [0, 1]; 1 for csv/npz/custom)", gt=0)
    standardize: bool | None = option(None, "own data: subtract the training split's mean and divide by its "
                                            "standard deviation, per feature (vectors) or per channel (images); "
                                            "null = true for csv/npz/custom, false for images")
    mean: list | None = option(None, "own data: fixed per-channel (or per-feature) means to subtract after "
                                     "scaling, e.g. [0.4914, 0.4822, 0.4465]; needs data.std; overrides "
                                     "data.standardize")
    std: list | None = option(None, "own data: fixed per-channel (or per-feature) standard deviations to divide "
                                    "by, with data.mean")
    image_size: list | None = option(None, "imagefolder: [height, width] every image is resized to (bilinear); "
                                           "null = keep (all images must then have one size)")
    channels: int | None = option(None, "imagefolder: 1 (grayscale) or 3 (RGB); null = 1 when every image is "
                                        "grayscale, else 3", choices=(1, 3))
    stream: bool | None = option(None, "csv/npz/imagefolder/custom (a Dataset): true = the training split stays "
                                       "in its file(s) and is read batch by batch (npz memory-mapped, csv rows "
                                       "parsed as needed, images decoded by DataLoader workers), validation and "
                                       "test held in their compact form (uint8 images); false = everything loaded "
                                       "as float32 arrays; null = stream when those arrays would exceed 1 GiB. "
                                       "Results are the same either way")
    num_workers: int = option(2, "streamed csv, images or Dataset: DataLoader worker processes that read and decode "
                             "batches ahead of training (0 = in the training process)", ge=0)
    augment: bool = option(False, "images: each training batch (parent, child tuning, fine-tuning, baselines) "
                                  "randomly cropped after 4-pixel zero padding and flipped left-right, seeded "
                                  "by the training seed; validation and test inputs are never augmented")

    def check(self) -> None:
        """Fields that only some datasets read are refused elsewhere, so none is silently ignored."""
        reads = {
            "path": ("csv", "npz", "imagefolder", "cifar10", "cifar100", "fashion-mnist"),
            "target": ("csv",),
            "test_path": ("csv", "npz", "imagefolder"),
            "loader": ("custom",),
            "image_size": ("imagefolder",),
            "channels": ("imagefolder",),
            "stream": STREAMABLE,
        }
        for name in ("scale", "standardize", "mean", "std"):
            reads[name] = OWN_DATA
        for name, readers in reads.items():
            if getattr(self, name) is not None and self.name not in readers:
                raise ConfigError(f"data.{name}", f"null for data.name {self.name!r} (read only by "
                                                  f"{', '.join(readers)})", getattr(self, name))
        needs = {"path": ("csv", "npz", "imagefolder", "cifar10", "cifar100"), "target": ("csv",),
                 "loader": ("custom",)}
        for name, readers in needs.items():
            if getattr(self, name) is None and self.name in readers:
                what = {"path": "the file or folder to read", "target": "the name of the CSV's label column",
                        "loader": "an importable 'module:function'"}[name]
                raise ConfigError(f"data.{name}", f"{what} (data.name is {self.name!r})", None)
        if self.loader is not None and ":" not in self.loader:
            raise ConfigError("data.loader", "'module:function'", self.loader)
        if (self.mean is None) != (self.std is None):
            raise ConfigError("data.mean" if self.mean is None else "data.std", "given together with "
                              f"data.{'std' if self.mean is None else 'mean'}", None)
        if self.mean is not None:
            for name in ("mean", "std"):
                values = getattr(self, name)
                if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    raise ConfigError(f"data.{name}", "a non-empty list of numbers", values)
            if len(self.mean) != len(self.std):
                raise ConfigError("data.std", f"as many values as data.mean ({len(self.mean)})", self.std)
            if min(self.std) <= 0:
                raise ConfigError("data.std", "values > 0", self.std)
        if self.image_size is not None and not (
                len(self.image_size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                  for v in self.image_size)):
            raise ConfigError("data.image_size", "[height, width], two whole numbers > 0", self.image_size)
