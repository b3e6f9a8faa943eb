"""envs/vision*.py: IDX reader, the Multi-X generator, and the .npy / CelebA loaders on fixtures."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_roots import SUBSET, data_root, is_subset, real_root
from mtrl_arch.envs.vision_celeba import CelebA
from mtrl_arch.envs.vision_scenes import CityScapes, NYUv2
from mtrl_arch.envs.vision import (
    CANVAS,
    ITEM,
    DataError,
    MultiDigitDataset,
    generate_multi,
    load_mnist,
    load_multi,
    read_idx,
    train_val_split,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def root() -> Path:
    """The real MNIST / Fashion-MNIST files, else their subset in tests/fixtures/data."""
    return data_root("mnist", "fashion_mnist")


@pytest.fixture(scope="module")
def full(root) -> bool:
    """Whether ``root`` holds the full data sets (their known counts are checked then)."""
    return not is_subset(root)


@pytest.fixture(scope="module")
def mm_test(root, full):
    return load_multi(root, "multi_mnist", "test", seed=0, check_count=full)


def _place(item: np.ndarray, y: int, x: int) -> np.ndarray:
    c = np.zeros((CANVAS, CANVAS), np.uint8)
    c[y:y + ITEM, x:x + ITEM] = item
    return c


# ---- IDX ----------------------------------------------------------------------------------
def test_mnist_idx_reader():
    root = real_root("mnist", "fashion_mnist")
    images, labels = load_mnist(root, "test", "mnist")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    raw = read_idx(root / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz", 0x00000801)
    assert np.bincount(raw).tolist() == [1000] * 10


@pytest.mark.parametrize("kind", ["mnist", "fashion_mnist"])
def test_subset_is_the_real_first_items_and_needs_counts_off(kind):
    """tests/fixtures/data holds the first 192 / 64 items of the real IDX files; read with the
    full sets' counts checked, it is refused with one line naming the option."""
    real = real_root("mnist", "fashion_mnist")
    for split, n in (("train", 192), ("test", 64)):
        sub_images, sub_labels = load_mnist(SUBSET, split, kind, check_count=False)
        images, labels = load_mnist(real, split, kind)
        assert len(sub_images) == n
        np.testing.assert_array_equal(sub_images, images[:n])
        np.testing.assert_array_equal(sub_labels, labels[:n])
    with pytest.raises(DataError, match="192 images, expected 60000 .for a subset set data.options.check_counts=false"):
        load_mnist(SUBSET, "train", kind)


def _copy_test_split(root: Path, dst: Path) -> Path:
    (dst / "mnist").mkdir(parents=True)
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(root / "mnist" / f, dst / "mnist" / f)
    return dst / "mnist" / "t10k-images-idx3-ubyte.gz"


def _assert_one_line_naming_files(err: pytest.ExceptionInfo, root: Path):
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"MNIST not found or damaged under {root}: expected ")
    for f in ("mnist/train-images-idx3-ubyte.gz", "mnist/train-labels-idx1-ubyte.gz",
              "mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz"):
        assert f in msg


def test_idx_truncated_gzip_raises_one_line(root, full, tmp_path):
    img = _copy_test_split(root, tmp_path)
    assert load_mnist(tmp_path, "test", check_count=full)[0].shape[1:] == (28, 28)  # intact: reads
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, "test", check_count=full)
    _assert_one_line_naming_files(err, tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(err.value)


def test_idx_bad_magic_and_short_payload(root, full, tmp_path):
    img = _copy_test_split(root, tmp_path)
    raw = gzip.decompress(img.read_bytes())
    img.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:], compresslevel=1))  # 1-D magic on an image file
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, "test", check_count=full)
    _assert_one_line_naming_files(err, tmp_path)
    assert "magic" in str(err.value)
    img.write_bytes(gzip.compress(raw[:-100], compresslevel=1))  # payload shorter than the header says
    with pytest.raises(DataError, match="payload"):
        load_mnist(tmp_path, "test", check_count=full)
    with pytest.raises(DataError) as err:  # no files at all
        load_mnist(tmp_path / "nowhere", "train")
    _assert_one_line_naming_files(err, tmp_path / "nowhere")


# ---- Multi-X ------------------------------------------------------------------------------
def test_multi_mnist_counts_pairing_and_labels(root, full):
    d = load_multi(root, "multi_mnist", "train", seed=0, check_count=full)
    _, src_labels = load_mnist(root, "train", check_count=full)
    n = len(src_labels)
    assert n == (60_000 if full else 192)
    assert d.canvas.shape == (2 * n, 36, 36) and d.canvas.dtype == np.uint8
    assert d.labels.shape == (2 * n, 2) and d.labels.dtype == np.int64
    np.testing.assert_array_equal(d.src[0::2, 0], np.arange(n))  # item i top-left in composite 2i
    np.testing.assert_array_equal(d.src[1::2, 1], np.arange(n))  # and bottom-right in 2i+1
    np.testing.assert_array_equal(d.labels[:, 0], src_labels[d.src[:, 0]])
    np.testing.assert_array_equal(d.labels[:, 1], src_labels[d.src[:, 1]])
    assert np.all(d.labels[:, 0] != d.labels[:, 1])
    tl, br = d.offsets[:, :2], d.offsets[:, 2:]
    assert tl.min() == 0 and tl.max() == 4 and br.min() == 4 and br.max() == 8


