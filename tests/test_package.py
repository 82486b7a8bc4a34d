"""fastmix as a package: the wheel (its files, metadata, license and commands), the commands run
from a fresh virtual environment with no source tree on the path, and the public API's
docstrings and annotations."""
import ast
import configparser
import email.parser
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

import fastmix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a wheel is built from (a copy of these, so the build leaves nothing in the checkout).
SOURCES = ("fastmix", "kernels", "setup.py", "pyproject.toml", "README.md", "LICENSE")
COMMANDS = {"fastmix-train": "fastmix.train_cli:main",
            "fastmix-selfcheck": "fastmix.selfcheck:main",
            "fastmix-study": "fastmix.study:cli"}
EXTRAS = {"test", "puzzlemix", "study", "dali", "models", "tensorboard"}


def _env():
    """The subprocesses' environment: nothing that puts the checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP",
                                                             "PYTHONHOME")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", OMP_NUM_THREADS="1")
    return env


def _run(cmd, **kw):
    kw.setdefault("env", _env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds from a copy of the sources, offline (``--no-build-isolation``:
    this environment's setuptools)."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=junk)
        else:
            shutil.copy2(path, src / name)
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
              "--no-index", "-q", "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = list((tmp / "dist").glob("fastmix-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _dist_info(names, file):
    hits = [n for n in names if re.fullmatch(rf"fastmix-[^/]+\.dist-info/{file}", n)]
    assert len(hits) == 1, (file, hits)
    return hits[0]


def test_version_is_one_literal_read_without_importing_torch():
    """pyproject.toml's version is ``fastmix.__version__``, a literal that setuptools reads from
    the source (AST) without running fastmix/__init__.py (and so without torch)."""
    with open(os.path.join(ROOT, "fastmix", "__init__.py")) as f:
        tree = ast.parse(f.read())
    literal = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
               and [getattr(t, "id", None) for t in n.targets] == ["__version__"]
               and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)]
    assert literal == [fastmix.__version__]
    with open(os.path.join(ROOT, "setup.py")) as f:      # no second source
        calls = [n for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.Call)
                 and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1 and "version" not in {k.arg for k in calls[0].keywords}
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
            "from setuptools.config.pyprojecttoml import read_configuration\n"
            "from setuptools.config.expand import read_attr\n"
            "cfg = read_configuration('pyproject.toml', expand=False)\n"
            "attr = cfg['tool']['setuptools']['dynamic']['version']['attr']\n"
            "print(attr, read_attr(attr, package_dir={'fastmix': 'fastmix'}, root_dir='.'))\n"
            "assert 'fastmix' not in sys.modules")
    r = _run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["fastmix.__version__", fastmix.__version__]


def test_wheel_holds_the_package_kernels_license_and_commands(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = email.parser.Parser().parsestr(
            zf.read(_dist_info(names, "METADATA")).decode())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(_dist_info(names, "entry_points.txt")).decode())
        license_text = zf.read(_dist_info(names, "licenses/LICENSE")).decode()
    # every module of the source tree, the kernels as fastmix.kernels (no top-level kernels/)
    for folder, dest in (("fastmix", "fastmix"), ("kernels", "fastmix/kernels")):
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            for name in files:
                if name.endswith(".py"):
                    path = os.path.normpath(os.path.join(dest, rel, name)).replace(os.sep, "/")
                    assert path in names, f"{path} is not in the wheel"
    kernels = {n for n in names if re.fullmatch(r"fastmix/kernels/[^/]+\.py", n)}
    assert {"fastmix/kernels/__init__.py", "fastmix/kernels/mixed_ce.py"} <= kernels
    assert "fastmix/kernels/autotune_spills.json" in names
    assert "fastmix/train_cli.py" in names and "fastmix/study.py" in names
    assert not [n for n in names if n.split("/")[0] in ("kernels", "bench", "tests", "train.py")]
    # metadata: one version, the license, the dependencies and extras
    assert metadata["Name"] == "fastmix"
    assert metadata["Version"] == fastmix.__version__
    assert (metadata.get("License-Expression") or metadata.get("License")) == "Apache-2.0"
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert license_text == f.read()
    assert metadata["Requires-Python"] == ">=3.10"
    assert "fastmix developers" in metadata["Author"]
    assert metadata["Summary"] and "AutoMix" in metadata.get_payload()[:2000]
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("torch>=") for r in requires)
    assert set(metadata.get_all("Provides-Extra")) == EXTRAS
    scripts = dict(entry_points["console_scripts"])
    assert scripts == COMMANDS
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.slow
def test_installed_wheel_commands_run_from_a_fresh_venv(wheel, tmp_path):
    """The wheel in a fresh venv (``--no-deps``: torch and the rest come from this
    environment's site-packages through a .pth file, read after the venv's own, whose fastmix
    it does not see), run from a folder outside the checkout."""
    venv = tmp_path / "venv"
    r = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert r.returncode == 0, r.stderr[-3000:]
    bin_dir = venv / "bin"
    python = bin_dir / "python"
    r = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
              "--no-index", "-q", str(wheel)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    parent = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    with open(os.path.join(site.stdout.strip(), "_parent_site_packages.pth"), "w") as f:
        f.write("\n".join(parent) + "\n")
    work = tmp_path / "work"      # a folder without fastmix/ or train.py in it
    work.mkdir()

    r = _run([str(python), "-c", "import fastmix, fastmix.kernels, fastmix.study, "
              "importlib.metadata as m; print(fastmix.__file__); "
              "print(fastmix.kernels.__file__); print(fastmix.study.ROOT); "
              "print(m.version('fastmix'))"], cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    init, kernels_init, study_root, version = r.stdout.split()
    for path in (init, kernels_init):
        assert os.path.realpath(path).startswith(os.path.realpath(venv) + os.sep), path
    assert study_root == "None" and version == fastmix.__version__

    for cmd, needle in (("fastmix-train", "the run ("), ("fastmix-selfcheck", "--no-timing"),
                        ("fastmix-study", "--check-against")):
        r = _run([str(bin_dir / cmd), "--help"], cwd=work)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.startswith(f"usage: {cmd}") and needle in r.stdout, r.stdout[:500]

    from fastmix.data import FASHION_MNIST_DIR
    have_fmnist = os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
    data = [] if have_fmnist else ["--dataset", "synthetic"]
    # two steps of 100 images, then the test subset
    r = _run([str(bin_dir / "fastmix-train"), "--preset", "cpu-small", *data, "--epochs", "1",
              "--train-subset", "200", "--test-subset", "200", "--out", "run", "--no-progress",
              "--device", "cpu"], cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["method"] == "automix" and summary["config"]["train_subset"] == 200
    assert json.loads(r.stdout.strip().splitlines()[-1])["method"] == "automix"

    # the study driver, installed: its runs are `python -m fastmix.train_cli` in this folder
    r = _run([str(bin_dir / "fastmix-study"), "--methods", "vanilla", "--seeds", "0",
              "--epochs", "1", "--train-subset", "64", "--val-split", "0", "--eval-every", "1",
              "--train-args", "--dataset synthetic --batch-size 32 --test-subset 32",
              "--out", "study"], cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((work / "study" / "results.json").read_text())
    assert results["provenance"]["command"].startswith("fastmix-study --methods vanilla ")
    assert results["provenance"]["commit"] is None
    assert (work / "study" / "vanilla" / "seed0" / "summary.json").exists()


def test_resume_hint_names_the_command_that_ran(monkeypatch):
    from fastmix import train_cli
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for argv0, expected in (("/v/bin/fastmix-train", "fastmix-train --out o --resume"),
                            ("train.py", "python train.py --out o --resume"),
                            ("/x/fastmix/train_cli.py",
                             "python -m fastmix.train_cli --out o --resume"),
                            ("/x/pytest", "python train.py --out o --resume")):
        monkeypatch.setattr(sys, "argv", [argv0])
        assert train_cli.resume_command(["--out", "o", "--overwrite"]) == expected
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["/v/bin/fastmix-train"])
    assert train_cli.resume_command(["--out", "o"]) == \
        "torchrun <the same launch options> --no-python fastmix-train --out o --resume"


def test_root_scripts_are_the_package_commands():
    """train.py and bench/accuracy.py run the package's code: the same functions."""
    import train
    from fastmix import study, train_cli
    for name in ("main", "parser", "resume_command", "out_of_memory_message",
                 "unwritten_outputs", "PRESETS"):
        assert getattr(train, name) is getattr(train_cli, name)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import accuracy
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    for name in ("parse_args", "run_argv", "aggregate", "check_against", "provenance",
                 "_write_json", "markdown_table", "CPU_PROTOCOL", "METHOD_ARGS"):
        assert getattr(accuracy, name) is getattr(study, name)
    assert study.ROOT == ROOT and study.train_command()[1:] == [os.path.join(ROOT, "train.py")]
    assert accuracy.COMMAND == "python bench/accuracy.py"


