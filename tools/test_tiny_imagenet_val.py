"""Tests of tools/tiny_imagenet_val.py on a hand-made Tiny ImageNet val folder of 3 images, 2 classes."""
import os

import tiny_imagenet_val as T

ANNOTATIONS = ("val_0.JPEG\tn01443537\t0\t32\t44\t62\n"
               "val_1.JPEG\tn02124075\t52\t1\t62\t64\n"
               "val_2.JPEG\tn01443537\t4\t0\t60\t55\n")


def make_val(root, annotations=ANNOTATIONS, images=("val_0.JPEG", "val_1.JPEG", "val_2.JPEG")):
    os.makedirs(root / "images")
    (root / "val_annotations.txt").write_text(annotations)
    for name in images:
        (root / "images" / name).write_bytes(name.encode())   # the bytes name the file: where each went is checked
    return root


def test_three_images_go_to_their_class_folders(tmp_path, capsys):
    val, out = make_val(tmp_path / "val"), tmp_path / "out"
    assert T.main([str(val), str(out)]) == 0
    assert sorted(os.listdir(out)) == ["n01443537", "n02124075"]
    assert sorted(os.listdir(out / "n01443537")) == ["val_0.JPEG", "val_2.JPEG"]
    assert os.listdir(out / "n02124075") == ["val_1.JPEG"]
    assert (out / "n02124075" / "val_1.JPEG").read_bytes() == b"val_1.JPEG"
    assert os.path.samefile(out / "n01443537" / "val_0.JPEG", val / "images" / "val_0.JPEG")   # a hard link
    assert "wrote 3 images of 2 classes" in capsys.readouterr().out


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    missing = make_val(tmp_path / "missing", images=("val_0.JPEG", "val_2.JPEG"))
    assert T.main([str(missing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "val_1.JPEG" in err
    assert not (tmp_path / "out").exists()
    assert T.main([str(tmp_path), str(tmp_path / "out")]) == 2                 # no val_annotations.txt
    assert "val_annotations.txt does not exist" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert T.main([str(make_val(tmp_path / "val")), str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
