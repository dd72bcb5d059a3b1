"""Dataset readers: MVTec-AD, VisA (split CSV), a plain normal/anomalous folder, and a multi-label CSV (SewerML).

Each reader returns a `Dataset` (a sorted list of `Sample`s plus a per-category summary) and refuses a malformed
layout with a `DatasetError` that names the offending path, so a broken download fails at once instead of halfway
through an hour-long evaluation.

Folder scanning rules (shared by all folder-based readers):
- hidden entries (names starting with '.', e.g. .DS_Store, ._foo.png from macOS archives) are skipped;
- any other non-image file or unexpected sub-folder is an error (it usually means a wrong root or a bad extract);
- image extensions: `constants.IMAGE_EXTENSIONS` (case-insensitive).
"""
from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..constants import IMAGE_EXTENSIONS

LAYOUTS = ("mvtec", "visa", "folder", "csv")


class DatasetError(ValueError):
    """A dataset layout the reader cannot trust; the message names the bad path."""


@dataclass(frozen=True)
class Sample:
    path: Path
    category: str
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normal images
    mask_path: Path | None = None


@dataclass(frozen=True)
class Summary:
    """Image counts per category: {category: (n_normal, n_anomalous, n_with_mask)}."""

    counts: dict[str, tuple[int, int, int]]

    @property
    def n_images(self) -> int:
        return sum(a + b for a, b, _ in self.counts.values())

    def describe(self) -> str:
        width = max([len("category"), *(len(c) for c in self.counts)])
        lines = [f"{'category':<{width}}  normal  anomalous  masks"]
        for cat, (n0, n1, nm) in self.counts.items():
            lines.append(f"{cat:<{width}}  {n0:>6}  {n1:>9}  {nm:>5}")
        tot = [sum(v[i] for v in self.counts.values()) for i in range(3)]
        lines.append(f"{'total':<{width}}  {tot[0]:>6}  {tot[1]:>9}  {tot[2]:>5}")
        return "\n".join(lines)


def summarize(samples: Iterable[Sample]) -> Summary:
    counts: dict[str, list[int]] = {}
    for s in samples:
        c = counts.setdefault(s.category, [0, 0, 0])
        c[s.label] += 1
        c[2] += s.mask_path is not None
    return Summary({cat: tuple(counts[cat]) for cat in sorted(counts)})


@dataclass(frozen=True)
class Dataset:
    root: Path
    layout: str
    samples: list[Sample]

    @property
    def summary(self) -> Summary:
        return summarize(self.samples)

    def describe(self) -> str:
        return f"{self.layout} dataset at {self.root}: {len(self.samples)} images\n{self.summary.describe()}"

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)


def load_mask(path: Path) -> np.ndarray:
    """Ground-truth mask as bool HxW: any non-zero pixel is anomalous (MVTec uses 255, VisA uses class ids)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


def image_shape(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    with Image.open(path) as im:
        return im.height, im.width


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Sorted images directly in `folder`; hidden entries skipped, anything else is an error."""
    if not folder.is_dir():
        raise DatasetError(f"expected a folder: {folder}")
    images = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            raise DatasetError(f"unexpected sub-folder {p} (expected only images in {folder})")
        if not is_image(p):
            raise DatasetError(f"not an image file: {p} (allowed: {', '.join(IMAGE_EXTENSIONS)})")
        images.append(p)
    return images


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    return path


def _select(found: Sequence[str], wanted: Sequence[str] | None, root: Path) -> list[str]:
    if wanted is None:
        return list(found)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DatasetError(f"categories {missing} not found under {root} (found: {', '.join(found) or 'none'})")
    return list(wanted)


# ------------------------------------------------------------------------------------------------------------------
# MVTec-AD: <root>/<category>/test/<defect|good>/*.png, masks <root>/<category>/ground_truth/<defect>/<stem>_mask.png
# ------------------------------------------------------------------------------------------------------------------