# ---- the public API: docstrings and annotations -----------------------------------------------
def _own_public_methods(cls):
    """The public methods ``cls`` defines itself (and ``__init__``), as functions."""
    out = {}
    for name, value in vars(cls).items():
        fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if inspect.isfunction(fn) and (name == "__init__" or not name.startswith("_")
                                       or name == "__call__"):
            out[name] = fn
    return out


@pytest.mark.parametrize("name", fastmix.__all__)
def test_every_exported_name_is_documented(name):
    obj = getattr(fastmix, name)
    if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
        doc = obj.__doc__
        assert doc and len(doc.strip()) > 20, f"fastmix.{name} has no docstring"
    else:               # data (METHODS): described in the package's docstring
        assert f"``{name}``" in fastmix.__doc__


@pytest.mark.parametrize("cls", [fastmix.AutoMix, fastmix.MixBlock, fastmix.Classifier,
                                 fastmix.Mixup, fastmix.MixupClassifier],
                         ids=lambda c: c.__name__)
def test_constructor_docstrings_name_every_parameter(cls):
    doc = cls.__doc__
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    missing = [p for p in params if not re.search(rf"(?<![\w]){p}(?![\w])", doc)]
    assert not missing, f"{cls.__name__}'s docstring does not explain {missing}"
    assert "Args:" in doc


@pytest.mark.parametrize("obj", [fastmix.AutoMix, fastmix.MixBlock, fastmix.Classifier,
                                 fastmix.Mixup, fastmix.MixupClassifier,
                                 fastmix.mixed_cross_entropy, fastmix.soft_targets],
                         ids=lambda o: o.__name__)
def test_public_api_has_return_annotations(obj):
    fns = _own_public_methods(obj) if inspect.isclass(obj) else {obj.__name__: obj}
    missing = [n for n, fn in fns.items()
               if inspect.signature(fn).return_annotation is inspect.Signature.empty]
    assert not missing, f"{obj.__name__}: no return annotation on {missing}"
    undocumented = [n for n, fn in fns.items() if n != "__init__" and not fn.__doc__]
    assert not undocumented, f"{obj.__name__}: no docstring on {undocumented}"
