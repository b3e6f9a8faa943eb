"""Vision data for the supervised multi-task benchmarks.

* IDX reader for the MNIST / Fashion-MNIST gzip files (:func:`read_idx`, :func:`load_mnist`).
* Multi-MNIST, Multi-Fashion and Multi-Fashion+MNIST (Lin et al., NeurIPS 2019, Pareto MTL;
  used again by Recon): :func:`generate_multi`, :func:`load_multi`, :class:`MultiDigitDataset`,
  :func:`train_val_split`.

NYUv2 / CityScapes are read by :mod:`.vision_scenes`, CelebA by :mod:`.vision_celeba`.

Every loader takes the data directory ``root`` as an argument; nothing here knows where the
data lives. A missing or damaged file raises :class:`DataError` with one line naming the
files that were expected.

On-disk layout for the MNIST family (as in the shared data README)::

    ROOT/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    ROOT/fashion_mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
"""
from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "read_idx",
    "load_mnist",
    "MNIST_FILES",
    "CANVAS",
    "ITEM",
    "MAX_SHIFT",
    "VARIANTS",
    "MultiDigit",
    "generate_multi",
    "load_multi",
    "MultiDigitDataset",
    "train_val_split",
]


class DataError(ValueError):
    """A data file is missing, truncated or not in the expected format."""


# ---- IDX ---------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _decode_idx(raw: bytes, name: str) -> np.ndarray:
    if len(raw) < 4:
        raise DataError(f"{name}: {len(raw)} bytes, too short for an IDX header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{name}: bad IDX magic number 0x{raw[:4].hex()}")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim == 0 or len(raw) < head:
        raise DataError(f"{name}: IDX header truncated (ndim={ndim})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - head != need:
        raise DataError(f"{name}: IDX payload is {len(raw) - head} bytes but dims {dims} need {need}")
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims)


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed when the name ends in ``.gz``), big-endian.

    Validates the magic number (``expected_magic`` when given, e.g. ``0x00000803`` for
    3-D uint8 images and ``0x00000801`` for 1-D uint8 labels) and that the payload size
    matches the header's dimensions. Raises :class:`DataError` on any problem.
    """
    return _read_idx_bytes(path, expected_magic)[0]


def _read_idx_bytes(path: str | os.PathLike, expected_magic: int | None = None) -> tuple[np.ndarray, bytes]:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from e
    raw = data
    if p.name.endswith(".gz"):
        try:
            raw = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{p.name}: damaged gzip stream ({e})") from e
    if expected_magic is not None and len(raw) >= 4 and int.from_bytes(raw[:4], "big") != expected_magic:
        raise DataError(f"{p.name}: magic 0x{raw[:4].hex()} but expected 0x{expected_magic:08x}")
    return _decode_idx(raw, p.name), data


MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_MNIST_COUNTS = {"train": 60000, "test": 10000}
_SOURCES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def _expected_files_line(root: Path, kind: str) -> str:
    files = ", ".join(f"{kind}/{f}" for split in ("train", "test") for f in MNIST_FILES[split])
    return f"{_SOURCES[kind]} not found or damaged under {root}: expected {files} (see the data README)"


def _load_source(root: str | os.PathLike, kind: str, split: str, check_count: bool = True):
    """(images uint8 [N,28,28], labels int64 [N], sha256 of the two files)."""
    if kind not in _SOURCES:
        raise ValueError(f"unknown source {kind!r}; choose from {sorted(_SOURCES)}")
    if split not in MNIST_FILES:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    root = Path(root)
    img_name, lab_name = MNIST_FILES[split]
    try:
        images, img_bytes = _read_idx_bytes(root / kind / img_name, 0x00000803)
        labels, lab_bytes = _read_idx_bytes(root / kind / lab_name, 0x00000801)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{img_name}: images are {images.shape[1:]}, expected 28x28")
        if len(images) != len(labels):
            raise DataError(f"{img_name} holds {len(images)} images but {lab_name} {len(labels)} labels")
        if check_count and len(images) != _MNIST_COUNTS[split]:
            raise DataError(f"{img_name}: {len(images)} images, expected {_MNIST_COUNTS[split]} "
                            f"(for a subset set data.options.check_counts=false)")
        if labels.size and labels.max() > 9:
            raise DataError(f"{lab_name}: labels outside 0..9")
    except DataError as e:
        raise DataError(f"{_expected_files_line(root, kind)}; {e}") from None
    digest = hashlib.sha256(img_bytes + b"\0" + lab_bytes).hexdigest()
    return images, labels.astype(np.int64), digest


def load_mnist(root: str | os.PathLike, split: str = "train", kind: str = "mnist",
               check_count: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MNIST (``kind="mnist"``) or Fashion-MNIST (``kind="fashion_mnist"``) from ``ROOT/<kind>/``.

    Returns ``(images uint8 [N, 28, 28], labels int64 [N])`` with N = 60,000 (train) or
    10,000 (test); ``check_count=False`` accepts files holding a subset (same format, any N,
    e.g. tests/fixtures/data). Raises :class:`DataError` with one line naming the expected files.
    """
    images, labels, _ = _load_source(root, kind, split, check_count)
    return images, labels


