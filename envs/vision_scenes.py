"""NYUv2 and CityScapes in the preprocessed ``.npy`` layout of MTAN / LibMTL (:class:`NYUv2`,
:class:`CityScapes`). A missing or damaged file raises :class:`~.vision.DataError` with one line."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .vision import DataError

__all__ = ["NYUv2", "CityScapes"]


class _NpyScenes(Dataset):
    """``ROOT/{train,val}/<field>/<i>.npy`` with i = 0..N-1 in every field folder.

    Items are ``(image float32 [3, H, W], {task: target})``. Sizes are read from the files
    (the real data is 288x384 for NYUv2 and 128x256 for CityScapes; the test fixtures are
    smaller).
    """

    name = ""
    fields: dict[str, str] = {}  # task -> folder

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        split = {"test": "val", "valid": "val", "validation": "val"}.get(split, split)
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; choose 'train' or 'val'")
        self.root, self.split = Path(root), split
        self.path = self.root / split
        folders = ["image", *self.fields.values()]
        expected = f"{self.root}/{split}/{{{','.join(folders)}}}/<i>.npy"
        try:
            names = [f for f in os.listdir(self.path / "image") if f.endswith(".npy")]
        except OSError:
            raise DataError(f"{self.name} not found under {self.root}: expected {expected} "
                            "(MTAN/LibMTL preprocessed layout)") from None
        self.n = len(names)
        for folder in folders:
            d = self.path / folder
            missing = [i for i in range(self.n) if not (d / f"{i}.npy").is_file()]
            if self.n == 0 or missing:
                what = "no samples" if self.n == 0 else f"missing {folder}/{missing[0]}.npy"
                raise DataError(f"{self.name} incomplete under {self.root}: expected {expected} "
                                f"for i = 0..N-1 ({what})")

    def __len__(self) -> int:
        return self.n

    def _load(self, folder: str, i: int) -> np.ndarray:
        f = self.path / folder / f"{i}.npy"
        try:
            return np.load(f, allow_pickle=False)  # data, never code
        except (OSError, ValueError) as e:
            raise DataError(f"{self.name}: cannot read {f} ({e})") from None

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        image = self._load("image", i)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise DataError(f"{self.name}: image/{i}.npy has shape {image.shape}, expected [H, W, 3]")
        hw = image.shape[:2]
        out = {}
        for task, folder in self.fields.items():
            a = self._load(folder, i)
            want = {"segmentation": hw, "depth": (*hw, 1), "normal": (*hw, 3)}[task]
            if a.shape != want:
                raise DataError(f"{self.name}: {folder}/{i}.npy has shape {a.shape}, expected {list(want)}")
            if task == "segmentation":
                out[task] = torch.from_numpy(np.rint(a).astype(np.int64))
            else:
                out[task] = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float32))
        img = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32))
        return img, out


class NYUv2(_NpyScenes):
    """NYUv2 as preprocessed by MTAN (Liu et al. 2019) and used by LibMTL.

    Layout: ``ROOT/{train,val}/{image,label,depth,normal}/<i>.npy`` with image
    ``[288, 384, 3]`` float, label ``[288, 384]`` (13 classes, -1 = ignore), depth
    ``[288, 384, 1]`` (0 = missing) and normal ``[288, 384, 3]`` (0 vector = missing).
    Items: ``(image [3, H, W] float32, {"segmentation": int64 [H, W], "depth": float32
    [1, H, W], "normal": float32 [3, H, W]})``. Segmentation is int64 (LibMTL returns it as
    float); ``split`` 'test' is an alias of 'val' (the files have no separate test split).
    """

    name = "NYUv2"
    n_classes = 13
    fields = {"segmentation": "label", "depth": "depth", "normal": "normal"}


class CityScapes(_NpyScenes):
    """CityScapes as preprocessed by MTAN: ``ROOT/{train,val}/{image,label_7,label_19,depth}/<i>.npy``
    with image ``[128, 256, 3]``, labels ``[128, 256]`` (-1 = ignore) and depth ``[128, 256, 1]``.

    ``n_classes`` 7 (default, the MTAN/LibMTL benchmark) or 19 picks ``label_7`` / ``label_19``.
    LibMTL's own download stores the 7-class labels as ``label/``; that folder is used when
    ``label_7`` is absent. Items: ``(image [3, H, W], {"segmentation": int64 [H, W],
    "depth": float32 [1, H, W]})``.
    """

    name = "CityScapes"

    def __init__(self, root: str | os.PathLike, split: str = "train", n_classes: int = 7):
        if n_classes not in (7, 19):
            raise ValueError("n_classes must be 7 or 19")
        self.n_classes = n_classes
        folder = f"label_{n_classes}"
        s = {"test": "val", "valid": "val", "validation": "val"}.get(split, split)
        if n_classes == 7 and not (Path(root) / s / folder).is_dir() and (Path(root) / s / "label").is_dir():
            folder = "label"
        self.fields = {"segmentation": folder, "depth": "depth"}
        super().__init__(root, split)
