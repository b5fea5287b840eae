"""CIFAR-10 loading (torchvision batches, ImageFolder trees, or a .tar.gz of one) and on-device augmentation.

The whole dataset is held as one uint8 tensor [N, 3, 32, 32] on the training device; augmentation is batched
tensor work there (no per-image Python per step).
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import shutil
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_SIZE = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(RuntimeError):
    """A dataset problem the user can fix (missing, corrupt or malformed data); the message says how."""


@dataclass
class Cifar:
    train_x: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    source: str

    @property
    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean/std of the training images in [0, 1] (the dataset's own statistics)."""
        x = self.train_x.float().div_(255)
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: live on a terminal; twice a minute when stderr is a log file or a
    pipe, where every refresh would be another line in the log."""
    return 0.1 if sys.stderr.isatty() else 30.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTBLOCK_CACHE", Path.home() / ".cache" / "fastblock"))


# --------------------------------------------------------------------------------------------------------------
# torchvision's pickled batches
# --------------------------------------------------------------------------------------------------------------
def _find_batches_dir(root: Path) -> Path | None:
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "data_batch_1").exists() and (cand / "test_batch").exists():
            return cand
    return None


def _load_batches(folder: Path) -> Cifar:
    """torchvision's CIFAR-10 reader on ``folder``, minus its checksum test (a copy re-pickled elsewhere differs in
    bytes, not in content) and with the class names optional."""
    from torchvision.datasets import CIFAR10

    class Batches(CIFAR10):
        base_folder = folder.name

        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            meta = folder / self.meta["filename"]
            self.classes = [str(i) for i in range(10)]
            if meta.exists():
                with open(meta, "rb") as fh:
                    self.classes = list(pickle.load(fh, encoding="latin1")[self.meta["key"]])

    def read(train: bool):
        try:
            ds = Batches(str(folder.parent), train=train)
        except FileNotFoundError as exc:
            raise DataError(f"missing CIFAR-10 batch file {exc.filename}") from None
        except Exception as exc:
            raise DataError(f"corrupt CIFAR-10 batches in {folder}: {type(exc).__name__}: {exc}") from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return images, torch.tensor(ds.targets, dtype=torch.int64), ds.classes

    train_x, train_y, classes = read(True)
    test_x, test_y, _ = read(False)
    return Cifar(train_x, train_y, test_x, test_y, classes, f"torchvision batches at {folder}")


# --------------------------------------------------------------------------------------------------------------
# ImageFolder trees: DIR/{train,test}/<class>/*.{png,jpg}
# --------------------------------------------------------------------------------------------------------------
def _list_split(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not split_dir.is_dir():
        raise DataError(f"expected an image folder at {split_dir} (layout DIR/train/<class>/*.png and DIR/test/...)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{split_dir} has no class folders (layout DIR/{split_dir.name}/<class>/*.png)")
    items = []
    for idx, cls in enumerate(classes):
        files = sorted(p for p in (split_dir / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {split_dir / cls} contains no .png/.jpg images")
        items += [(p, idx) for p in files]
    return classes, items


def _decode_torchvision(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


def _decode_pil(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def _image_decoder():
    """torchvision.io's decoder (libjpeg-turbo / libpng, releases the GIL) while torchvision still ships it -- 0.29
    deprecates it in favour of TorchCodec -- else Pillow, which torchvision depends on."""
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file  # noqa: F401
    except ImportError:
        return _decode_pil
    return _decode_torchvision


def _decode(path: Path, decoder=None) -> torch.Tensor:
    try:
        img = (decoder or _image_decoder())(path)
    except Exception as exc:
        raise DataError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None
    if tuple(img.shape[1:]) != (CIFAR_SIZE, CIFAR_SIZE):
        raise DataError(f"image {path} is {img.shape[2]}x{img.shape[1]}, expected {CIFAR_SIZE}x{CIFAR_SIZE}")
    return img


def _fingerprint(items: list[tuple[Path, int]], root: Path) -> str:
    h = hashlib.sha1()
    for path, label in items:
        st = path.stat()
        h.update(f"{path.relative_to(root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _load_folder(root: Path, cache_dir: Path, progress: bool) -> Cifar:
    train_classes, train_items = _list_split(root / "train")
    test_classes, test_items = _list_split(root / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"class folders differ between {root / 'train'} and {root / 'test'}: "
                        f"only in train {only_train}, only in test {only_test}")
    key = _fingerprint(train_items + test_items, root)
    cache_file = cache_dir / f"cifar-folder-{key}.pt"
    if cache_file.exists():
        try:
            blob = torch.load(cache_file, weights_only=True)
            return Cifar(blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], blob["classes"],
                         f"image folder {root} (cached {cache_file.name})")
        except Exception:
            pass  # a damaged cache is rebuilt below

    decoder = _image_decoder()

    def decode_all(items, what):
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            images = list(tqdm(pool.map(lambda p: _decode(p, decoder), (p for p, _ in items)), total=len(items),
                               disable=not progress, desc=f"decoding {what}", unit="img",
                               mininterval=progress_interval()))
        return torch.stack(images), torch.tensor([label for _, label in items], dtype=torch.int64)

    train_x, train_y = decode_all(train_items, "train")
    test_x, test_y = decode_all(test_items, "test")
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
                       "classes": train_classes}, cache_file)
    return Cifar(train_x, train_y, test_x, test_y, train_classes, f"image folder {root} (decoded, cached)")


def _extract_archive(archive: Path, cache_dir: Path) -> Path:
    st = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir / f"extracted-{key}"
    marker = dest / ".complete"
    if not marker.exists():
        tmp = dest.with_suffix(".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            with tarfile.open(archive) as tar:
                try:
                    tar.extractall(tmp, filter="data")  # Python >= 3.11.4: refuse unsafe members
                except TypeError:
                    tar.extractall(tmp)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"cannot extract {archive}: {exc}") from None
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        marker.touch()
    # the archive may hold the tree at its top level or one folder down
    for cand in [dest] + sorted(p for p in dest.iterdir() if p.is_dir()):
        if (cand / "train").is_dir() or _find_batches_dir(cand):
            return cand
    raise DataError(f"{archive} holds neither DIR/train,test image folders nor cifar-10-batches-py")


def load_cifar10(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, download: bool = True,
                 progress: bool = True) -> Cifar:
    """Load CIFAR-10 from ``data_dir``: torchvision batches, an ImageFolder tree, or a .tar.gz of either.

    Missing data is downloaded with torchvision when ``download`` and the network allow; offline, a DataError
    says what to pass instead.
    """
    root = Path(data_dir).expanduser()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if root.name.endswith((".tar.gz", ".tgz", ".tar")) and not root.is_dir():
        if not root.is_file():
            raise DataError(f"no archive at {root}")
        root = _extract_archive(root, cache)
    batches = _find_batches_dir(root)
    if batches is not None:
        return _load_batches(batches)
    if (root / "train").exists() or (root / "test").exists():
        return _load_folder(root, cache, progress)
    expected = ("expected cifar-10-batches-py/, or train/ and test/ image folders, or a .tar.gz of either")
    if root.is_dir() and any(root.iterdir()):
        raise DataError(f"no CIFAR-10 found in {root}: {expected}")
    if not download:
        where = "is an empty folder" if root.is_dir() else "does not exist"
        raise DataError(f"no CIFAR-10 found at {root}: it {where} ({expected})")
    return _download(root)


def _download(root: Path) -> Cifar:
    """torchvision's download into a temporary folder beside ``root``, moved into place only when it worked:
    a failed download leaves nothing behind."""
    import tempfile

    parent = root.parent if root.parent.exists() else Path.cwd()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-download-", dir=parent))
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(tmp), train=True, download=True)
        root.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "cifar-10-batches-py", root / "cifar-10-batches-py")
    except Exception as exc:
        raise DataError(
            f"CIFAR-10 is not at {root} and could not be downloaded ({type(exc).__name__}: {exc}). "
            "Offline? Pass --data-dir pointing to a cifar-10-batches-py folder, an ImageFolder tree "
            "DIR/{train,test}/<class>/*.png, or a .tar.gz of one (e.g. cifar10-jpeg.tar.gz)."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_batches(_find_batches_dir(root))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def balanced_subset(data: Cifar, n: int, seed: int) -> Cifar:
    """A seeded, class-balanced subset: about n // classes training images of every class, and n // 5 test
    images likewise (the first N of an image-folder tree would all be one class)."""
    g = torch.Generator().manual_seed(seed)

    def pick(labels: torch.Tensor, count: int) -> torch.Tensor:
        classes = labels.unique()
        per_class = max(1, count // len(classes))
        chosen = []
        for c in classes.tolist():
            idx = (labels == c).nonzero().flatten()
            chosen.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        keep = torch.cat(chosen)
        return keep[torch.randperm(len(keep), generator=g)]

    train, test = pick(data.train_y, n), pick(data.test_y, max(1, n // 5))
    return Cifar(data.train_x[train], data.train_y[train], data.test_x[test], data.test_y[test], data.classes,
                 data.source + f" (class-balanced subset: {len(train)} train, {len(test)} test)")


def split_validation(data: Cifar, fraction: float, seed: int) -> Cifar:
    """Hold out ``fraction`` of train as the evaluation set (the test set is then not used for selection)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-split must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data.train_y), generator=g)
    n_val = int(round(fraction * len(perm)))
    val, train = perm[:n_val], perm[n_val:]
    return Cifar(data.train_x[train], data.train_y[train], data.train_x[val], data.train_y[val], data.classes,
                 data.source + f" (validation: {n_val} held out of train)")


