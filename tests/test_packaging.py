"""How the package meets its users: warnings at their line, metadata, the built archives.

* Every ``ImplicitGradWarning`` names the user's line (``warning.filename`` is this file),
  not a line inside implicitgrad or torch — for the solve functions, the decorator, the
  layers and ``meta_step``, also under ``torch.func.vmap`` and from a backward pass.
* The metadata: one version source, the SPDX license and the LICENSE file, ``py.typed``,
  the ``testing`` extra and the message when Hypothesis is missing.
* The install scripts choose a virtual environment when none is active.
* The built sdist and wheel: ``twine check`` passes, the wheel holds ``py.typed``, and
  tests run from the unpacked sdist.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable, List

import pytest
import tomllib
import torch

import implicitgrad as ig

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64
HERE = str(Path(__file__).resolve())


# --------------------------------------------------------------------- warnings at the user's line
def record(call: Callable[[], object]) -> List[warnings.WarningMessage]:
    """Runs ``call`` and returns the ImplicitGradWarnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if issubclass(w.category, ig.ImplicitGradWarning)]


def line_below() -> int:
    """The number of the line after the caller's."""
    return sys._getframe(1).f_lineno + 1


def assert_at(caught: List[warnings.WarningMessage], line: int) -> None:
    assert caught, "expected an ImplicitGradWarning"
    for w in caught:
        assert (w.filename, w.lineno) == (HERE, line), f"{w.filename}:{w.lineno}: {w.message}"


def quadratic(x, t):
    return 0.5 * ((x - t) ** 2).sum()


def residual(x, t):
    return x - t


def mapping(x, t):
    return 0.5 * x + t


def stay(fn, x0, *params):
    """A solver that does not solve: returns x0, so the forward check warns."""
    return x0.clone()


def theta(n: int = 3, requires_grad: bool = True) -> torch.Tensor:
    return torch.linspace(1.0, 2.0, n, dtype=DT).requires_grad_(requires_grad)


@pytest.mark.parametrize("solve, fn", [
    (ig.implicit_solve, quadratic),
    (ig.root_solve, residual),
    (ig.fixed_point_solve, mapping),
])
def test_forward_warning_names_the_callers_line(solve, fn):
    t = theta()
    line = line_below()
    caught = record(lambda: solve(fn, torch.zeros(3, dtype=DT), t, solver=stay))
    assert_at(caught, line)


def test_backward_warning_names_the_line_that_calls_backward():
    t = theta(20)
    a = torch.diag(torch.logspace(0, 4, 20, dtype=DT))

    def ill_conditioned(x, t):
        return 0.5 * x @ a @ x - x @ t

    x = ig.implicit_solve(ill_conditioned, torch.zeros(20, dtype=DT), t,
                          solver=lambda f, x0, t: torch.linalg.solve(a, t), linear_solver=ig.CG(maxiter=2))
    line = line_below()
    caught = record(lambda: x.sum().backward())
    assert_at(caught, line)
    assert "linear solve" in str(caught[0].message)


def test_decorator_warning_names_the_callers_line():
    @ig.implicit(objective=quadratic)
    def fit(x0, t):
        return x0.clone()

    t = theta()
    line = line_below()
    caught = record(lambda: fit(torch.zeros(3, dtype=DT), t))
    assert_at(caught, line)


def test_warning_under_vmap_names_the_users_line():
    ts = torch.linspace(1.0, 2.0, 6, dtype=DT).reshape(2, 3)

    def solve_one(t):
        return ig.implicit_solve(quadratic, torch.zeros(3, dtype=DT), t, solver=stay)

    # The user's call of implicit_solve is inside the vmapped function; torch's frames
    # between it and the vmap call are skipped.
    caught = record(lambda: torch.func.vmap(solve_one)(ts))
    assert_at(caught, solve_one.__code__.co_firstlineno + 1)


def test_backward_warning_under_vmap_names_the_users_line():
    ts = torch.linspace(1.0, 2.0, 6, dtype=DT).reshape(2, 3)

    def total(t):
        return ig.implicit_solve(quadratic, torch.zeros(3, dtype=DT), t, solver=stay).sum()

    line = line_below()
    caught = record(lambda: torch.func.vmap(torch.func.grad(total))(ts))
    # the forward check (in ``total``) and the user's vmap call are both lines of this file
    assert caught
    assert all(w.filename == HERE for w in caught)
    assert {w.lineno for w in caught} <= {line, total.__code__.co_firstlineno + 1}