# ---- Multi-MNIST / Multi-Fashion / Multi-Fashion+MNIST ---------------------------------------
CANVAS = 36
"""Side of the composite image."""
ITEM = 28
"""Side of one source item."""
MAX_SHIFT = 4
"""Largest shift of each item, in pixels, along each axis."""
GENERATOR_VERSION = 1

VARIANTS: dict[str, tuple[str, str]] = {
    "multi_mnist": ("mnist", "mnist"),
    "multi_fashion": ("fashion_mnist", "fashion_mnist"),
    "multi_fashion_mnist": ("mnist", "fashion_mnist"),
}
"""Variant -> (source of the top-left item, source of the bottom-right item)."""
_VARIANT_CODE = {"multi_mnist": 1, "multi_fashion": 2, "multi_fashion_mnist": 3}
_SPLIT_CODE = {"train": 0, "test": 1}


@dataclass
class MultiDigit:
    """Composite images of two items each, with the provenance of every composite.

    ``canvas``: uint8 ``[N, 36, 36]`` (0..255). ``labels``: int64 ``[N, 2]``, column 0 the
    top-left item's label (task 1), column 1 the bottom-right item's (task 2). ``src``: int64
    ``[N, 2]``, the index of each item in its source split. ``offsets``: int64 ``[N, 4]`` =
    ``(y_tl, x_tl, y_br, x_br)``, the canvas row/column of the top-left corner of each item's
    28x28 box.
    """

    canvas: np.ndarray
    labels: np.ndarray
    src: np.ndarray
    offsets: np.ndarray
    variant: str = ""
    split: str = ""
    seed: int = 0

    def __len__(self) -> int:
        return len(self.canvas)

    def images(self) -> Tensor:
        """float32 ``[N, 1, 36, 36]`` in [0, 1]."""
        return torch.from_numpy(self.canvas).unsqueeze(1).float().div_(255.0)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """``(images float32 [N, 1, 36, 36] in [0, 1], labels int64 [N, 2])``."""
        return self.images(), torch.from_numpy(self.labels)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "MultiDigit":
        idx = np.asarray(idx)
        return MultiDigit(self.canvas[idx], self.labels[idx], self.src[idx], self.offsets[idx],
                          self.variant, self.split, self.seed)