@pytest.mark.parametrize("variant", ["multi_mnist", "multi_fashion", "multi_fashion_mnist"])
def test_multi_canvases_are_the_documented_max_merge(root, full, variant):
    d = load_multi(root, variant, "test", seed=3, check_count=full)
    kinds = {"multi_mnist": ("mnist", "mnist"), "multi_fashion": ("fashion_mnist", "fashion_mnist"),
             "multi_fashion_mnist": ("mnist", "fashion_mnist")}[variant]
    tl_img, tl_lab = load_mnist(root, "test", kinds[0], check_count=full)
    br_img, br_lab = load_mnist(root, "test", kinds[1], check_count=full)
    assert len(d) == 2 * len(tl_img) == (20_000 if full else 128)
    for k in (0, 1, 2, 3, 77, len(d) - 1):
        (a, b), (y0, x0, y1, x1) = d.src[k], d.offsets[k]
        expected = np.maximum(_place(tl_img[a], y0, x0), _place(br_img[b], y1, x1))
        np.testing.assert_array_equal(d.canvas[k], expected)
        # outside the bottom-right box the top-left box holds the source item unchanged
        tl_box = d.canvas[k, y0:y0 + ITEM, x0:x0 + ITEM].copy()
        outside = np.ones((ITEM, ITEM), bool)
        outside[y1 - y0:, x1 - x0:] = False
        np.testing.assert_array_equal(tl_box[outside], tl_img[a][outside])
        assert tuple(d.labels[k]) == (tl_lab[a], br_lab[b])
    if kinds[0] == kinds[1]:
        assert np.all(d.labels[:, 0] != d.labels[:, 1])
    images, labels = d.subset(np.arange(10)).tensors()
    assert images.shape == (10, 1, 36, 36) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert labels.dtype == torch.int64 and labels.shape == (10, 2)


def test_multi_is_deterministic_and_seeded(root, full, mm_test):
    again = load_multi(root, "multi_mnist", "test", seed=0, check_count=full)
    np.testing.assert_array_equal(again.canvas, mm_test.canvas)
    np.testing.assert_array_equal(again.labels, mm_test.labels)
    other = load_multi(root, "multi_mnist", "test", seed=1, check_count=full)
    assert not np.array_equal(other.canvas, mm_test.canvas)
    assert not np.array_equal(other.src, mm_test.src)


def test_generate_multi_on_synthetic_items():
    rng = np.random.default_rng(0)
    items = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    d1 = generate_multi(items, labels, items, labels, seed=5)
    d2 = generate_multi(items, labels, items, labels, seed=5)
    assert len(d1) == 12 and np.array_equal(d1.canvas, d2.canvas)
    assert np.all(d1.labels[:, 0] != d1.labels[:, 1])


def test_cache_round_trip(root, full, mm_test, tmp_path):
    a = load_multi(root, "multi_mnist", "test", seed=0, cache_dir=tmp_path, check_count=full)
    files = list(tmp_path.glob("multi_mnist_test_seed0_*.npz"))
    assert len(files) == 1
    b = load_multi(root, "multi_mnist", "test", seed=0, cache_dir=tmp_path, check_count=full)
    for x in (a, b):
        np.testing.assert_array_equal(x.canvas, mm_test.canvas)
        np.testing.assert_array_equal(x.offsets, mm_test.offsets)


def test_dataset_and_split(mm_test):
    tr, va = train_val_split(len(mm_test), 0.1, seed=0, group=2)
    assert len(va) == round(0.1 * len(mm_test) / 2) * 2 and len(tr) == len(mm_test) - len(va)
    assert len(np.intersect1d(tr, va)) == 0 and len(np.union1d(tr, va)) == len(mm_test)
    assert np.all(va[0::2] % 2 == 0) and np.all(va[1::2] == va[0::2] + 1)  # pairs kept together
    tr2, va2 = train_val_split(len(mm_test), 0.1, seed=0, group=2)
    assert np.array_equal(va, va2) and not np.array_equal(va, train_val_split(len(mm_test), 0.1, seed=1)[1])
    ds = MultiDigitDataset(mm_test, va)
    img, lab = ds[0]
    assert img.shape == (1, 36, 36) and img.dtype == torch.float32 and lab.tolist() == mm_test.labels[va[0]].tolist()
    torch.testing.assert_close(img[0], torch.from_numpy(mm_test.canvas[va[0]]).float() / 255)