class _Halfway(ig.nn.ImplicitLayer):
    """x* = argmin ½‖x − u‖², found by a solver that stops after one small step."""

    def init(self, inputs):
        return torch.zeros_like(inputs[0])

    def objective(self, x, inputs, params):
        return 0.5 * ((x - inputs[0]) ** 2).sum()


def test_layer_warnings_name_the_callers_line():
    layer = _Halfway(solver=ig.solvers.GradientDescent(lr=0.1, maxiter=1))
    line = line_below()
    caught = record(lambda: layer(theta()))
    assert_at(caught, line)


@pytest.mark.parametrize("head", [
    lambda: ig.nn.RidgeHead(lam=1e-3, linear_solver=ig.CG(maxiter=1)),
    lambda: ig.nn.LogisticHead(num_classes=3, lam=1e-3, linear_solver=ig.CG(maxiter=1)),
])
def test_head_backward_warning_names_the_line_that_calls_backward(head):
    gen = torch.Generator().manual_seed(0)
    z_s, z_q = torch.randn(12, 8, generator=gen, dtype=DT), torch.randn(6, 8, generator=gen, dtype=DT)
    module = head().double()
    logits = module(z_s, torch.arange(12) % 3, z_q)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(6) % 3)
    line = line_below()
    caught = record(lambda: loss.backward())
    assert_at(caught, line)


def test_head_forward_warning_names_the_callers_line():
    gen = torch.Generator().manual_seed(0)
    z_s, z_q = torch.randn(12, 8, generator=gen, dtype=DT), torch.randn(6, 8, generator=gen, dtype=DT)
    module = ig.nn.LogisticHead(num_classes=3, solver=ig.solvers.GradientDescent(lr=0.01, maxiter=1)).double()
    line = line_below()
    caught = record(lambda: module(z_s, torch.arange(12) % 3, z_q))
    assert_at(caught, line)


@pytest.mark.parametrize("batched", [False, True])
def test_meta_step_warning_names_the_callers_line(batched):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    learner = ig.meta.IMAML(model, torch.nn.functional.mse_loss, lam=1.0,
                            inner_solver=ig.solvers.GradientDescent(lr=0.01, maxiter=1), batched=batched)
    gen = torch.Generator().manual_seed(1)
    tasks = [tuple(torch.randn(*shape, generator=gen, dtype=DT) for shape in [(5, 3), (5, 1), (5, 3), (5, 1)])
             for _ in range(2)]
    line = line_below()
    caught = record(lambda: learner.meta_step(tasks))
    assert_at(caught, line)
    assert "IMAML" in str(caught[0].message)


def test_user_stacklevel_counts_library_and_torch_frames():
    from implicitgrad._diagnostics import user_stacklevel

    # Functions whose code claims to live in the package's folder count as the library's.
    source = (
        "import inspect\n"
        "def inner(t):\n"
        "    files = [frame.filename for frame in inspect.stack()]\n"
        "    seen.append((user_stacklevel(), files))\n"
        "    return t\n"
        "def outer(t):\n"
        "    return inner(t)\n"
    )
    space = {"user_stacklevel": user_stacklevel, "seen": []}
    exec(compile(source, str(Path(ig.__file__).parent / "_as_if_internal.py"), "exec"), space)
    space["outer"](torch.zeros(2))
    torch.func.vmap(space["outer"])(torch.zeros(2))
    torch.func.grad(lambda t: space["outer"](t).sum())(torch.zeros(2))
    assert len(space["seen"]) == 3
    for level, files in space["seen"]:
        # files[0] is inner; warnings.warn(stacklevel=k) from inner names files[k - 1]
        assert files[level - 1] == HERE, files[:level]
        assert all(f.startswith((str(Path(ig.__file__).parent), str(Path(torch.__file__).parent)))
                   for f in files[:level - 1])
    assert space["seen"][0][0] == 3  # inner, outer, then this test
    assert space["seen"][1][0] > 3   # torch's vmap frames sit in between


