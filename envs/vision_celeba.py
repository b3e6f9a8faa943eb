"""CelebA multi-label attributes (:class:`CelebA`, the 9-task set :data:`CELEBA_9_TASKS`). A missing
or damaged file raises :class:`~.vision.DataError` with one line."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .vision import DataError

__all__ = ["CelebA", "CELEBA_9_TASKS", "read_celeba_attributes", "read_celeba_partition"]


CELEBA_9_TASKS = (
    "5_o_Clock_Shadow", "Black_Hair", "Blond_Hair", "Brown_Hair", "Goatee",
    "Mustache", "No_Beard", "Rosy_Cheeks", "Wearing_Hat",
)
"""The 9-attribute CelebA task set of the task-grouping literature (TAG, Fifty et al. 2021,
and work following it). We could not confirm which 9 attributes CoNAL-Pro uses; pass
``tasks=`` to choose others."""


def read_celeba_attributes(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """``list_attr_celeba.txt``: a count line, the attribute names line, then
    ``<file> <40 values in {1, -1}>`` per image. Returns (files, names, int8 [N, A])."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise DataError(f"cannot read {p} ({e.strerror or e})") from None
    try:
        n = int(lines[0].strip())
        names = lines[1].split()
        rows = [ln.split() for ln in lines[2:] if ln.strip()]
        if len(rows) != n:
            raise DataError(f"{p.name}: header says {n} images but {len(rows)} rows follow")
        files = [r[0] for r in rows]
        values = np.array([[int(v) for v in r[1:]] for r in rows], dtype=np.int8).reshape(n, -1)
    except (IndexError, ValueError) as e:
        raise DataError(f"{p.name}: not in list_attr_celeba format ({e})") from None
    if values.shape[1] != len(names) or not np.isin(values, (-1, 1)).all():
        raise DataError(f"{p.name}: each row needs {len(names)} values in {{1, -1}}")
    return files, names, values


def read_celeba_partition(path: str | os.PathLike) -> dict[str, int]:
    """``list_eval_partition.txt``: ``<file> <0|1|2>`` (train / valid / test)."""
    p = Path(path)
    try:
        out = {}
        for ln in p.read_text().splitlines():
            if ln.strip():
                f, s = ln.split()
                out[f] = int(s)
        return out
    except OSError as e:
        raise DataError(f"cannot read {p} ({e.strerror or e})") from None
    except ValueError as e:
        raise DataError(f"{p.name}: not in list_eval_partition format ({e})") from None


class CelebA(Dataset):
    """CelebA binary attributes as a multi-task problem (one task per attribute).

    Files under ``root`` (the standard release): ``list_attr_celeba.txt``,
    ``list_eval_partition.txt`` and the aligned JPEGs ``img_align_celeba/<file>``.
    Decoding JPEGs needs Pillow, which is not a dependency of this package; without it (or
    with ``image_source="npy"``) the images come from ``ROOT/img_align_celeba.npy``, a uint8
    ``[N, H, W, 3]`` array in the row order of ``list_attr_celeba.txt`` (the whole release,
    already resized as you like), loaded memory-mapped.

    Items: ``(image float32 [3, H, W] in [0, 1], labels int64 [T] in {0, 1})`` for the
    attributes ``tasks`` (default :data:`CELEBA_9_TASKS`). ``image_size=(h, w)`` resizes
    JPEGs bilinearly (npy images must already have the wanted size).
    """

    SPLITS = {"train": 0, "valid": 1, "val": 1, "test": 2}

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        tasks: Sequence[str] = CELEBA_9_TASKS,
        image_size: tuple[int, int] | None = None,
        image_source: str = "auto",
    ):
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {sorted(self.SPLITS)}")
        if image_source not in ("auto", "jpg", "npy"):
            raise ValueError("image_source must be 'auto', 'jpg' or 'npy'")
        self.root = Path(root)
        expected = (f"CelebA not found under {self.root}: expected list_attr_celeba.txt, "
                    "list_eval_partition.txt and img_align_celeba/*.jpg (or img_align_celeba.npy)")
        attr, part = self.root / "list_attr_celeba.txt", self.root / "list_eval_partition.txt"
        if not attr.is_file() or not part.is_file():
            raise DataError(expected)
        files, names, values = read_celeba_attributes(attr)
        partition = read_celeba_partition(part)
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise ValueError(f"unknown CelebA attributes {unknown}; the file has {names}")
        self.tasks = tuple(tasks)
        try:
            keep = np.array([partition[f] == self.SPLITS[split] for f in files], dtype=bool)
        except KeyError as e:
            raise DataError(f"{part.name} has no entry for {e.args[0]}") from None
        self.rows = np.flatnonzero(keep)
        self.files = [files[i] for i in self.rows]
        cols = [names.index(t) for t in self.tasks]
        self.labels = torch.from_numpy((values[self.rows][:, cols] > 0).astype(np.int64))
        self.image_size = image_size
        self._npy = None
        jpg_dir, npy = self.root / "img_align_celeba", self.root / "img_align_celeba.npy"
        use_jpg = image_source == "jpg" or (image_source == "auto" and jpg_dir.is_dir() and _has_pil())
        if use_jpg:
            if not _has_pil():
                raise DataError("CelebA JPEGs need Pillow (pip install pillow), or provide img_align_celeba.npy")
            if not jpg_dir.is_dir():
                raise DataError(expected)
            self._jpg_dir = jpg_dir
        else:
            if not npy.is_file():
                raise DataError(expected + ("" if _has_pil() else "; Pillow is not installed, so the .npy is needed"))
            arr = np.load(npy, mmap_mode="r", allow_pickle=False)  # data, never code
            if arr.ndim != 4 or arr.shape[0] != len(files) or arr.shape[-1] != 3 or arr.dtype != np.uint8:
                raise DataError(f"{npy.name}: expected uint8 [{len(files)}, H, W, 3], got {arr.dtype} {arr.shape}")
            self._npy = arr

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if self._npy is not None:
            img = np.asarray(self._npy[self.rows[i]])
        else:
            from PIL import Image

            f = self._jpg_dir / self.files[i]
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    if self.image_size is not None:
                        im = im.resize((self.image_size[1], self.image_size[0]), Image.BILINEAR)
                    img = np.asarray(im, dtype=np.uint8)
            except OSError as e:
                raise DataError(f"CelebA: cannot read {f} ({e})") from None
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
        return x, self.labels[i]


def _has_pil() -> bool:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True