# --------------------------------------------------------------------------------------------------------------
# on-device augmentation (batched; every random draw comes from the given generator)
# --------------------------------------------------------------------------------------------------------------
def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator, size: Optional[int] = None) -> torch.Tensor:
    """Pad by ``pad`` (zeros) and take a random window per image: HxW (== translate by up to +-pad), or
    ``size`` x ``size`` (a smaller crop, not rescaled: the objects keep their size in pixels)."""
    b, _, h, w = x.shape
    pad = max(0, pad)  # (no padding, as before: a pad <= 0 translates nothing)
    win_h, win_w = (h, w) if size is None else (size, size)
    if not 0 < win_h <= h + 2 * pad or not 0 < win_w <= w + 2 * pad:
        raise ValueError(f"a {win_h}x{win_w} crop does not fit {h}x{w} images padded by {pad}")
    if pad == 0 and (win_h, win_w) == (h, w):
        return x
    padded = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    oy = torch.randint(0, h + 2 * pad - win_h + 1, (b,), device=x.device, generator=gen)
    ox = torch.randint(0, w + 2 * pad - win_w + 1, (b,), device=x.device, generator=gen)
    rows = (oy[:, None] + torch.arange(win_h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(win_w, device=x.device))[:, None, None, :]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[torch.arange(b, device=x.device)[:, None, None, None], chans, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1, 1), device=x.device, generator=gen)
    cx = torch.randint(0, w, (b, 1, 1), device=x.device, generator=gen)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    return x * (~inside)[:, None].to(x.dtype)


def random_affine(x: torch.Tensor, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                  degrees: float = 0.0, resized_crop: bool = True) -> torch.Tensor:
    """RandomResizedCrop (area ``scale``, aspect ``ratio``) and/or rotation by up to ``degrees``, batched with
    one affine grid per image."""
    b = x.shape[0]
    dev = x.device
    if resized_crop:
        area = torch.empty(b, device=dev).uniform_(scale[0], scale[1], generator=gen)
        log_r = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
        aspect = torch.exp(log_r)
        sw = torch.sqrt(area * aspect).clamp(max=1.0)
        sh = torch.sqrt(area / aspect).clamp(max=1.0)
        tx = (torch.rand(b, device=dev, generator=gen) * 2 - 1) * (1 - sw)
        ty = (torch.rand(b, device=dev, generator=gen) * 2 - 1) * (1 - sh)
    else:
        sw = sh = torch.ones(b, device=dev)
        tx = ty = torch.zeros(b, device=dev)
    angle = (torch.rand(b, device=dev, generator=gen) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([sw * cos, -sh * sin, tx], 1), torch.stack([sw * sin, sh * cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