# --------------------------------------------------------------------------------- metadata
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


def test_one_version_source():
    project = pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "implicitgrad.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+)?", ig.__version__)


def test_license_is_an_spdx_expression_with_its_text():
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639


def test_declared_floors_are_the_tested_versions():
    # The floors are the versions the suite runs on: a lower one would claim untested support.
    project = pyproject()["project"]
    python_floor = re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"])
    torch_floor = next(re.fullmatch(r"torch>=(\d+)\.(\d+)", d) for d in project["dependencies"]
                       if d.startswith("torch"))
    assert python_floor and torch_floor
    assert sys.version_info[:2] >= tuple(map(int, python_floor.groups()))
    assert tuple(map(int, torch.__version__.split("+")[0].split(".")[:2])) >= tuple(map(int, torch_floor.groups()))
    classifiers = [c for c in project["classifiers"] if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert classifiers and all(tuple(map(int, c.rsplit(" ", 1)[1].split("."))) >= tuple(map(int, python_floor.groups()))
                               for c in classifiers)


def test_package_is_typed():
    assert (Path(ig.__file__).parent / "py.typed").is_file()


def test_testing_extra_holds_hypothesis():
    extras = pyproject()["project"]["optional-dependencies"]
    assert any(d.startswith("hypothesis") for d in extras["testing"])


def test_strategies_without_hypothesis_name_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n == "hypothesis" or n.startswith("hypothesis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # import hypothesis fails
    monkeypatch.delitem(sys.modules, "implicitgrad.testing.strategies", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'implicitgrad\[testing\]'"):
        importlib.import_module("implicitgrad.testing.strategies")
    monkeypatch.delitem(sys.modules, "implicitgrad.testing.strategies", raising=False)


# -------------------------------------------------------------------------- install scripts
def choose_python(tmp_path: Path, **env: str) -> str:
    """What scripts/_env.sh picks as the Python to install into, in a clean environment."""
    clean = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "IMPLICITGRAD_VENV")}
    clean.update(env)
    done = subprocess.run(["bash", "-c", '. scripts/_env.sh; choose_python >&2; printf %s "$PYTHON"'],
                          cwd=ROOT, env=clean, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_scripts_create_a_project_venv_when_none_is_active(tmp_path):
    venv = tmp_path / "venv"
    assert choose_python(tmp_path, IMPLICITGRAD_VENV=str(venv)) == f"{venv}/bin/python"
    assert (venv / "bin" / "python").exists() and (venv / "pyvenv.cfg").is_file()
    # a second run reuses it
    assert choose_python(tmp_path, IMPLICITGRAD_VENV=str(venv)) == f"{venv}/bin/python"


def test_scripts_use_the_active_venv_or_the_given_python(tmp_path):
    assert choose_python(tmp_path, VIRTUAL_ENV="/some/env") == "/some/env/bin/python"
    assert choose_python(tmp_path, PYTHON="/usr/bin/python3", VIRTUAL_ENV="/some/env") == "/usr/bin/python3"


def test_scripts_show_pips_progress():
    for script in ["demo.sh", "test.sh", "_env.sh"]:
        text = (ROOT / "scripts" / script).read_text()
        assert "--quiet" not in text and " -q " not in text, script


# --------------------------------------------------------------------------- built archives
@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    source = tmp_path_factory.mktemp("source") / "implicitgrad"
    # A copy without what earlier builds and runs left behind (egg-info, build/, docs/_build,
    # virtual environments, outputs), so that the sdist is what a fresh checkout gives.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "dist", "_build", ".venv*", "runs", "__pycache__", ".*_cache", ".hypothesis"))
    # --no-isolation: the build uses this environment's setuptools (the test extra pins
    # setuptools>=77) instead of downloading one.
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def only(folder: Path, pattern: str) -> Path:
    (path,) = folder.glob(pattern)
    return path


def test_twine_check_passes(dist):
    pytest.importorskip("twine")
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_wheel_holds_py_typed_license_and_metadata(dist):
    with zipfile.ZipFile(only(dist, "*.whl")) as wheel:
        names = wheel.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = wheel.read(info).decode()
    assert "implicitgrad/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "examples/", "docs/")) for n in names)
    assert f"Version: {ig.__version__}" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    assert "Provides-Extra: testing" in metadata
    assert "Project-URL: Source," in metadata


def test_tests_run_from_the_unpacked_sdist(dist, tmp_path):
    with tarfile.open(only(dist, "*.tar.gz")) as archive:
        # The "data" filter (Python ≥ 3.11.4) refuses unsafe members; older 3.11s lack it.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(tmp_path, **safe)
    (unpacked,) = tmp_path.iterdir()
    for helper in ["conftest.py", "problems.py", "registry.py"]:
        assert (unpacked / "tests" / helper).is_file(), helper
    assert (unpacked / "setup.cfg").is_file() and (unpacked / "LICENSE").is_file()
    assert not (unpacked / "docs" / "_build").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = str(unpacked)  # the sdist's package, not the installed one
    probe = subprocess.run([sys.executable, "-c", "import implicitgrad; print(implicitgrad.__file__)"],
                           cwd=unpacked, env=env, capture_output=True, text=True, timeout=300)
    assert Path(probe.stdout.strip()).is_relative_to(unpacked), probe.stdout + probe.stderr
    # Tests that import each helper module: problems.py (test_core), registry.py (test_linalg).
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/test_core.py", "tests/test_linalg.py", "-k", "ridge or cg"],
        cwd=unpacked, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"\d+ passed", done.stdout)


# ---------------------------------------------------------------------------- type checking
USER_CODE = '''
import torch
import implicitgrad as ig

def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((x - t) ** 2).sum()

t = torch.ones(3)
x = ig.implicit_solve(f, torch.zeros(3), t, solver=lambda fn, x0, t: t)
reveal_type(x)
y, info = ig.implicit_solve(f, torch.zeros(3), t, solver=lambda fn, x0, t: t, return_info=True)
reveal_type(y)
reveal_type(info)
tree = ig.root_solve(lambda x, t: {"a": x["a"] - t}, {"a": torch.zeros(3)}, t, solver=lambda fn, x0, t: {"a": t})
reveal_type(tree)
z, info2 = ig.fixed_point_solve(lambda x, t: 0.5 * x + t, torch.zeros(3), t, return_info=True)
reveal_type(info2.backward)
'''


def test_a_users_type_checker_sees_precise_return_types(tmp_path, monkeypatch):
    api = pytest.importorskip("mypy.api")
    (tmp_path / "user.py").write_text(USER_CODE)
    # MYPYPATH: the package as a user's mypy finds it (an editable install's import hook is
    # invisible to mypy); py.typed makes mypy read it instead of treating it as Any.
    monkeypatch.setenv("MYPYPATH", str(ROOT))
    out, err, status = api.run([str(tmp_path / "user.py"), "--cache-dir", str(tmp_path / "cache"),
                                "--no-error-summary", "--follow-imports=silent"])
    revealed = [t.replace("builtins.", "") for t in re.findall(r'Revealed type is "([^"]+)"', out)]
    assert revealed == [
        "torch._tensor.Tensor",
        "torch._tensor.Tensor",
        "implicitgrad._diagnostics.SolveInfo",
        "dict[str, torch._tensor.Tensor]",
        "implicitgrad._diagnostics.LinearSolveInfo | None",
    ], out + err


# ------------------------------------------------------------------------ examples' help texts
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py") if not p.stem.startswith("_"))


def example_help(name: str, capsys, monkeypatch) -> List[str]:
    """The options of ``python examples/<name>.py --help``, one string each, whitespace collapsed."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    return re.split(r"\s(?=--[a-z])", text.split("options:", 1)[1])


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help_states_each_default_once(name, capsys, monkeypatch):
    for option in example_help(name, capsys, monkeypatch):
        assert option.count("default") <= 1, option
        assert "(default: None)" not in option, option


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_quick_help_says_how_long(name, capsys, monkeypatch):
    quick = next(o for o in example_help(name, capsys, monkeypatch) if o.startswith("--quick"))
    assert re.search(r"\d+ (s|min)", quick), f"--quick should say how long it takes: {quick}"