def _find_mask(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for name in (f"{stem}_mask{ext}", f"{stem}_mask{ext.upper()}"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_mvtec_category(cat_dir: Path, category: str | None = None) -> list[Sample]:
    """One MVTec-AD category folder (the one that holds `test/` and `ground_truth/`)."""
    category = category or cat_dir.name
    test = cat_dir / "test"
    if not test.is_dir():
        raise DatasetError(f"category {category!r} has no test folder: {test}")
    samples = []
    for defect_dir in _subdirs(test):
        defect = defect_dir.name
        images = list_images(defect_dir)
        if not images:
            raise DatasetError(f"empty defect folder: {defect_dir}")
        for img in images:
            if defect == "good":
                samples.append(Sample(img, category, 0, "good", None))
                continue
            mask = _find_mask(cat_dir / "ground_truth" / defect, img.stem)
            if mask is None:
                expected = cat_dir / "ground_truth" / defect / f"{img.stem}_mask.png"
                raise DatasetError(f"no ground-truth mask for anomalous image {img} (expected {expected})")
            samples.append(Sample(img, category, 1, defect, mask))
    if not samples:
        raise DatasetError(f"empty category {category!r}: no test images under {test}")
    return samples


def read_mvtec(root: str | Path, categories: Sequence[str] | None = None) -> Dataset:
    """MVTec-AD test split. `root` may also be a single category folder (one that holds `test/`)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root is not a folder: {root}")
    if (root / "test").is_dir():
        return Dataset(root, "mvtec", read_mvtec_category(root))
    found = [p.name for p in _subdirs(root)]
    if not found:
        raise DatasetError(f"no category folders under {root}")
    samples = [s for cat in _select(found, categories, root) for s in read_mvtec_category(root / cat)]
    return Dataset(root, "mvtec", samples)


# ------------------------------------------------------------------------------------------------------------------
# VisA: <root>/split_csv/1cls.csv with columns object,split,label,image,mask (paths relative to root)
# ------------------------------------------------------------------------------------------------------------------

VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def read_visa(root: str | Path, csv_name: str = "1cls.csv", split: str = "test",
              categories: Sequence[str] | None = None) -> Dataset:
    """VisA from its split CSV: label 'normal' -> 0, 'anomaly' -> 1; anomalies must have a mask file."""
    root = Path(root)
    csv_path = _require_file(root / "split_csv" / csv_name, "VisA split CSV")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path} lacks columns {missing} (has {reader.fieldnames})")
        rows = [(i, r) for i, r in enumerate(reader, start=2) if r["split"].strip() == split]
    if not rows:
        raise DatasetError(f"no rows with split={split!r} in {csv_path}")
    found = sorted({r["object"].strip() for _, r in rows})
    wanted = set(_select(found, categories, csv_path))
    samples = []
    for line, r in rows:
        cat = r["object"].strip()
        if cat not in wanted:
            continue
        label = {"normal": 0, "anomaly": 1}.get(r["label"].strip().lower())
        if label is None:
            raise DatasetError(f"{csv_path} line {line}: label must be 'normal' or 'anomaly', got {r['label']!r}")
        img = _require_file(root / r["image"].strip(), f"image ({csv_path} line {line})")
        mask = None
        if label == 1:
            if not r["mask"].strip():
                raise DatasetError(f"{csv_path} line {line}: anomalous image {img} has no mask")
            mask = _require_file(root / r["mask"].strip(), f"mask for {img} ({csv_path} line {line})")
        samples.append(Sample(img, cat, label, "anomaly" if label else "good", mask))
    return Dataset(root, "visa", sorted(samples, key=lambda s: (s.category, s.label, str(s.path))))


# ------------------------------------------------------------------------------------------------------------------
# Plain folder: <root>/normal/*, <root>/anomalous/*, optional <root>/masks/<stem>[_mask].<ext>
# ------------------------------------------------------------------------------------------------------------------

def _index_masks(mask_dir: Path) -> dict[str, Path]:
    """stem -> mask path, where a trailing `_mask` is dropped from the stem; two files for one stem is an error."""
    index: dict[str, Path] = {}
    for p in list_images(mask_dir):
        stem = p.stem[: -len("_mask")] if p.stem.endswith("_mask") else p.stem
        if stem in index:
            raise DatasetError(f"two masks for image stem {stem!r}: {index[stem]} and {p}")
        index[stem] = p
    return index


def read_folder(root: str | Path, normal_dir: str = "normal", anomalous_dir: str = "anomalous",
                mask_dir: str = "masks", category: str | None = None) -> Dataset:
    """One category from two folders. With a masks folder, every anomalous image must have a mask."""
    root = Path(root)
    category = category or root.resolve().name
    normal = list_images(root / normal_dir)
    anomalous = list_images(root / anomalous_dir)
    if not normal and not anomalous:
        raise DatasetError(f"empty dataset: no images in {root / normal_dir} or {root / anomalous_dir}")
    masks = _index_masks(root / mask_dir) if (root / mask_dir).is_dir() else None
    samples = [Sample(p, category, 0, "good", None) for p in normal]
    for p in anomalous:
        mask = None
        if masks is not None:
            mask = masks.get(p.stem)
            if mask is None:
                raise DatasetError(f"no mask for anomalous image {p} in {root / mask_dir} "
                                   f"(expected {p.stem}.png or {p.stem}_mask.png)")
        samples.append(Sample(p, category, 1, "anomalous", mask))
    return Dataset(root, "folder", samples)


# ------------------------------------------------------------------------------------------------------------------
# Multi-label CSV (SewerML style): image path column + 0/1 defect columns; anomalous if any defect is set.
# ------------------------------------------------------------------------------------------------------------------

_TRUE, _FALSE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", ""}


def read_label_csv(csv_path: str | Path, image_root: str | Path | None = None, path_column: str | None = None,
                   label_columns: Sequence[str] | None = None, category_column: str | None = "category",
                   default_category: str | None = None, check_files: bool = True) -> Dataset:
    """Multi-label CSV: defaults are first column = image path, every other column (but `category_column` if
    present) = a 0/1 defect label. SewerML's CSV has extra non-label columns: pass `label_columns` for it.
    Relative image paths resolve against `image_root` (default: the CSV's folder). Images carry no masks."""
    csv_path = _require_file(Path(csv_path), "label CSV")
    image_root = Path(image_root) if image_root is not None else csv_path.parent
    default_category = default_category or csv_path.stem
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        if len(fields) < 2:
            raise DatasetError(f"{csv_path} needs a path column and at least one label column, has {fields}")
        path_column = path_column or fields[0]
        has_cat = category_column is not None and category_column in fields
        if label_columns is None:
            label_columns = [c for c in fields if c != path_column and not (has_cat and c == category_column)]
        missing = [c for c in [path_column, *label_columns] if c not in fields]
        if missing or not label_columns:
            raise DatasetError(f"{csv_path} lacks columns {missing or 'for labels'} (has {fields})")
        samples = []
        for line, row in enumerate(reader, start=2):
            set_labels = []
            for col in label_columns:
                v = (row[col] or "").strip().lower()
                if v not in _TRUE and v not in _FALSE:
                    raise DatasetError(f"{csv_path} line {line}, column {col!r}: expected 0/1, got {row[col]!r}")
                if v in _TRUE:
                    set_labels.append(col)
            raw = (row[path_column] or "").strip()
            if not raw:
                raise DatasetError(f"{csv_path} line {line}: empty image path")
            img = image_root / raw
            if check_files:
                _require_file(img, f"image ({csv_path} line {line})")
            cat = (row[category_column] or "").strip() if has_cat else default_category
            samples.append(Sample(img, cat, int(bool(set_labels)), "+".join(set_labels) or "good", None))
    if not samples:
        raise DatasetError(f"no rows in {csv_path}")
    return Dataset(csv_path, "csv", samples)


# ------------------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------------------

def detect_layout(root: str | Path) -> str:
    """Guess the layout: a .csv file -> csv; split_csv/ -> visa; normal/ -> folder; otherwise mvtec."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return "csv"
    if (root / "split_csv").is_dir():
        return "visa"
    if (root / "normal").is_dir():
        return "folder"
    return "mvtec"


def read_dataset(root: str | Path, layout: str | None = None, **options) -> Dataset:
    """Read `root` with the named layout (auto-detected when None); options go to the layout's reader."""
    layout = layout or detect_layout(root)
    readers = {"mvtec": read_mvtec, "visa": read_visa, "folder": read_folder, "csv": read_label_csv}
    if layout not in readers:
        raise DatasetError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    return readers[layout](root, **options)


# ------------------------------------------------------------------------------------------------------------------
# Few-shot reference images (normal "shots"): train/good (MVTec), the VisA train split, or a folder of one's own
# ------------------------------------------------------------------------------------------------------------------

def reference_images(root: str | Path, layout: str, categories: Sequence[str],
                     reference_dir: str | Path | None = None) -> dict[str, list[Path]]:
    """Normal reference images per category, sorted: `<root>/<category>/train/good` (MVTec layout), the normal
    `train` rows of the VisA split CSV, or `reference_dir` (`<dir>/<category>/*` when it has a folder per category,
    else the images directly in it for every category). A category without any is an error naming where it looked."""
    root = Path(root)
    found: dict[str, list[Path]] = {}
    if reference_dir is not None:
        ref = Path(reference_dir)
        if not ref.is_dir():
            raise DatasetError(f"reference folder not found: {ref}")
        per_category = any((ref / c).is_dir() for c in categories)
        for c in categories:
            found[c] = list_images(ref / c) if per_category and (ref / c).is_dir() else (
                [] if per_category else list_images(ref))
        where = f"{ref}/<category>" if per_category else str(ref)
    elif layout == "mvtec":
        single = (root / "test").is_dir()
        for c in categories:
            folder = (root if single else root / c) / "train" / "good"
            found[c] = list_images(folder) if folder.is_dir() else []
        where = f"{root}/<category>/train/good"
    elif layout == "visa":
        train = read_visa(root, split="train", categories=list(categories))
        for c in categories:
            found[c] = sorted(s.path for s in train.samples if s.category == c and s.label == 0)
        where = f"the train split of {root}/split_csv"
    else:
        raise DatasetError(f"layout {layout!r} has no train images: give --reference-dir")
    missing = [c for c in categories if not found.get(c)]
    if missing:
        raise DatasetError(f"no normal reference images for {', '.join(missing)} (looked in {where})")
    return found
