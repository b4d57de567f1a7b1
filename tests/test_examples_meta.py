"""Quick runs of the meta-learning examples, and their resumption after an interruption."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import imaml_fewshot  # noqa: E402
import imaml_sinusoid  # noqa: E402

import implicitgrad.meta as meta  # noqa: E402

# The examples keep IMAML's diagnostics on. The quick runs must be silent: every inner problem
# solved, every backward system positive definite at its solution (a meta-batch that met
# negative curvature was re-solved, and counted). The resumption test's tiny runs may report.
ALLOW_REPORTS = pytest.mark.filterwarnings("default::implicitgrad.ImplicitGradWarning")
SILENT = pytest.mark.filterwarnings("error::implicitgrad.ImplicitGradWarning")


@SILENT
def test_sinusoid_quick_imaml_beats_pretrained(tmp_path):
    metrics = imaml_sinusoid.main(["--quick", "--methods", "imaml,pretrained", "--out", str(tmp_path),
                                   "--json", str(tmp_path / "metrics.json")])
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    imaml, pretrained = metrics["methods"]["imaml"], metrics["methods"]["pretrained"]
    assert imaml["mse_mean"] + imaml["ci95"] < pretrained["mse_mean"] - pretrained["ci95"]
    # 4 of its 300 meta-batches met negative curvature at the first solve and were re-solved.
    assert imaml["inner_converged_fraction"] == 1 and imaml["inner_resolves"] > 0
    assert (tmp_path / "sinusoid_10shot.png").stat().st_size > 0


@SILENT
def test_fewshot_quick_imaml_beats_pretrained(tmp_path):
    metrics = imaml_fewshot.main(["--quick", "--methods", "imaml,pretrained", "--out", str(tmp_path),
                                  "--json", str(tmp_path / "metrics.json")])
    assert (metrics["n_way"], metrics["k_shot"]) == (5, 1)
    imaml, pretrained = metrics["methods"]["imaml"], metrics["methods"]["pretrained"]
    assert imaml["accuracy"] - imaml["ci95"] > pretrained["accuracy"] + pretrained["ci95"]
    assert (tmp_path / "fewshot_digits-5way1shot.png").stat().st_size > 0


@SILENT
def test_fewshot_quick_5shot_imaml_at_least_maml(tmp_path):
    """A short 5-shot run: iMAML with its defaults is no worse than MAML (within the confidence interval)."""
    metrics = imaml_fewshot.main(["--quick", "--k-shot", "5", "--steps", "100", "--methods", "imaml,maml",
                                  "--out", str(tmp_path)])
    imaml, maml = metrics["methods"]["imaml"], metrics["methods"]["maml"]
    assert imaml["accuracy"] >= maml["accuracy"] - maml["ci95"], (imaml, maml)
    assert imaml["adaptation"].startswith("proximal problem") and maml["adaptation"].startswith("5 gradient steps")
    assert imaml["inner_converged_fraction"] == 1


def without_timing(metrics):
    return {m: {k: v for k, v in r.items() if k != "train_seconds"} for m, r in metrics["methods"].items()}


@ALLOW_REPORTS
def test_fewshot_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """All five methods, interrupted in the third one between two checkpoints, then resumed."""
    args = ["--steps", "12", "--checkpoint-every", "5", "--meta-batch", "4", "--eval-tasks", "20"]
    whole = imaml_fewshot.main(args + ["--out", str(tmp_path / "whole")])

    calls = {"n": 0}
    meta_step = meta.MetaLearner.meta_step

    def interrupted(self, tasks):
        calls["n"] += 1
        if calls["n"] == 2 * 12 + 8:
            raise KeyboardInterrupt
        return meta_step(self, tasks)

    monkeypatch.setattr(meta.MetaLearner, "meta_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        imaml_fewshot.main(args + ["--out", str(tmp_path / "resumed")])
    monkeypatch.undo()
    resumed = imaml_fewshot.main(args + ["--out", str(tmp_path / "resumed"), "--resume"])

    assert without_timing(resumed) == without_timing(whole)
    for method in imaml_fewshot.LABELS:
        name = f"checkpoints/digits-5way1shot-{method}-rank0.pt"
        a = torch.load(tmp_path / "whole" / name, weights_only=True)
        b = torch.load(tmp_path / "resumed" / name, weights_only=True)
        assert a["step"] == b["step"] == 12
        for key, value in a["state"]["model"].items():
            assert torch.equal(value, b["state"]["model"][key]), (method, key)
        assert a["history"]["loss"] == b["history"]["loss"]
