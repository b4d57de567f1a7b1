"""Tests of implicitgrad.data: task families, episode sampling, splits and offline datasets."""

import math
import sys

import numpy as np
import pytest
import torch

from implicitgrad.data import (
    EpisodeSampler,
    FewShotDataset,
    Sinusoid,
    SinusoidFunction,
    class_split,
    load_digits_fewshot,
    load_omniglot,
)

# --------------------------------------------------------------------------- Sinusoid


def test_sinusoid_shapes_and_defaults():
    family = Sinusoid(k_shot=5, seed=0)
    assert family.k_query == 5
    tasks = family.sample(3)
    assert len(tasks) == 3
    for task in tasks:
        assert len(task) == 4
        assert [t.shape for t in task] == [torch.Size([5, 1])] * 4
        assert all(t.dtype == torch.get_default_dtype() for t in task)
    x_s, y_s, x_q, y_q = Sinusoid(k_shot=4, k_query=7, seed=0).sample_batch(6)
    assert x_s.shape == y_s.shape == (6, 4, 1)
    assert x_q.shape == y_q.shape == (6, 7, 1)


def test_sinusoid_values_follow_the_task_function_and_ranges():
    family = Sinusoid(k_shot=10, k_query=10, seed=1)
    batch, functions = family.sample_batch(500, dtype=torch.float64, return_functions=True)
    x_s, y_s, x_q, y_q = batch
    amplitudes = torch.tensor([f.amplitude for f in functions], dtype=torch.float64)
    phases = torch.tensor([f.phase for f in functions], dtype=torch.float64)
    assert amplitudes.min() >= 0.1 and amplitudes.max() <= 5.0
    assert phases.min() >= 0.0 and phases.max() <= math.pi
    assert abs(amplitudes.mean().item() - 2.55) < 0.25
    x = torch.cat([x_s, x_q], 1)
    y = torch.cat([y_s, y_q], 1)
    assert x.min() >= -5.0 and x.max() <= 5.0
    assert (y.abs() <= amplitudes.view(-1, 1, 1) + 1e-12).all()
    for i, function in enumerate(functions):
        torch.testing.assert_close(function(x[i]), y[i], rtol=0, atol=1e-12)


def test_sinusoid_function_on_a_dense_grid():
    function = SinusoidFunction(amplitude=3.0, phase=0.5)
    grid = torch.linspace(-5, 5, 201)
    torch.testing.assert_close(function(grid), 3.0 * torch.sin(grid - 0.5))
    assert function(grid).shape == grid.shape


def test_sinusoid_reproducible_with_generator_seed_and_global_rng():
    def draw(generator):
        return Sinusoid(k_shot=3).sample_batch(4, generator=generator)

    first = draw(torch.Generator().manual_seed(7))
    second = draw(torch.Generator().manual_seed(7))
    other = draw(torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])

    seeded = Sinusoid(k_shot=3, seed=7).sample_batch(4)
    assert all(torch.equal(a, b) for a, b in zip(first, seeded))

    torch.manual_seed(3)
    global_first = Sinusoid(k_shot=3).sample_batch(4)
    torch.manual_seed(3)
    global_second = Sinusoid(k_shot=3).sample_batch(4)
    assert all(torch.equal(a, b) for a, b in zip(global_first, global_second))


def test_sinusoid_sample_matches_sample_batch_and_dtypes_agree():
    tasks = Sinusoid(k_shot=3, seed=5).sample(4)
    batch = Sinusoid(k_shot=3, seed=5).sample_batch(4)
    for i, task in enumerate(tasks):
        for a, b in zip(task, batch):
            assert torch.equal(a, b[i])
    single = Sinusoid(k_shot=3, seed=5).sample_batch(4, dtype=torch.float32)
    double = Sinusoid(k_shot=3, seed=5).sample_batch(4, dtype=torch.float64, device="cpu")
    assert single[0].dtype == torch.float32 and double[0].dtype == torch.float64
    for a, b in zip(single, double):
        assert torch.equal(a, b.float())


def test_sinusoid_zero_query_points():
    x_s, y_s, x_q, y_q = Sinusoid(k_shot=2, k_query=0, seed=0).sample(1)[0]
    assert x_s.shape == (2, 1) and x_q.shape == (0, 1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k_shot": 0}, ValueError, "k_shot"),
        ({"k_shot": 2.0}, TypeError, "k_shot"),
        ({"k_query": -1}, ValueError, "k_query"),
        ({"amplitude_range": (5.0, 0.1)}, ValueError, "amplitude_range"),
        ({"x_range": 3}, TypeError, "x_range"),
    ],
)
def test_sinusoid_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Sinusoid(**kwargs)