# ---- NYUv2 / CityScapes / CelebA fixtures ---------------------------------------------------
def test_nyuv2_fixture():
    ds = NYUv2(FIXTURES / "nyuv2", "train")
    assert len(ds) == 2 and len(NYUv2(FIXTURES / "nyuv2", "val")) == 1
    img, t = ds[1]
    raw = {f: np.load(FIXTURES / "nyuv2" / "train" / f / "1.npy") for f in ("image", "label", "depth", "normal")}
    assert img.shape == (3, 6, 8) and img.dtype == torch.float32
    torch.testing.assert_close(img, torch.from_numpy(raw["image"]).permute(2, 0, 1))
    assert t["segmentation"].dtype == torch.int64 and t["segmentation"].shape == (6, 8)
    np.testing.assert_array_equal(t["segmentation"].numpy(), raw["label"].astype(np.int64))
    assert t["segmentation"].min() >= -1 and t["segmentation"].max() <= 12
    assert t["depth"].shape == (1, 6, 8) and t["normal"].shape == (3, 6, 8)
    torch.testing.assert_close(t["normal"], torch.from_numpy(raw["normal"]).permute(2, 0, 1))


def test_dense_loaders_report_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"expected .*train/\{image,label,depth,normal\}/<i>\.npy"):
        NYUv2(tmp_path, "train")
    shutil.copytree(FIXTURES / "nyuv2", tmp_path / "nyu")
    (tmp_path / "nyu" / "train" / "normal" / "1.npy").unlink()
    with pytest.raises(DataError, match=r"missing normal/1\.npy"):
        NYUv2(tmp_path / "nyu", "train")


def test_cityscapes_fixture_and_label_folders(tmp_path):
    ds7 = CityScapes(FIXTURES / "cityscapes", "train")
    img, t = ds7[0]
    assert img.shape == (3, 4, 8) and set(t) == {"segmentation", "depth"}
    assert t["segmentation"].max() <= 6 and t["depth"].shape == (1, 4, 8)
    ds19 = CityScapes(FIXTURES / "cityscapes", "test", n_classes=19)  # 'test' reads val/
    assert len(ds19) == 1
    raw = np.load(FIXTURES / "cityscapes" / "val" / "label_19" / "0.npy")
    np.testing.assert_array_equal(ds19[0][1]["segmentation"].numpy(), raw.astype(np.int64))
    # LibMTL's download names the 7-class folder label/
    shutil.copytree(FIXTURES / "cityscapes", tmp_path / "cs")
    for split in ("train", "val"):
        (tmp_path / "cs" / split / "label_7").rename(tmp_path / "cs" / split / "label")
    torch.testing.assert_close(CityScapes(tmp_path / "cs", "train")[0][1]["segmentation"], t["segmentation"])


def _attr_rows():
    lines = (FIXTURES / "celeba" / "list_attr_celeba.txt").read_text().splitlines()
    names = lines[1].split()
    return names, {ln.split()[0]: [int(v) for v in ln.split()[1:]] for ln in lines[2:]}


def test_celeba_fixture_npy_images():
    names, rows = _attr_rows()
    ds = CelebA(FIXTURES / "celeba", "train", image_source="npy")
    assert len(ds) == 2 and ds.tasks[0] == "5_o_Clock_Shadow" and len(ds.tasks) == 9
    img, lab = ds[1]
    assert img.shape == (3, 12, 10) and lab.shape == (9,)
    want = [int(rows["000002.jpg"][names.index(t)] > 0) for t in ds.tasks]
    assert lab.tolist() == want
    assert len(CelebA(FIXTURES / "celeba", "valid", image_source="npy")) == 1
    assert len(CelebA(FIXTURES / "celeba", "test", tasks=("Male", "Young"), image_source="npy")) == 1
    with pytest.raises(ValueError, match="unknown CelebA attributes"):
        CelebA(FIXTURES / "celeba", tasks=("Purple_Hair",), image_source="npy")


def test_celeba_fixture_jpg_matches_npy():
    pytest.importorskip("PIL", reason="Pillow is needed to decode the CelebA JPEGs")
    a = CelebA(FIXTURES / "celeba", "train", image_source="jpg")
    b = CelebA(FIXTURES / "celeba", "train", image_source="npy")
    torch.testing.assert_close(a[0][0], b[0][0])
    assert a[0][1].tolist() == b[0][1].tolist()
    assert CelebA(FIXTURES / "celeba", "train", image_source="jpg", image_size=(6, 5))[0][0].shape == (3, 6, 5)


def test_celeba_missing_files(tmp_path):
    with pytest.raises(DataError, match="expected list_attr_celeba.txt"):
        CelebA(tmp_path)
