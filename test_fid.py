"""Tests for fid.py: CPU only, no network, no published weights (random weights and analytic oracles).

Run: python -m pytest -q test_fid.py
"""
import errno
import os
import re
import types
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from PIL import Image
from scipy import linalg

import fid

HERE = os.path.dirname(os.path.abspath(__file__))


def random_gaussian(rng, n, d, shift=0.0):
    """mu and unbiased sigma of n correlated d-dim samples: rank min(n - 1, d)."""
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + shift
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.fixture(scope="module")
def model():
    return fid.load_inception(random_init=True, seed=0)


def write_images(folder, count, size=16, seed=0, offset=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i + offset:03d}.png"))
    return folder


def one_line(capsys, main, args, code=2):
    """main(args) as the command line runs it: the exit status and its single stderr line."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as exit:
        status = exit.code
    except KeyboardInterrupt:                                  # escaped: a traceback (and pytest would stop)
        status = "KeyboardInterrupt"
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == code and len(lines) == 1, (args, status, lines)
    return lines[0]


def no_work(*args, **kwargs):
    raise AssertionError("the work started before the check that fails")


# --- The Frechet distance: analytic oracles and the sqrtm formula


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The oracle: TTUR's and pytorch-fid's formula (pytorch-fid 0.3.0, fid_score.py, calculate_frechet_distance),
    a general matrix square root of S1 S2 (scipy sqrtm, ~10 s at d = 2048 on 2 CPU cores), with their guards."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # the product is nearly singular
        offset = eps * np.eye(len(sigma1))
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding leaves a small imaginary part
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_identical_statistics_give_zero():
    mu, sigma = random_gaussian(np.random.default_rng(0), 500, 64)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(1)
    mu1, sigma = random_gaussian(rng, 500, 64)
    mu2 = mu1 + rng.standard_normal(64)
    expected = np.sum((mu1 - mu2) ** 2)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [400, 50, 3])  # full rank, singular (fewer images than dimensions), rank 2
def test_eigen_method_equals_sqrtm_formula(n):
    rng = np.random.default_rng(n)
    mu1, sigma1 = random_gaussian(rng, n, 128)
    mu2, sigma2 = random_gaussian(rng, n, 128, shift=0.5)
    expected = frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_guards():
    mu, sigma = random_gaussian(np.random.default_rng(2), 100, 8)
    with pytest.raises(fid.FIDError, match="mismatched"):
        fid.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    with pytest.raises(fid.FIDError, match="NaN"):
        fid.frechet_distance(mu, sigma * np.nan, mu, sigma)
    with pytest.raises(fid.FIDError, match="not PSD"):
        fid.frechet_distance(mu, sigma, mu, 2 * np.ones((8, 8)) - np.eye(8))  # eigenvalues 15 and -1
    with pytest.raises(fid.FIDError, match="non-negative diagonal"):
        fid.frechet_distance(mu, -sigma, mu, sigma)


# --- Streaming statistics and the Inception Score


def test_running_stats_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(3)
    x = rng.random((37, 16)) * 2 + 0.5  # positive and offset, like post-ReLU pool features
    stats = fid.RunningStats(dim=16)
    for batch in np.array_split(x, [10, 11, 30]):  # uneven batches, one of a single row
        stats.update(torch.from_numpy(batch).float())
    x32 = x.astype(np.float32).astype(np.float64)  # what the float32 features hold
    assert stats.n == 37
    np.testing.assert_allclose(stats.mu, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x32, rowvar=False), rtol=1e-10, atol=1e-14)


def test_running_stats_small_samples():
    stats = fid.RunningStats(dim=4)
    stats.update(torch.ones(1, 4))
    with pytest.raises(fid.FIDError, match="at least 2"):
        stats.sigma
    stats.update(torch.zeros(2, 4))
    with pytest.warns(UserWarning, match="singular"):
        stats.sigma
    with pytest.raises(fid.FIDError, match="shape"):
        stats.update(torch.zeros(2, 5))


def _all_reduce_worker(rank, init_file, x):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stats = fid.RunningStats(dim=x.shape[1])
    stats.update(x[:3] if rank == 0 else x[3:])  # unequal shares
    stats.all_reduce()
    expected = np.cov(x.double().numpy(), rowvar=False)
    np.testing.assert_allclose(stats.sigma, expected, rtol=1e-12, atol=1e-15)
    assert stats.n == len(x)
    dist.destroy_process_group()


def test_all_reduce_combines_ranks_exactly(tmp_path):
    x = torch.rand(10, 6)
    mp.start_processes(_all_reduce_worker, args=(str(tmp_path / "init"), x), nprocs=2, start_method="fork")


def test_class_stats_route_each_image_to_its_label():
    """Intra-class FID's statistics from mixed-label batches equal each class's own statistics."""
    class Flat(torch.nn.Module):                               # features: the first 2048 pixel values
        def forward(self, x):
            return x.flatten(1)[:, :fid.FEATURE_DIM].double(), torch.zeros(len(x), 1008)

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 32, 32, generator=gen) * 2 - 1
    labels = torch.randint(0, 3, (40,), generator=gen)
    batches = iter(zip(images.split(16), labels.split(16)))
    class_stats = [fid.RunningStats() for _ in range(3)]
    stats, _ = fid.features_from_sampler(Flat(), lambda n: next(batches), 40, 16, "cpu", class_stats=class_stats)
    assert stats.n == 40 and sum(s.n for s in class_stats) == 40
    for k, s in enumerate(class_stats):
        x = images[labels == k].flatten(1)[:, :fid.FEATURE_DIM].double().numpy()
        np.testing.assert_allclose(s.mu, x.mean(0), atol=1e-12)
        np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), atol=1e-10)


def test_inception_score_oracles():
    uniform = np.full((20, 1008), 1 / 1008)
    assert fid.inception_score(uniform) == pytest.approx((1.0, 0.0))
    one_hot = np.eye(1008)[np.tile(np.arange(10), 10)]  # every split: 10 distinct confident classes
    assert fid.inception_score(one_hot) == pytest.approx((10.0, 0.0))
    with pytest.raises(fid.FIDError, match="at least 10"):
        fid.inception_score(uniform[:5])


# --- The Inception graph and its weights


def test_state_dict_is_torchvision_inception3_with_1008_classes(model):
    reference = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert ours == {key: tuple(value.shape) for key, value in reference.state_dict().items()}


@pytest.mark.parametrize("block", ["Mixed_5b", "Mixed_6b", "Mixed_7b", "Mixed_7c"])
def test_tf_pooling_quirks(model, block):
    """Against torchvision's block with the same weights: count_include_pad=False changes only the
    border pixels (A, C, first E); the max pool of the second E changes the interior too."""
    ours = getattr(model, block)
    theirs = type(ours).__mro__[1](ours.branch1x1.conv.in_channels, **(
        {"pool_features": ours.branch_pool.conv.out_channels} if block == "Mixed_5b" else
        {"channels_7x7": ours.branch7x7_1.conv.out_channels} if block == "Mixed_6b" else {}))
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    x = torch.rand(1, ours.branch1x1.conv.in_channels, 6, 6)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs()
    interior = diff[..., 1:-1, 1:-1].max()
    assert diff.max() > 1e-4
    assert (interior > 1e-4) if block == "Mixed_7c" else (interior == 0)


def test_forward_shapes_and_input_ranges(model):
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        pool, logits = model(x)
        pool_float, _ = model(x.float() / 127.5 - 1)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    torch.testing.assert_close(pool, pool_float)
    assert pool.std() > 1e-3  # Kaiming init: informative features, not ~1e-8
    with pytest.raises(fid.FIDError, match=r"\[-1, 1\]"):
        fid.features_from_sampler(model, lambda n: torch.rand(n, 3, 8, 8) * 255, 2, 2, "cpu")


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = fid.load_inception(random_init=True, seed=7)
    assert torch.equal(torch.rand(3), expected)
    b = fid.load_inception(random_init=True, seed=7)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert "NOT comparable" in fid.describe_protocol(fid.inception_protocol(a))


def test_weights_file_loads_strictly_and_is_labelled(model, tmp_path):
    path = tmp_path / "inception.pth"
    torch.save(model.state_dict(), path)
    loaded = fid.load_inception(weights=path)
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    assert "NOT the published" in loaded.weights_tag  # its hash is not 6726825d...
    bad = tmp_path / "aux.pth"
    torch.save(torchvision.models.inception.Inception3(num_classes=1008, init_weights=False).state_dict(), bad)
    with pytest.raises(fid.FIDError, match="not a state dict of the FID Inception graph"):
        fid.load_inception(weights=bad)  # has the aux head: strict=True refuses it


def test_offline_without_weights_gives_one_clear_line(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(fid.FIDError) as error:
        fid.load_inception()
    message = str(error.value)  # the download failed: the cache folder exists, the file does not
    assert "\n" not in message
    assert fid.WEIGHTS_NAME in message and fid.WEIGHTS_URL in message and "--weights" in message
    # a file of that name in the cache that is not the published one is refused, not used
    (tmp_path / "checkpoints" / fid.WEIGHTS_NAME).write_bytes(b"not the weights")
    with pytest.raises(fid.FIDError, match="not the published file"):
        fid.load_inception()


# --- Statistics files and their protocol


PROTOCOL = {"dataset": "cifar10", "split": "test", "num_images": 37, "weights": fid.WEIGHTS_NAME,
            "resize": fid.RESIZE}


def test_stats_file_round_trip_and_protocol_refusal(tmp_path):
    mu, sigma = random_gaussian(np.random.default_rng(4), 50, 8)
    path = tmp_path / "stats.npz"
    fid.save_stats(path, (mu, sigma), PROTOCOL)
    mu2, sigma2, protocol = fid.load_stats(path, expect=dict(PROTOCOL))
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and protocol == PROTOCOL
    with pytest.raises(fid.FIDError, match="split='train' was requested"):
        fid.load_stats(path, expect={**PROTOCOL, "split": "train"})
    with pytest.raises(fid.FIDError, match="extra"):
        fid.load_stats(path, expect={**PROTOCOL, "extra": 1})
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # pytorch-fid's format
    assert fid.load_stats(tmp_path / "pytorch_fid.npz")[2] == {}
    with pytest.raises(fid.FIDError, match="no protocol"):
        fid.load_stats(tmp_path / "pytorch_fid.npz", expect=PROTOCOL)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(fid.FIDError, match="not a readable"):
        fid.load_stats(tmp_path / "broken.npz")
    np.savez(tmp_path / "other.npz", mean=mu)
    with pytest.raises(fid.FIDError, match="no 'mu' and 'sigma'"):
        fid.load_stats(tmp_path / "other.npz")


def test_describe_protocol():
    line = fid.describe_protocol({**PROTOCOL, "num_images": 10000, "fake": "10000 (EMA G, BN batch stats)"})
    assert line == ("FID protocol: Inception-V3 TF weights pt_inception-2015-12-05-6726825d.pth, 299x299 bilinear, "
                    "fake 10000 (EMA G, BN batch stats) vs cifar10 test 10000")


def test_sampler_dataset_and_reference_cache_agree(model, tmp_path, monkeypatch):
    images = torch.rand(10, 3, 12, 12) * 2 - 1  # 10: one image per Inception Score split
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(10))  # (image, label) items
    protocol = {**fid.inception_protocol(model), "dataset": "toy", "split": "test", "num_images": 10}
    cache = tmp_path / "ref.npz"
    batches = iter(images.split(4))  # 4, 4, 2: what the sampler asks for
    with pytest.warns(UserWarning, match="singular"):
        stats, inception_score = fid.features_from_sampler(model, lambda n: next(batches), 10, 4, "cpu",
                                                           compute_is=True)
        mu, sigma, _ = fid.reference_stats(model, dataset, cache, protocol, 10, 4, "cpu")  # via the data set
        np.testing.assert_allclose(sigma, stats.sigma, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mu, stats.mu, rtol=1e-12)
    assert inception_score[0] >= 1.0 and inception_score == pytest.approx(fid.inception_score(stats.probs))
    monkeypatch.setattr(fid, "features_from_dataset", None)  # a second call must read the cache
    assert np.array_equal(fid.reference_stats(model, dataset, cache, protocol, 10, 4, "cpu")[1], sigma)
    with pytest.raises(fid.FIDError, match="num_images=10, but num_images=9"):
        fid.reference_stats(model, dataset, cache, {**protocol, "num_images": 9}, 9, 4, "cpu")
    with pytest.raises(fid.FIDError, match="the model has"):
        fid.reference_stats(model, dataset, tmp_path / "x.npz", {**protocol, "weights": fid.WEIGHTS_NAME}, 10, 4, "cpu")


def test_fid_reference_stats_reports_progress_and_checks_its_cache_first(tmp_path, capsys, monkeypatch):
    class Flat(torch.nn.Module):                               # features: the first 2048 pixel values
        def forward(self, x):
            return x.flatten(1)[:, :fid.FEATURE_DIM].double(), torch.zeros(len(x), 1008)

    clock = iter(range(0, 10 ** 6, 4))                         # 4 s per reading: a line every few batches
    monkeypatch.setattr(fid, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    images = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with pytest.warns(UserWarning, match="singular"):
        fid.reference_stats(Flat(), images, tmp_path / "ref.npz", {"dataset": "toy"}, 40, 4, "cpu")
    lines = capsys.readouterr().err.splitlines()
    assert 3 <= len(lines) < 10 and lines[-1].startswith("FID reference ref.npz: 40/40 images | "), lines
    for line in lines:
        assert re.fullmatch(r"FID reference ref\.npz: \d+/40 images \| [\d.]+ img/s \| left \d+m\d\ds", line), line
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(fid, "features_from_dataset", no_work)
    with pytest.raises(fid.FIDError, match="cannot write .*Not a directory"):
        fid.reference_stats(Flat(), images, tmp_path / "file" / "ref.npz", {"dataset": "toy"}, 40, 4, "cpu")


# --- Command line


def test_cli_folder_stats_npz_fid_round_trip(tmp_path, capsys):
    a = write_images(tmp_path / "a", 4, seed=1)
    b = write_images(tmp_path / "b", 4, seed=2)
    common = ["--random-weights", "--batch-size", "3", "--num-workers", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer than 2048 images: singular covariances
        fid.main([str(a), str(b), *common])
        from_folders = capsys.readouterr().out
        fid.main(["--save-stats", str(a), str(tmp_path / "a.npz"), *common])
        fid.main([str(tmp_path / "a.npz"), str(b), *common])
    out = capsys.readouterr().out
    assert "RANDOM weights" in from_folders and "NOT comparable" in from_folders
    value = float(from_folders.split("FID: ")[1].split()[0])
    assert value > 0 and f"FID: {value:.6f}" in out  # the .npz gives the same number
    assert fid.load_stats(tmp_path / "a.npz")[2]["num_images"] == 4


def test_cli_bad_inputs_give_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "one", 1)
    (tmp_path / "notes.txt").write_text("not an image")
    write_images(tmp_path / "bad", 2)
    (tmp_path / "bad" / "zz.png").write_text("not a png")
    (tmp_path / "broken.npz").write_bytes(b"garbage")
    mixed = write_images(tmp_path / "mixed", 2)
    Image.new("RGB", (8, 8)).save(mixed / "big.png")
    ok = write_images(tmp_path / "ok", 2)
    cases = {"empty folder": (tmp_path / "empty", ok), "one image": (tmp_path / "one", ok),
             "non-image file": (tmp_path / "notes.txt", ok), "non-image .png": (tmp_path / "bad", ok),
             "unreadable .npz": (tmp_path / "broken.npz", ok), "sizes differ": (mixed, ok),
             "existing output": ("--save-stats", ok, tmp_path / "broken.npz")}
    for name, args in cases.items():                          # main() is what `python fid.py ARGS` runs
        with pytest.raises(SystemExit) as exit:
            fid.main([*map(str, args), "--random-weights", "--num-workers", "0"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, lines)


# --- Command line: flags, files and outputs checked before the work, one clear line


def test_cli_flags_and_files_give_one_clear_line(tmp_path, capsys):
    ok = write_images(tmp_path / "ok", 2)
    (tmp_path / "notes.npz").write_text("hello\n")  # a text file named .npz
    (tmp_path / "notes.pth").write_text("hello\n")  # a text file given as weights
    cases = [([ok, ok, "--batch-size", "0"], "--batch-size must be at least 1"),
             ([ok], "the following arguments are required"),  # argparse: usage + error before
             ([tmp_path / "notes.npz", ok], "not a zip of arrays"),
             ([ok, ok, "--weights", tmp_path / "notes.pth"], "not a torch weights file")]
    if not torch.cuda.is_available():
        cases.append(([ok, ok, "--device", "cuda"], "no CUDA GPU"))
    for args, expected in cases:
        with pytest.raises(SystemExit) as exit:
            fid.main([str(a) for a in args] + ["--num-workers", "0"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, lines)
        assert expected in lines[0] and "pickle" not in lines[0] and not lines[0].endswith("(101)"), lines[0]


def test_fid_cli_checks_output_inputs_and_flags_before_the_features(tmp_path, capsys, monkeypatch):
    ok, one = write_images(tmp_path / "ok", 3), write_images(tmp_path / "one", 1)
    (tmp_path / "file").write_text("")
    np.savez(tmp_path / "d4.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp_path / "text.npz", mu=np.array(["a", "b"]), sigma=np.eye(2))
    np.savez(tmp_path / "empty.npz", mu=np.zeros(0), sigma=np.zeros((0, 0)))
    np.savez(tmp_path / "proto.npz", mu=np.zeros(4), sigma=np.eye(4), protocol=np.array("{not json"))
    monkeypatch.setattr(fid, "features_from_dataset", no_work)  # every case fails before minutes of features
    random = ["--random-weights", "--num-workers", "0"]
    cases = [(["--save-stats", ok, tmp_path / "file" / "a.npz", *random], "cannot write"),
             (["--save-stats", ok, tmp_path / "no" / "such" / "a.npz", *random], "No such file or directory"),
             (["--save-stats", ok, tmp_path / "ok", *random], "does not end in .npz"),  # not "exists; delete it"
             ([ok, one, *random], "at least 2 images"),      # B's headers before A's features
             ([ok, tmp_path / "d4.npz", *random], "2048-d statistics but B has 4-d"),
             ([ok, ok, "--inception-score", *random], "at least 10 images"),
             ([tmp_path / "text.npz", tmp_path / "d4.npz"], "do not fit together"),
             ([tmp_path / "empty.npz", tmp_path / "empty.npz"], "do not fit together"),
             ([tmp_path / "proto.npz", tmp_path / "d4.npz"], "'protocol' is not a JSON object"),
             ([ok, ok, "--device", "banana"], "--device banana: not one of cpu, cuda"),
             ([ok, ok, "--weights", tmp_path], "is a folder"),
             ([ok, ok, "--weights", tmp_path / "w.pth", "--random-weights"], "exclude each other"),
             ([tmp_path / "d4.npz", tmp_path / "d4.npz", "--inception-score"], "needs an image folder")]
    for args, expected in cases:
        line = one_line(capsys, fid.main, args)
        assert line.startswith("error: ") and expected in line, (args, line)
    assert sorted(os.listdir(tmp_path)) == ["d4.npz", "empty.npz", "file", "ok", "one", "proto.npz", "text.npz"]


@pytest.mark.parametrize("workers", [0, 1])                   # 1: the error crosses a DataLoader worker
def test_fid_cli_names_a_truncated_image(tmp_path, capsys, workers):
    ok, cut = write_images(tmp_path / "ok", 3), write_images(tmp_path / "cut", 3)
    data = (cut / "001.png").read_bytes()
    (cut / "001.png").write_bytes(data[:len(data) // 2])       # the header reads; the pixels do not
    line = one_line(capsys, fid.main, [cut, ok, "--random-weights", "--num-workers", workers])
    assert line == f"error: {cut / '001.png'}: not a readable image (image file is truncated)", line


def test_fid_cli_reads_16_bit_and_exif_images_by_their_range_as_training_does(tmp_path, capsys):
    # 40000 of 65535 is 156 of 255 (convert("RGB") would clip it to white): the two folders are the same images
    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    for folder in (wide, narrow):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        level = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
        Image.fromarray(level).save(wide / f"{i}.png")
        Image.fromarray(np.round(level / 257.0).astype(np.uint8)).convert("RGB").save(narrow / f"{i}.png")
    x = fid.ImageFolderFlat(wide)[0]
    assert x.dtype == torch.uint8 and x.float().mean() < 200   # white would be 255 everywhere
    assert torch.equal(x, fid.ImageFolderFlat(narrow)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 images: singular covariances
        fid.main([str(wide), str(narrow), "--random-weights", "--batch-size", "3", "--num-workers", "0"])
    assert float(capsys.readouterr().out.split("FID: ")[1].split()[0]) < 1e-3
    rotated = tmp_path / "rotated"                               # EXIF 6: a 16x8 header, shown 8x16
    rotated.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    for i in range(3):
        Image.new("RGB", (16, 8)).save(rotated / f"{i}.png", **{"exif": exif} if i == 1 else {})
    line = one_line(capsys, fid.main, [rotated, narrow, "--random-weights", "--num-workers", "0"])
    assert "1.png is 8x16 as read (EXIF rotation applied), but 0.png is 16x8" in line, line


def test_full_disk_and_nan_statistics_are_one_line_before_the_features(tmp_path, capsys, monkeypatch):
    ok = write_images(tmp_path / "ok", 3)
    np.savez(tmp_path / "nan.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
    random = ["--random-weights", "--num-workers", "0"]
    with monkeypatch.context() as patch:
        patch.setattr(fid, "features_from_dataset", no_work)   # found before A's features are computed
        line = one_line(capsys, fid.main, [ok, tmp_path / "nan.npz", *random])
        assert line == f"error: {tmp_path / 'nan.npz'}: its mu or sigma holds NaN or inf (statistics of a broken run?)"
        patch.setattr(fid.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=2 ** 20))  # 1 MiB left
        line = one_line(capsys, fid.main, ["--save-stats", ok, tmp_path / "a.npz", *random])
        assert line == f"error: cannot write {tmp_path / 'a.npz'}: 1.0 MiB free there, its statistics need 32 MiB"
    def disk_fills(file, **arrays):                            # the disk fills while the file is written
        file.write(b"PK" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fid.np, "savez", disk_fills)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 images: singular covariance
        with pytest.raises(SystemExit) as exit:
            fid.main([str(ok), str(tmp_path / "a.npz"), "--save-stats", "--batch-size", "3", *random])
    lines = capsys.readouterr().err.strip().splitlines()         # the progress line, then the error
    assert exit.value.code == 2 and "images |" in lines[0] and len(lines) == 2, lines
    assert lines[1] == f"error: cannot write {tmp_path / 'a.npz'} (No space left on device); nothing written"
    assert sorted(os.listdir(tmp_path)) == ["nan.npz", "ok"]   # no .tmp left to fill the disk further