def _other_label_partners(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For every i, an index drawn uniformly from the images whose label differs from labels[i]."""
    n = len(labels)
    k = int(labels.max()) + 1
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=k)
    starts = np.cumsum(counts) - counts
    n_cand = n - counts[labels]
    if np.any(n_cand == 0):
        raise ValueError("every image has the same label; no partner with a different label exists")
    u = np.minimum((rng.random(n) * n_cand).astype(np.int64), n_cand - 1)
    pos = np.where(u < starts[labels], u, u + counts[labels])
    return order[pos]


def _compose(tl_images: np.ndarray, br_images: np.ndarray, src: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    n = len(src)
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=np.uint8)
    # one vectorised copy per distinct offset (25 of them), not one per composite
    for item, images, cols in ((0, tl_images, (0, 1)), (1, br_images, (2, 3))):
        ys, xs = offsets[:, cols[0]], offsets[:, cols[1]]
        code = ys * CANVAS + xs
        for c in np.unique(code):
            sel = np.flatnonzero(code == c)
            y, x = divmod(int(c), CANVAS)
            patch = images[src[sel, item]]
            if item == 0:
                canvas[sel, y:y + ITEM, x:x + ITEM] = patch
            else:
                region = canvas[sel, y:y + ITEM, x:x + ITEM]
                canvas[sel, y:y + ITEM, x:x + ITEM] = np.maximum(region, patch)
    return canvas


def generate_multi(
    tl_images: np.ndarray,
    tl_labels: np.ndarray,
    br_images: np.ndarray,
    br_labels: np.ndarray,
    seed: int = 0,
    same_source: bool = True,
    seed_key: Sequence[int] = (),
) -> MultiDigit:
    """Two-item composites on a 36x36 canvas, two per source image (fully vectorised).

    **Pairing.** For each source index ``i`` two composites are made: composite ``2i`` has
    item ``i`` of the top-left source at the top-left and a random partner at the bottom-right;
    composite ``2i + 1`` has a random partner at the top-left and item ``i`` of the
    bottom-right source at the bottom-right. So N source images give 2N composites (60,000
    -> 120,000 train, 10,000 -> 20,000 test) and every source image appears once in each
    position plus as random partners. With ``same_source`` (Multi-MNIST, Multi-Fashion: both
    sources are the same arrays) the partner is drawn uniformly from the images whose label
    differs from item ``i``'s, so the two labels of a composite always differ. For
    Multi-Fashion+MNIST the two items come from different label spaces and the partner is
    drawn uniformly from the whole other source, with no label constraint.

    **Placement** (canvas rows/columns 0..35, each item a 28x28 box). Shifts ``dy, dx`` are
    drawn independently and uniformly from {0, ..., 4} for each item:

    * top-left item: box corner at ``(dy_tl, dx_tl)``, i.e. nominally flush with the top-left
      corner and shifted 0..4 pixels right and down, towards the centre;
    * bottom-right item: box corner at ``(8 - dy_br, 8 - dx_br)``, i.e. nominally flush with
      the bottom-right corner (8 = 36 - 28) and shifted 0..4 pixels up and left, towards the
      centre.

    The boxes always overlap in the middle (rows/columns 8..27 at least); overlapping
    pixels are merged with the maximum. Pixels stay uint8 in ``canvas``;
    :meth:`MultiDigit.images` scales them to float32 in [0, 1].

    **Determinism.** All draws come from ``np.random.default_rng(SeedSequence([seed,
    *seed_key]))`` in a fixed order (partners of copy 0, partners of copy 1, then the four
    shift columns), so the same inputs and seed give identical arrays.
    """
    tl_labels = np.asarray(tl_labels, dtype=np.int64)
    br_labels = np.asarray(br_labels, dtype=np.int64)
    n = len(tl_images)
    if len(br_images) != n or len(tl_labels) != n or len(br_labels) != n:
        raise ValueError("both sources need the same number of images and labels")
    if tl_images.shape[1:] != (ITEM, ITEM) or br_images.shape[1:] != (ITEM, ITEM):
        raise ValueError(f"source items must be {ITEM}x{ITEM}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), *[int(k) for k in seed_key]]))
    i = np.arange(n)
    if same_source:
        partner0 = _other_label_partners(tl_labels, rng)  # bottom-right partner of copy 0
        partner1 = _other_label_partners(br_labels, rng)  # top-left partner of copy 1
    else:
        partner0 = rng.integers(0, n, size=n)
        partner1 = rng.integers(0, n, size=n)
    src = np.empty((2 * n, 2), dtype=np.int64)
    src[0::2, 0], src[0::2, 1] = i, partner0
    src[1::2, 0], src[1::2, 1] = partner1, i
    shifts = rng.integers(0, MAX_SHIFT + 1, size=(2 * n, 4))
    offsets = np.empty((2 * n, 4), dtype=np.int64)
    offsets[:, 0:2] = shifts[:, 0:2]
    offsets[:, 2:4] = (CANVAS - ITEM) - shifts[:, 2:4]
    canvas = _compose(tl_images, br_images, src, offsets)
    labels = np.stack([tl_labels[src[:, 0]], br_labels[src[:, 1]]], axis=1)
    return MultiDigit(canvas, labels, src, offsets, seed=int(seed))


def load_multi(
    root: str | os.PathLike,
    variant: str = "multi_mnist",
    split: str = "train",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    check_count: bool = True,
) -> MultiDigit:
    """Multi-MNIST (``"multi_mnist"``), Multi-Fashion (``"multi_fashion"``) or
    Multi-Fashion+MNIST (``"multi_fashion_mnist"``: MNIST digit at the top-left, task 1;
    Fashion-MNIST item at the bottom-right, task 2) built from the IDX files under ``root``.

    120,000 training / 20,000 test composites; see :func:`generate_multi` for the exact
    pairing and placement. With ``cache_dir`` the arrays are stored as an ``.npz`` keyed by
    variant, split, seed, generator version and the SHA-256 of the source files, and read
    back on later calls. ``check_count=False`` accepts source files holding a subset.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    tl_kind, br_kind = VARIANTS[variant]
    tl_images, tl_labels, tl_digest = _load_source(root, tl_kind, split, check_count)
    if br_kind == tl_kind:
        br_images, br_labels, br_digest = tl_images, tl_labels, tl_digest
    else:
        br_images, br_labels, br_digest = _load_source(root, br_kind, split, check_count)
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{tl_digest}:{br_digest}".encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"{variant}_{split}_seed{int(seed)}_v{GENERATOR_VERSION}_{key}.npz"
        if cache_file.exists():
            try:
                with np.load(cache_file, allow_pickle=False) as z:  # data, never code
                    return MultiDigit(z["canvas"], z["labels"], z["src"], z["offsets"], variant, split, int(seed))
            except (OSError, KeyError, ValueError, zlib.error):
                pass  # a damaged cache file is regenerated below
    out = generate_multi(tl_images, tl_labels, br_images, br_labels, seed, same_source=tl_kind == br_kind,
                         seed_key=(_VARIANT_CODE[variant], _SPLIT_CODE[split]))
    out.variant, out.split = variant, split
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, canvas=out.canvas, labels=out.labels, src=out.src, offsets=out.offsets)
        os.replace(tmp, cache_file)
    return out


