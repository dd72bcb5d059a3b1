from __future__ import annotations

import numpy as np
import pytest

from service.evaluation.readers import (
    DatasetError,
    detect_layout,
    load_mask,
    read_dataset,
    read_folder,
    read_label_csv,
    read_mvtec,
    read_visa,
)

from .reference import write_png

MASK = np.zeros((6, 8), bool)
MASK[1:3, 2:5] = True


def make_mvtec(root, categories=("bottle", "cable")):
    for cat in categories:
        write_png(root / cat / "train" / "good" / "000.png")
        for i in range(2):
            write_png(root / cat / "test" / "good" / f"{i:03d}.png")
        for defect in ("crack", "hole"):
            write_png(root / cat / "test" / defect / "000.png")
            write_png(root / cat / "ground_truth" / defect / "000_mask.png", MASK)
    (root / "license.txt").write_text("CC BY-NC-SA")  # files at the root are not categories
    (root / categories[0] / "test" / "good" / ".DS_Store").write_bytes(b"\0")  # hidden: skipped
    return root


def test_mvtec_reads_samples_masks_and_summary(tmp_path):
    ds = read_mvtec(make_mvtec(tmp_path))
    assert len(ds) == 8
    s = ds.samples[0]
    assert (s.category, s.defect, s.label, s.mask_path) == ("bottle", "crack", 1,
                                                           tmp_path / "bottle/ground_truth/crack/000_mask.png")
    goods = [s for s in ds if s.defect == "good"]
    assert all(s.label == 0 and s.mask_path is None for s in goods) and len(goods) == 4
    assert ds.summary.counts == {"bottle": (2, 2, 2), "cable": (2, 2, 2)}
    text = ds.describe()
    assert "bottle" in text and "cable" in text and "total" in text


def test_mvtec_single_category_root_and_category_filter(tmp_path):
    make_mvtec(tmp_path)
    assert {s.category for s in read_mvtec(tmp_path / "cable")} == {"cable"}
    assert {s.category for s in read_mvtec(tmp_path, categories=["bottle"])} == {"bottle"}
    with pytest.raises(DatasetError, match="screw"):
        read_mvtec(tmp_path, categories=["screw"])


def test_mvtec_missing_mask_names_the_image(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "cable/ground_truth/hole/000_mask.png").unlink()
    with pytest.raises(DatasetError) as e:
        read_mvtec(tmp_path)
    assert str(tmp_path / "cable/test/hole/000.png") in str(e.value)


