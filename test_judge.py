"""Tests of the shapes class reader that can say "none" and of confusion matrices with a none column."""
import types

import pytest
import torch

import contragan as cg

PALETTE = [c for _, c in cg.SHAPES]


def painted(form, colour, n=200, img_size=32):
    """Real shapes images of one class (`form`: its index) with the shape's pixels painted in `colour`
    (no jitter): the data's own geometry in any colour. Float in [-1, 1]."""
    images, labels = cg.make_shapes(4 * n, img_size, seed=5)
    images = images[labels == form].float()
    shape = images.amax(1, keepdim=True) > 120                 # background <= 30 + 8 sigma; shapes >= 200
    images = torch.where(shape, torch.tensor(colour, dtype=torch.float)[:, None, None], images)
    return images / 127.5 - 1


@pytest.mark.parametrize("size", [32, 64])
def test_reader_reads_real_images(size):
    for seed in range(3):
        images, labels = cg.make_shapes(400, size, seed)
        assert (cg.shapes_class_of(images.float() / 127.5 - 1) == labels).float().mean() >= 0.98


def test_reader_says_none_for_a_blank_background_and_off_palette_colours():
    blank = (30 + 8 * torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))) / 127.5 - 1
    assert cg.shapes_class_of(blank).tolist() == [-1] * 8
    for form, colour in ((1, (0, 255, 0)), (0, (255, 0, 255)), (2, (255, 255, 255))):  # lime, magenta, white
        assert (cg.shapes_class_of(painted(form, colour)) == -1).all(), (form, colour)


@pytest.mark.parametrize("form", range(4))
def test_reader_checks_the_form_against_the_colour(form):
    # circle red, square green, triangle blue, cross yellow: each other pairing (a yellow disc, a red
    # square, a blue cross, ...) is none. Small discs and crosses fill their boxes alike (0.65-0.70).
    for colour in range(4):
        judged = cg.shapes_class_of(painted(form, PALETTE[colour]))
        if colour == form:
            assert (judged == form).float().mean() >= 0.98, colour
        else:
            assert (judged == -1).float().mean() >= 0.95, colour


def test_confusion_counts_none_as_a_miss():
    asked = torch.tensor([0, 0, 1, 1, 2, 2])
    counts, raw, relabelled = cg.confusion(asked, torch.tensor([1, -1, 2, 2, -1, -1]), 3)
    assert counts.tolist() == [[0, 1, 0, 1], [0, 0, 2, 0], [0, 0, 0, 2]]   # last column: none
    # best relabelling 0->1, 1->2; the all-none row gets no hit (with "none" as a fourth class it would)
    assert raw == 0 and relabelled == pytest.approx(3 / 6)
    counts, raw, relabelled = cg.confusion(asked, torch.tensor([0, -1, 1, 1, 2, -1]), 3)
    assert counts[:, 3].tolist() == [1, 0, 1] and raw == relabelled == pytest.approx(4 / 6)
    counts, raw, relabelled = cg.confusion(asked, torch.full((6,), -1), 3)
    assert counts[:, 3].tolist() == [2, 2, 2] and raw == relabelled == 0


def test_d_diagnostics_records_the_none_share(monkeypatch):
    # Fakes are real images, one blanked: the colour reader's matrix has a none column and its share.
    images, labels = cg.make_shapes(64, 32, seed=2)
    images = images.float() / 127.5 - 1
    images[0] = -0.75                                          # a blank dark image
    monkeypatch.setattr(cg, "balanced_labels", lambda n, K, device, gen=None: labels)
    monkeypatch.setattr(cg, "generate", lambda G, y, z_dim, batch_size, gen: images)
    monkeypatch.setattr(cg, "d_judge", lambda D, x, y, device: (1.0, y))
    cfg = cg.build_parser().parse_args(["--dataset", "shapes", "--acc-images", "64"])
    rec = cg.d_diagnostics(None, None, (None, None), None, 4, cfg, torch.device("cpu"))
    colour = torch.tensor(rec["confusion_colour"])
    assert colour.shape == (4, 5) and colour[labels[0], 4] >= 1 and colour.sum() == 64
    assert rec["class_none"] == pytest.approx(colour[:, 4].sum().item() / 64) and rec["class_none"] > 0
    assert torch.tensor(rec["confusion_d"])[:, 4].sum() == 0 and rec["class_consistency_d"] == 1.0
    run = types.SimpleNamespace(acc_held=None, step=3)
    line = cg.Run.eval_line(run, {**rec, "d_sigma_max": 1.0})
    assert f"class consistency (colour) {rec['class_consistency']:.3f}, relabelled" in line
    assert f"none {rec['class_none']:.3f}" in line and line.count("none") == 1   # D never says none