def test_sinusoid_rejects_bad_sample_arguments():
    family = Sinusoid(seed=0)
    with pytest.raises(ValueError, match="num_tasks"):
        family.sample(0)
    with pytest.raises(TypeError, match="dtype"):
        family.sample_batch(2, dtype=torch.int64)


# --------------------------------------------------------------------------- EpisodeSampler


def _indexed_dataset(num_classes=8, per_class=6):
    """Images that store their own index, so every drawn example can be traced back."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.arange(len(labels), dtype=torch.float64).view(-1, 1, 1)
    return images, labels


def test_episode_shapes_and_labels():
    images, labels = _indexed_dataset()
    sampler = EpisodeSampler(images, labels, n_way=3, k_shot=2, k_query=4)
    tasks = sampler.sample(5, generator=torch.Generator().manual_seed(0))
    assert len(tasks) == 5
    x_s, y_s, x_q, y_q = tasks[0]
    assert x_s.shape == (6, 1, 1) and x_q.shape == (12, 1, 1)
    assert y_s.dtype == y_q.dtype == torch.int64
    assert y_s.tolist() == [0, 0, 1, 1, 2, 2]
    assert y_q.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_episode_relabelling_is_consistent_and_random():
    images, labels = _indexed_dataset()
    sampler = EpisodeSampler(images, labels, n_way=4, k_shot=2, k_query=3)
    generator = torch.Generator().manual_seed(1)
    assignments = set()
    for x_s, y_s, x_q, y_q in sampler.sample(30, generator=generator):
        support_idx = x_s.flatten().long()
        query_idx = x_q.flatten().long()
        assert not set(support_idx.tolist()) & set(query_idx.tolist())
        assert len(set(support_idx.tolist())) == len(support_idx)
        mapping = {}
        for idx, new in zip(torch.cat([support_idx, query_idx]), torch.cat([y_s, y_q])):
            original = labels[idx].item()
            assert mapping.setdefault(new.item(), original) == original
        assert len(set(mapping.values())) == 4
        assignments.add(tuple(mapping[k] for k in range(4)))
    assert len(assignments) > 20


def test_episode_restricted_to_classes():
    images, labels = _indexed_dataset()
    allowed = (1, 4, 6)
    sampler = EpisodeSampler(images, labels, n_way=2, k_shot=1, k_query=1, classes=allowed)
    assert sampler.classes == allowed and sampler.num_classes == 3
    for x_s, _, x_q, _ in sampler.sample(20, generator=torch.Generator().manual_seed(0)):
        drawn = labels[torch.cat([x_s, x_q]).flatten().long()]
        assert set(drawn.tolist()) <= set(allowed)
    as_tensor = EpisodeSampler(images, labels, 2, 1, 1, classes=torch.tensor(allowed))
    assert as_tensor.classes == allowed


def test_episode_reproducible_and_global_rng():
    images, labels = _indexed_dataset()
    sampler = EpisodeSampler(images, labels, n_way=3, k_shot=1, k_query=2)

    def flat(tasks):
        return torch.cat([torch.cat([t.flatten().double() for t in task]) for task in tasks])

    a = flat(sampler.sample(4, generator=torch.Generator().manual_seed(3)))
    b = flat(sampler.sample(4, generator=torch.Generator().manual_seed(3)))
    c = flat(sampler.sample(4, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = flat(sampler.sample(4))
    torch.manual_seed(0)
    assert torch.equal(d, flat(sampler.sample(4)))


def test_episode_accepts_numpy():
    images = np.random.default_rng(0).random((20, 1, 2, 2)).astype(np.float32)
    labels = np.repeat(np.arange(4), 5)
    x_s, y_s, x_q, y_q = EpisodeSampler(images, labels, 4, 2, 3).sample_task(device="cpu")
    assert isinstance(x_s, torch.Tensor) and x_s.dtype == torch.float32
    assert x_s.shape == (8, 1, 2, 2) and y_q.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_way": 9}, ValueError, "n_way=9 exceeds the 8"),
        ({"k_shot": 4, "k_query": 3}, ValueError, "k_shot \\+ k_query = 7"),
        ({"k_shot": 0}, ValueError, "k_shot"),
        ({"n_way": 2.0}, TypeError, "n_way"),
        ({"classes": (0, 99)}, ValueError, "99"),
        ({"n_way": 3, "classes": (0, 1)}, ValueError, "n_way=3 exceeds the 2"),
    ],
)
def test_episode_rejects_bad_arguments(kwargs, error, match):
    images, labels = _indexed_dataset()
    arguments = {"n_way": 2, "k_shot": 1, "k_query": 1, **kwargs}
    with pytest.raises(error, match=match):
        EpisodeSampler(images, labels, **arguments)


def test_episode_rejects_mismatched_or_float_labels():
    images, labels = _indexed_dataset()
    with pytest.raises(ValueError, match="same length"):
        EpisodeSampler(images[:-1], labels, 2, 1, 1)
    with pytest.raises(TypeError, match="integer class labels"):
        EpisodeSampler(images, labels.float(), 2, 1, 1)
    with pytest.raises(ValueError, match="1-D"):
        EpisodeSampler(images, labels.view(-1, 1), 2, 1, 1)
    with pytest.raises(ValueError, match="num_tasks"):
        EpisodeSampler(images, labels, 2, 1, 1).sample(0)


# --------------------------------------------------------------------------- class_split


def test_class_split_counts_and_fractions():
    train, val, test = class_split(40, (30, 0, 10), seed=0)
    assert (len(train), len(val), len(test)) == (30, 0, 10)
    assert set(train) | set(test) == set(range(40)) and not set(train) & set(test)
    assert list(train) == sorted(train)
    parts = class_split(40, (0.7, 0.1, 0.2), seed=0)
    assert [len(p) for p in parts] == [28, 4, 8]
    odd = class_split(10, (1 / 3, 1 / 3, 1 / 3), seed=0)
    assert sorted(len(p) for p in odd) == [3, 3, 4]
    assert sorted(sum(odd, ())) == list(range(10))


def test_class_split_from_labels_and_seeds():
    labels = np.array([3, 7, 7, 11, 3, 20])
    a, b = class_split(labels, (2, 2), seed=5)
    assert sorted(a + b) == [3, 7, 11, 20]
    assert class_split(labels, (2, 2), seed=5) == (a, b)
    assert class_split(torch.as_tensor(labels), (2, 2), seed=5) == (a, b)
    splits = {class_split(100, (50, 50), seed=s) for s in range(5)}
    assert len(splits) == 5


@pytest.mark.parametrize(
    "sizes, error, match",
    [
        ((30, 5), ValueError, "sum to 35"),
        ((0.5, 0.4), ValueError, "sum to 1"),
        ((30, 0.25), TypeError, "mixes"),
        ((-1, 41), ValueError, "non-negative"),
        ((), TypeError, "non-empty"),
        (("a", "b"), TypeError, "numbers"),
    ],
)
def test_class_split_rejects_bad_sizes(sizes, error, match):
    with pytest.raises(error, match=match):
        class_split(40, sizes)


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="load_digits_fewshot needs scikit-learn")
    return load_digits_fewshot()


def test_digits_with_rotations(digits):
    assert isinstance(digits, FewShotDataset)
    assert digits.images.shape == (4 * 1797, 1, 8, 8)
    assert digits.images.dtype == torch.float32
    assert digits.images.min() == 0.0 and digits.images.max() == 1.0
    assert digits.labels.dtype == torch.int64
    assert torch.unique(digits.labels).tolist() == list(range(40))
    assert len(digits.class_names) == 40 and digits.class_names[13] == "digit3/rot090"
    assert (len(digits.train_classes), len(digits.val_classes), len(digits.test_classes)) == (
        30,
        0,
        10,
    )
    assert not set(digits.train_classes) & set(digits.test_classes)
    assert set(digits.train_classes) | set(digits.test_classes) == set(range(40))


def test_digits_rotations_really_rotate(digits):
    base, base_labels = digits.images[:1797], digits.labels[:1797]
    for k in range(1, 4):
        block = slice(k * 1797, (k + 1) * 1797)
        assert torch.equal(digits.images[block], torch.rot90(base, k, dims=(-2, -1)))
        assert torch.equal(digits.labels[block], base_labels + 10 * k)
    assert not torch.equal(digits.images[1797:3594], base)


def test_digits_without_rotations_and_with_val():
    pytest.importorskip("sklearn", reason="load_digits_fewshot needs scikit-learn")
    plain = load_digits_fewshot(rotations=False, dtype=torch.float64)
    assert plain.images.shape == (1797, 1, 8, 8) and plain.images.dtype == torch.float64
    assert (len(plain.train_classes), len(plain.test_classes)) == (5, 5)
    split = load_digits_fewshot(num_test_classes=8, num_val_classes=4, seed=3)
    parts = [set(split.train_classes), set(split.val_classes), set(split.test_classes)]
    assert [len(p) for p in parts] == [28, 4, 8]
    assert set.union(*parts) == set(range(40)) and sum(len(p) for p in parts) == 40
    assert load_digits_fewshot(num_test_classes=8, num_val_classes=4, seed=3)[2:] == split[2:]
    with pytest.raises(ValueError, match="no training class"):
        load_digits_fewshot(num_test_classes=40)


def test_digits_episodes(digits):
    sampler = EpisodeSampler(
        digits.images, digits.labels, n_way=5, k_shot=1, k_query=15, classes=digits.test_classes
    )
    x_s, y_s, x_q, y_q = sampler.sample(1, generator=torch.Generator().manual_seed(0))[0]
    assert x_s.shape == (5, 1, 8, 8) and x_q.shape == (75, 1, 8, 8)


def test_digits_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"implicitgrad\[examples\]"):
        load_digits_fewshot()


# --------------------------------------------------------------------------- Omniglot

LAYOUT = {
    "images_background": {"Alpha": 3, "Beta": 2},
    "images_evaluation": {"Gamma": 2},
}
DRAWINGS = 3
SIDE = 12


def _write_omniglot(root):
    """Writes a miniature Omniglot in the released layout; returns the pixel arrays by class."""
    image_module = pytest.importorskip("PIL.Image", reason="load_omniglot needs Pillow")
    rng = np.random.default_rng(0)
    pixels = []
    for split, alphabets in LAYOUT.items():
        for alphabet, num_characters in alphabets.items():
            for c in range(1, num_characters + 1):
                folder = root / split / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                drawings = []
                for d in range(DRAWINGS):
                    white = rng.random((SIDE, SIDE)) > 0.3
                    image_module.fromarray(white).save(folder / f"{c:04d}_{d:02d}.png")
                    drawings.append(white.astype(np.float32))
                pixels.append(drawings)
    return pixels


def test_omniglot_layout_classes_and_pixels(tmp_path):
    pixels = _write_omniglot(tmp_path)
    ds = load_omniglot(tmp_path, image_size=None)
    num_base = 7
    assert ds.images.shape == (num_base * DRAWINGS * 4, 1, SIDE, SIDE)
    assert torch.unique(ds.labels).tolist() == list(range(num_base * 4))
    assert len(ds.train_classes) == 5 * 4 and len(ds.test_classes) == 2 * 4
    assert ds.val_classes == ()
    assert not set(ds.train_classes) & set(ds.test_classes)
    assert ds.class_names[0] == "Alpha/character01/rot000"
    assert ds.class_names[5 + num_base] == "Gamma/character01/rot090"
    assert 5 in ds.test_classes and 5 + 3 * num_base in ds.test_classes
    for c, drawings in enumerate(pixels):
        stored = ds.images[ds.labels == c, 0]
        expected = 1.0 - torch.from_numpy(np.stack(drawings))
        assert torch.equal(stored, expected)
        for k in range(1, 4):
            rotated = ds.images[ds.labels == c + k * num_base, 0]
            assert torch.equal(rotated, torch.rot90(expected, k, dims=(-2, -1)))


def test_omniglot_resize_no_invert_no_rotations_and_val(tmp_path):
    _write_omniglot(tmp_path)
    ds = load_omniglot(tmp_path, rotations=False, image_size=6, invert=False)
    assert ds.images.shape == (7 * DRAWINGS, 1, 6, 6)
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    assert ds.train_classes == (0, 1, 2, 3, 4) and ds.test_classes == (5, 6)
    split = load_omniglot(tmp_path, image_size=6, num_val_characters=2, seed=1)
    assert len(split.val_classes) == 8 and len(split.train_classes) == 12
    val_base = {c % 7 for c in split.val_classes}
    assert len(val_base) == 2 and val_base <= {0, 1, 2, 3, 4}
    assert not set(split.val_classes) & set(split.train_classes)
    sampler = EpisodeSampler(split.images, split.labels, 5, 1, 2, classes=split.train_classes)
    assert sampler.sample_task()[0].shape == (5, 1, 6, 6)


def test_omniglot_missing_folder_shows_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background/<Alphabet>/<characterNN>"):
        load_omniglot(tmp_path / "nowhere")
    (tmp_path / "images_background.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="extract it first"):
        load_omniglot(tmp_path)


def test_omniglot_rejects_empty_character_and_bad_arguments(tmp_path):
    _write_omniglot(tmp_path)
    with pytest.raises(ValueError, match="num_val_characters"):
        load_omniglot(tmp_path, num_val_characters=5)
    with pytest.raises(ValueError, match="image_size"):
        load_omniglot(tmp_path, image_size=0)
    (tmp_path / "images_evaluation" / "Gamma" / "character03").mkdir()
    with pytest.raises(FileNotFoundError, match="no .png file"):
        load_omniglot(tmp_path)
