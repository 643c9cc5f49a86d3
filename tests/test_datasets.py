"""Discovery of image sets: folders, list files, MVTec categories; dataset roots and masks are
refused with the way out."""

import os

import pytest

from spade_faiss import datasets
from spade_faiss.synthetic import make_dataset


def test_folder_discovery_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b/2.PNG", "a.jpg", "b/1.tiff", ".hidden.png", ".dir/x.png", "c.txt", "d.JpEg", "e.webp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = [os.path.relpath(p, tmp_path) for p in datasets.list_folder(tmp_path)]
    assert got == ["a.jpg", "b/1.tiff", "b/2.PNG", "d.JpEg", "e.webp"]


def test_discovery_of_list_files_and_mvtec(tmp_path, dataset):
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n\n/abs/a.png\nrel/b.png\n")
    assert [s.path for s in datasets.discover(lst)] == ["/abs/a.png", str(tmp_path / "rel/b.png")]
    train = datasets.discover(dataset)
    assert len(train) == 12 and all(s.label == 0 and s.defect == "good" for s in train)
    assert all("/train/good/" in s.path for s in train)
    test = datasets.discover(dataset, split="test")
    assert [s.label for s in test] == [1] * 4 + [0] * 3
    assert [s.defect for s in test] == ["defect"] * 4 + ["good"] * 3
    assert all(s.mask and os.path.exists(s.mask) for s in test if s.label == 1)
    with pytest.raises(FileNotFoundError):
        datasets.discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        datasets.discover(tmp_path / "empty")
    with pytest.raises(ValueError, match="split='val'"):
        datasets.discover(dataset, "val")


def test_a_dataset_root_is_refused_with_its_categories(tmp_path):
    make_dataset(tmp_path / "root" / "bottle", n_train=2, n_good=1, n_defect=1, size=(32, 32))
    make_dataset(tmp_path / "root" / "cable", n_train=2, n_good=1, n_defect=1, size=(32, 32))
    assert datasets.source_kind(tmp_path / "root") == "dataset"
    with pytest.raises(ValueError, match=r"MVTec dataset root with categories \['bottle', 'cable'\].*root/bottle"):
        datasets.discover(tmp_path / "root")


def test_a_folder_with_ground_truth_masks_is_refused(tmp_path):
    root = make_dataset(tmp_path / "cat", n_train=2, n_good=1, n_defect=2, size=(32, 32))
    with pytest.raises(ValueError, match="2 of its 6 images look like ground-truth masks"):
        datasets.discover(_plain_copy(root, tmp_path))
    assert len(datasets.discover(root / "test")) == 3  # a plain folder without masks is fine


def _plain_copy(root, tmp_path):
    """The category without train/good (so it is not an MVTec category): a folder tree with masks."""
    import shutil
    plain = tmp_path / "plain"
    shutil.copytree(root / "test", plain / "test")
    shutil.copytree(root / "ground_truth", plain / "ground_truth")
    (plain / "more").mkdir()
    shutil.copy(next((root / "train" / "good").iterdir()), plain / "more")
    return plain


def test_links_back_into_the_tree_list_each_file_once(tmp_path):
    for rel in ["a.png", "sub/b.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "loop").symlink_to(".")
    (tmp_path / "sub" / "up").symlink_to("..")
    (tmp_path / "again.png").symlink_to("a.png")
    got = [os.path.relpath(p, tmp_path) for p in datasets.list_folder(tmp_path)]
    assert got == ["a.png", "sub/b.png"]


def test_one_image_file_is_one_sample_not_a_list_file(tmp_path, dataset):
    image = datasets.discover(dataset, "test")[0].path
    assert [s.path for s in datasets.discover(image, "test")] == [image]
    upper = tmp_path / "PART.PNG"
    upper.write_bytes(open(image, "rb").read())
    assert [s.path for s in datasets.discover(upper)] == [str(upper)]


def test_a_list_file_s_byte_order_mark_and_repeated_entries(tmp_path):
    from spade_faiss.datasets import list_file

    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbfa.png\nb.png\na.png\n")
    assert list_file(listing) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
