"""Image folders and data directories as users have them: every image read by its real range, links,
hidden files, broken files under DataLoader workers, small folders with FID. CPU only, seconds each."""
import os

import numpy as np
import pytest
from PIL import Image

import contragan as cg
from test_contragan import TINY, one_line_error, run_main, write_folder


def test_image_modes_are_read_by_their_range(tmp_path, capsys):
    full = lambda value, dtype: np.full((8, 8), value, dtype=dtype)
    files = {"a16.png": Image.fromarray(full(40000, np.uint16)),          # I;16: convert("RGB") made it white
             "b16.tif": Image.fromarray(full(40000, ">u2")),              # I;16B
             "cfloat.tif": Image.fromarray(full(0.25, np.float32)),       # F in [0, 1]: it was black
             "dint.tif": Image.fromarray(full(20000, np.int32)),          # I, read as 16-bit: it was clipped
             "etransparent.png": Image.new("RGBA", (8, 8), (0, 0, 255, 0)),  # over white, not its hidden blue
             "fla.png": Image.new("LA", (8, 8), (0, 128)),                # black at half alpha over white
             "gcmyk.tif": Image.new("CMYK", (8, 8), (0, 255, 255, 0)),    # red
             "hbit.png": Image.new("1", (8, 8), 1),
             "igif.gif": Image.new("RGB", (8, 8), (10, 200, 30)),         # GIF was not read at all
             "jexif.png": Image.new("RGB", (8, 8), (255, 0, 0)),          # stored upside down: shown blue on top
             "xfloat.tif": Image.fromarray(full(3.0, np.float32)),        # a float range other than [0, 1]: refused
             "yint.tif": Image.fromarray(full(-5, np.int32))}
    files["jexif.png"].paste((0, 0, 255), (0, 4, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 3                                          # EXIF orientation: rotate 180 degrees to show
    for name, im in files.items():                            # one class per file: the label names the file
        (tmp_path / "data" / name).mkdir(parents=True)
        im.save(tmp_path / "data" / name / name, **{"exif": exif} if name == "jexif.png" else {})
    ds = cg.load_folder(str(tmp_path / "data"), 8)
    px = {ds.classes[y]: x[:, 0, 0].tolist() for x, y in (ds[j] for j in range(len(ds)))}  # uniform images
    assert px["a16.png"] == px["b16.tif"] == [156] * 3                       # 40000 / 257 = 155.6
    assert px["cfloat.tif"] == [64] * 3 and px["dint.tif"] == [78] * 3       # 0.25 * 255, 20000 / 257
    assert px["etransparent.png"] == [255] * 3 and px["fla.png"] == [127] * 3
    assert px["gcmyk.tif"] == [255, 0, 0] and px["hbit.png"] == [255] * 3 and px["igif.gif"] == [10, 200, 30]
    assert px["jexif.png"] == [0, 0, 255] and "xfloat.tif" not in px and "yint.tif" not in px
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and "xfloat.tif" in warnings[0] and "mode F" in warnings[0]
    assert "yint.tif" in warnings[1] and "mode I" in warnings[1]


def test_symlink_loop_counts_each_image_once(tmp_path, capsys):
    data = write_folder(tmp_path / "data", 16, classes=2)
    os.symlink("..", data / "c0" / "up")                      # ImageFolder followed it: 7,216 images
    os.symlink("0.png", data / "c0" / "again.png")            # the same file twice in one class: once
    ds = cg.load_folder(str(data), 32)
    assert len(ds) == 16
    assert all(os.path.basename(os.path.dirname(path)) == f"c{label}" for path, label in ds.samples)
    os.symlink("../c1", data / "c0" / "other")                # class c1's images inside c0: which class?
    r = run_main(capsys, *TINY, "--dataset", "folder", "--data-dir", data, "--steps", "1", "--run-dir", tmp_path / "r")
    assert "also in class 'c0'" in one_line_error(r) and not (tmp_path / "r").exists()


def test_hidden_and_non_image_files_are_left_out(tmp_path, capsys):
    data = write_folder(tmp_path / "data", 16, classes=2)
    (data / ".ipynb_checkpoints").mkdir()                     # a notebook's folder is no class
    (data / "c0" / "._0.png").write_bytes(b"\0" * 64)         # macOS resource fork: not an image
    (data / "c1" / "notes.txt").write_text("labels by hand")
    ds = cg.load_folder(str(data), 32)
    assert ds.classes == ["c0", "c1"] and len(ds) == 16
    out = capsys.readouterr()
    assert "1 files" in out.out and "notes.txt" in out.out and not out.err


def test_huge_image_is_skipped_and_named(tmp_path, capsys, monkeypatch):
    data = write_folder(tmp_path / "data", 4, classes=2)
    Image.new("RGB", (64, 64)).save(data / "c0" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1700)      # 4096 pixels: over twice the limit
    ds = cg.load_folder(str(data), 32)
    assert [ds[j][0].shape for j in range(len(ds))] == [(3, 32, 32)] * 5
    assert "huge.png (DecompressionBombError" in capsys.readouterr().err


def test_small_folder_fid_reference_is_a_random_subset(tmp_path, capsys, monkeypatch):
    # Under 200 images there is no held-out split: FID's reference is the training images, and its
    # first --fid-images were class 0's alone. The statistics are stubbed: what is measured is which images.
    data, seen = write_folder(tmp_path / "data", 16, classes=2), []
    monkeypatch.setattr(cg.FIDEvaluator, "_reference", lambda self, ds, path, protocol: seen.append(
        [ds[i][1] for i in range(len(ds))]) or (np.zeros(2048), np.eye(2048)))
    monkeypatch.setattr(cg.FIDEvaluator, "__call__", lambda self, G: {"fid": 1.0})
    r = run_main(capsys, *TINY, "--dataset", "folder", "--data-dir", data, "--steps", "1", "--fid-images", "8",
                 "--fid-weights", "random", "--run-dir", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert len(seen) == 1 and len(seen[0]) == 8 and 2 <= sum(seen[0]) <= 6
    assert "vs 8 of the 16 folder training images" in r.stdout and "no held-out reference" in r.stdout


def test_intra_fid_short_class_fails_before_writing(tmp_path, capsys):
    data = write_folder(tmp_path / "data", 15, classes=2)
    for f in list((data / "c1").iterdir())[1:]:               # c1 keeps one image: no covariance
        f.rename(data / "c0" / f"moved{f.name}")
    r = run_main(capsys, *TINY, "--dataset", "folder", "--data-dir", data, "--steps", "1", "--fid-images", "15",
                 "--fid-weights", "random", "--intra-fid", "--batch-size", "4", "--run-dir", tmp_path / "r")
    assert "class 'c1' has 1 of the 15" in one_line_error(r)
    assert not (tmp_path / "r").exists()                       # no 33 MB statistics files left behind


@pytest.mark.parametrize("dataset", ["folder", "cifar10"])
def test_data_dir_that_is_a_file(dataset, tmp_path, capsys):
    (tmp_path / "images.zip").write_bytes(b"PK")
    r = run_main(capsys, *TINY, "--dataset", dataset, "--data-dir", tmp_path / "images.zip", "--steps", "1",
                 "--run-dir", tmp_path / "r")
    assert "is a file, not a folder" in one_line_error(r)


def test_shapes_beyond_memory_is_refused(tmp_path, capsys):
    r = run_main(capsys, *TINY, "--shapes-size", "10000000", "--steps", "1", "--run-dir", tmp_path / "r")
    assert "GB of memory, more than this machine has" in one_line_error(r)    # not a crash at the allocation


def test_fid_cache_in_unwritable_data_dir_goes_to_run_folder(tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file where a folder would be")
    r = run_main(capsys, *TINY, "--steps", "1", "--fid-images", "8", "--fid-weights", "random", "--eval-batch", "8",
                 "--data-dir", tmp_path / "blocker" / "data", "--run-dir", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r" / "fid_shapes_heldout_8_random.npz").is_file()
    assert "cached in the run folder (cannot write to" in r.stdout


def test_broken_image_named_once_across_workers_and_epochs(tmp_path, capfd):
    data = write_folder(tmp_path / "data", 15, classes=2)
    good = next((data / "c1").iterdir()).read_bytes()
    (data / "c1" / "cut.png").write_bytes(good[:len(good) // 2])   # truncated: PIL fails only when decoding
    # 16 images, batches of 8, 2 D steps a step: each step is one epoch, new workers every epoch
    r = run_main(capfd, *TINY, "--dataset", "folder", "--data-dir", data, "--num-workers", "2", "--acc-images", "1",
                 "--steps", "3", "--eval-every", "100", "--run-dir", tmp_path / "r")   # capfd: the workers' stderr too
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "c1/cut.png" in warnings[0] and "truncated" in warnings[0]