class MultiDigitDataset(Dataset):
    """``(image float32 [1, 36, 36] in [0, 1], labels int64 [2])`` items of a :class:`MultiDigit`.

    ``tensors()`` gives the whole set at once: ``images [N, 1, 36, 36]``, ``labels [N, 2]``.
    """

    def __init__(self, data: MultiDigit, indices: Sequence[int] | np.ndarray | None = None):
        self.data = data if indices is None else data.subset(indices)
        self._labels = torch.from_numpy(self.data.labels)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = torch.from_numpy(self.data.canvas[i]).unsqueeze(0).float().div_(255.0)
        return img, self._labels[i]

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.data.tensors()


def train_val_split(n: int, val_fraction: float = 0.1, seed: int = 0, group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of ``range(n)`` into sorted (train, validation) index arrays.

    ``group`` keeps runs of ``group`` consecutive indices together: ``group=2`` on a
    :class:`MultiDigit` puts both composites of one source image on the same side (they
    still share random partners across the split; the published benchmarks have no
    validation set, so this is the common approximation).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must lie in [0, 1)")
    if group < 1 or n % group:
        raise ValueError(f"n={n} is not a multiple of group={group}")
    n_groups = n // group
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 7919])).permutation(n_groups)
    n_val = int(round(val_fraction * n_groups))
    val_g, train_g = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    expand = lambda g: (g[:, None] * group + np.arange(group)).ravel()  # noqa: E731
    return expand(train_g), expand(val_g)