def test_mvtec_empty_category_names_the_folder(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty category") as e:
        read_mvtec(tmp_path)
    assert str(tmp_path / "empty" / "test") in str(e.value)


def test_mvtec_category_without_test_folder(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "wrong").mkdir()
    with pytest.raises(DatasetError, match="no test folder"):
        read_mvtec(tmp_path)


def test_mvtec_non_image_file_names_the_file(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "bottle/test/crack/notes.txt").write_text("x")
    with pytest.raises(DatasetError) as e:
        read_mvtec(tmp_path)
    assert str(tmp_path / "bottle/test/crack/notes.txt") in str(e.value)


def write_visa(root, rows):
    for _, _, _, image, mask in rows:
        write_png(root / image)
        if mask:
            write_png(root / mask, MASK)
    lines = ["object,split,label,image,mask"] + [",".join(r) for r in rows]
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")


VISA_ROWS = [
    ("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
    ("candle", "test", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
    ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"),
    ("pcb1", "test", "normal", "pcb1/Data/Images/Normal/0001.JPG", ""),
    ("pcb1", "test", "anomaly", "pcb1/Data/Images/Anomaly/000.JPG", "pcb1/Data/Masks/Anomaly/000.png"),
]


def test_visa_reads_test_split(tmp_path):
    write_visa(tmp_path, VISA_ROWS)
    ds = read_visa(tmp_path)
    assert len(ds) == 4 and ds.summary.counts == {"candle": (1, 1, 1), "pcb1": (1, 1, 1)}
    a = [s for s in ds if s.label == 1][0]
    assert a.mask_path == tmp_path / "candle/Data/Masks/Anomaly/000.png" and a.defect == "anomaly"
    assert detect_layout(tmp_path) == "visa" and len(read_dataset(tmp_path)) == 4


def test_visa_missing_mask_file_names_it(tmp_path):
    write_visa(tmp_path, VISA_ROWS)
    (tmp_path / "pcb1/Data/Masks/Anomaly/000.png").unlink()
    with pytest.raises(DatasetError) as e:
        read_visa(tmp_path)
    assert str(tmp_path / "pcb1/Data/Masks/Anomaly/000.png") in str(e.value)


def test_visa_bad_label_and_missing_csv(tmp_path):
    write_visa(tmp_path, [*VISA_ROWS, ("pcb1", "test", "broken", "pcb1/x.png", "")])
    with pytest.raises(DatasetError, match="1cls.csv line 7"):
        read_visa(tmp_path)
    with pytest.raises(DatasetError, match="split_csv"):
        read_visa(tmp_path / "nowhere")


def make_folder(root, normal="normal", anomalous="anomalous", masks=True):
    for i in range(3):
        write_png(root / normal / f"n{i}.png")
    write_png(root / anomalous / "a0.png")
    write_png(root / anomalous / "a1.jpg")
    if masks:
        write_png(root / "masks" / "a0_mask.png", MASK)  # with the _mask suffix
        write_png(root / "masks" / "a1.png", MASK)  # same stem, other extension
    return root


def test_folder_with_masks(tmp_path):
    ds = read_folder(make_folder(tmp_path / "parts"))
    assert ds.summary.counts == {"parts": (3, 2, 2)}
    assert {s.path.name: s.mask_path.name for s in ds if s.label} == {"a0.png": "a0_mask.png", "a1.jpg": "a1.png"}
    assert detect_layout(tmp_path / "parts") == "folder"


def test_folder_custom_names_without_masks(tmp_path):
    make_folder(tmp_path, normal="ok", anomalous="ng", masks=False)
    ds = read_folder(tmp_path, normal_dir="ok", anomalous_dir="ng", category="widget")
    assert ds.summary.counts == {"widget": (3, 2, 0)}
    with pytest.raises(DatasetError, match="expected a folder"):
        read_folder(tmp_path)  # default names do not exist


def test_folder_missing_mask_names_the_image(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "masks" / "a1.png").unlink()
    with pytest.raises(DatasetError) as e:
        read_folder(tmp_path)
    assert str(tmp_path / "anomalous" / "a1.jpg") in str(e.value)


def test_folder_non_image_file(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "normal" / "readme.md").write_text("x")
    with pytest.raises(DatasetError, match="readme.md"):
        read_folder(tmp_path)


def write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


def test_label_csv_defaults(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        write_png(tmp_path / "img" / name)
    csv_path = write_csv(tmp_path / "sewer.csv", ["Filename", "RB", "OB", "category"],
                         [["img/a.png", 0, 0, "pipe"], ["img/b.png", 1, 1, "pipe"], ["img/c.png", 0, 1, "joint"]])
    ds = read_label_csv(csv_path)
    assert [(s.path.name, s.category, s.label, s.defect) for s in ds] == [
        ("a.png", "pipe", 0, "good"), ("b.png", "pipe", 1, "RB+OB"), ("c.png", "joint", 1, "OB")]
    assert detect_layout(csv_path) == "csv"


def test_label_csv_explicit_columns_and_image_root(tmp_path):
    write_png(tmp_path / "imgs" / "a.png")
    write_png(tmp_path / "imgs" / "b.png")
    # SewerML-like: extra non-label columns, so label columns are named
    (tmp_path / "meta").mkdir()
    csv_path = write_csv(tmp_path / "meta" / "t.csv", ["Water", "Filename", "RB", "Defect"],
                         [[30, "a.png", 0, 0], [5, "b.png", 1, 1]])
    ds = read_label_csv(csv_path, image_root=tmp_path / "imgs", path_column="Filename", label_columns=["RB"])
    assert [(s.label, s.category) for s in ds] == [(0, "t"), (1, "t")]
    with pytest.raises(DatasetError, match="column 'Water'"):
        read_label_csv(csv_path, image_root=tmp_path / "imgs", path_column="Filename")


def test_label_csv_missing_image_names_it(tmp_path):
    csv_path = write_csv(tmp_path / "l.csv", ["path", "crack"], [["missing.png", 1]])
    with pytest.raises(DatasetError) as e:
        read_label_csv(csv_path)
    assert str(tmp_path / "missing.png") in str(e.value)


def test_load_mask_any_nonzero_is_anomalous(tmp_path):
    a = np.zeros((4, 5), np.uint8)
    a[0, 0], a[2, 3] = 255, 3  # MVTec uses 255, VisA class ids
    m = load_mask(write_png(tmp_path / "m.png", a))
    assert m.dtype == bool and m.sum() == 2 and m[0, 0] and m[2, 3]


def test_unknown_layout(tmp_path):
    with pytest.raises(DatasetError, match="unknown layout"):
        read_dataset(tmp_path, layout="coco")
