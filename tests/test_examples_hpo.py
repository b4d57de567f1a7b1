"""The hyperparameter-optimisation examples: their quick modes run and show the effect they claim.

Each example's ``main(argv)`` runs in-process with ``--quick``, its outputs in a temporary
directory. An inner solve that does not converge raises here (``ImplicitGradWarning`` is an
error under pytest), so these runs also check that every inner problem is solved to
stationarity. Also covers the shared helpers of ``examples/_common.py``.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    threads = torch.get_num_threads()
    yield
    # The examples default to one thread; leave the rest of the session as it was.
    torch.set_num_threads(threads)


@pytest.fixture
def run_quick(examples_path, tmp_path):
    def run(name, *extra):
        out, path = tmp_path / "figures", tmp_path / "metrics.json"
        metrics = importlib.import_module(name).main(["--quick", "--json", str(path), "--out", str(out), *extra])
        written = json.loads(path.read_text())
        assert set(written) == set(metrics)
        for key, value in metrics.items():
            if isinstance(value, float):
                assert written[key] == pytest.approx(value, rel=1e-12), key
        pngs = list(out.glob("*.png"))
        assert pngs, f"{name} saved no PNG figure in {out}"
        assert all(p.stat().st_size > 1000 for p in pngs)
        return metrics

    return run


def test_hpo_ridge(run_quick):
    m = run_quick("hpo_ridge")
    # The implicit hypergradient against autograd through the closed-form solution.
    assert m["hypergradient_rel_error"] < 1e-8
    assert m["val_loss_after_single"] < m["val_loss_before"]
    # Hypergradient descent on one λ reaches the grid's best (within the grid's resolution)...
    assert m["val_loss_after_single"] <= m["grid_best_val_loss"] * (1 + 1e-3)
    # ...and one λ per feature goes below any single λ on the validation set.
    assert m["val_loss_after"] < m["grid_best_val_loss"] - 0.01


def test_hpo_logreg_l2(run_quick):
    m = run_quick("hpo_logreg_l2")
    assert m["val_loss_after"] < 0.6 * m["val_loss_before"]
    assert m["test_accuracy_after"] > m["test_accuracy_before"]
    assert m["neumann_val_loss_after"] < m["val_loss_before"]
    start = m["hypergradient_errors_start"]
    # CG reaches the dense solve; the truncated Neumann series improves with terms but stays biased
    # at the end, where small penalties make the Hessian ill-conditioned.
    assert min(start["cg"]) < 1e-10
    assert start["neumann"][-1] < start["neumann"][0]
    end = m["hypergradient_errors_end"]
    assert min(end["cg"]) < 1e-10
    assert end["neumann"][end["budgets"].index(m["neumann_terms"])] > 1e-2


def test_hyper_cleaning(run_quick):
    m = run_quick("hyper_cleaning")
    assert m["oracle_accuracy"] > m["baseline_accuracy"] + 0.05
    assert m["cleaned_accuracy"] > m["baseline_accuracy"] + 0.05
    # Without being told which labels are wrong, the weights get close to the oracle.
    assert m["cleaned_accuracy"] > m["oracle_accuracy"] - 0.03
    assert m["f1"] > 0.8
    assert m["mean_weight_corrupted"] < 0.5 < m["mean_weight_clean"]
    assert m["val_loss_after"] < m["val_loss_before"]


def test_dataset_distillation(run_quick):
    m = run_quick("dataset_distillation")
    assert m["test_accuracy"] > 0.6  # chance is 0.1
    assert m["test_accuracy"] > m["test_accuracy_init"] + 0.3
    assert m["train_loss_after"] < m["train_loss_before"]


def test_cuda_requested_without_cuda_is_a_clear_error(examples_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available, so --device cuda is valid here")
    common = importlib.import_module("_common")
    parser = common.example_parser("examples/demo.py", "demo")
    with pytest.raises(SystemExit):
        common.parse_args(parser, ["--device", "cuda"])
    assert "no CUDA device is available" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--device cpu"):
        common.resolve_device("cuda")


def test_common_arguments(examples_path, tmp_path):
    common = importlib.import_module("_common")
    parser = common.example_parser("examples/demo.py", "demo")
    args = common.parse_args(parser, ["--seed", "3", "--out", str(tmp_path / "figs")])
    assert args.device == torch.device("cpu") and not args.quick and args.json is None
    assert (tmp_path / "figs").is_dir()
    first = torch.rand(3)
    common.parse_args(parser, ["--seed", "3", "--out", str(tmp_path / "figs")])
    assert torch.equal(first, torch.rand(3))
    assert common.example_parser("examples/demo.py", "demo").parse_args([]).out == str(Path("runs") / "demo")
    for bad in (["--seed", "-1"], ["--threads", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            common.parse_args(parser, bad)


def test_write_json_converts_tensors_and_non_finite(examples_path, tmp_path):
    common = importlib.import_module("_common")
    path = common.write_json(str(tmp_path / "sub" / "m.json"), {
        "a": torch.tensor(0.5, dtype=torch.float64), "b": np.float32(2.0), "c": float("nan"),
        "d": {"e": torch.arange(3)}, "f": [np.int64(1), None, "x"],
    })
    assert json.loads(path.read_text()) == {"a": 0.5, "b": 2.0, "c": None, "d": {"e": [0, 1, 2]}, "f": [1, None, "x"]}
    assert list((tmp_path / "sub").iterdir()) == [path]
    with pytest.raises(TypeError, match="object"):
        common.write_json(str(tmp_path / "bad.json"), {"x": object()})
    assert not (tmp_path / "bad.json").exists()
    assert common.write_json(None, {"x": 1}) is None


def test_split_indices_partition(examples_path):
    common = importlib.import_module("_common")
    parts = common.split_indices(10, [3, 2, -1], seed=0)
    assert [len(p) for p in parts] == [3, 2, 5]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="sizes"):
        common.split_indices(4, [3, 2], seed=0)


def test_script_runs_from_the_repository_root():
    # The examples import their helpers as `_common`, found because Python puts the script's
    # directory on sys.path: start one as a newcomer would. Asking for CUDA on a machine
    # without it exercises the command line end to end and stops before any work.
    argv = ["--help"] if torch.cuda.is_available() else ["--device", "cuda"]
    result = subprocess.run([sys.executable, "examples/hpo_ridge.py", *argv], cwd=EXAMPLES.parent,
                            capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available():
        assert result.returncode == 0 and "--quick" in result.stdout, result.stderr
    else:
        assert result.returncode == 2, result.stderr
        assert "no CUDA device is available" in result.stderr and "--device cpu" in result.stderr
