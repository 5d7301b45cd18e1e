"""bench/gpu_wheels.py and bench/gpu.sh's WHEELS folder: what an offline GPU machine's Python
lacks is installed from carried wheels, and only that."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_wheels  # noqa: E402


def test_wheel_names_are_read_and_compiled_wheels_for_another_python_refused(tmp_path):
    assert gpu_wheels.wheel_project(Path("typing_extensions-4.16.0-py3-none-any.whl")) == "typing-extensions"
    compiled = Path("PyYAML-6.0.4-cp312-cp312-manylinux_2_28_x86_64.whl")
    assert gpu_wheels.wheel_project(compiled) == "pyyaml"
    gpu_wheels.check_python(compiled, python=(3, 12))
    gpu_wheels.check_python(Path("braceexpand-0.1.7-py2.py3-none-any.whl"), python=(3, 11))
    with pytest.raises(SystemExit, match=r"PyYAML-6.0.4-cp312.* built for cp312, this Python is cp311 .*--python-version 3.11"):
        gpu_wheels.check_python(compiled, python=(3, 11))
    with pytest.raises(SystemExit, match="notes.txt is not named like a wheel"):
        gpu_wheels.wheel_project(Path("notes.txt"))


def test_only_the_projects_this_python_lacks_are_installed(tmp_path):
    for name in ("typing_extensions-4.16.0-py3-none-any.whl", "hjson-3.1.0-py3-none-any.whl",
                 "braceexpand-0.1.7-py2.py3-none-any.whl"):
        (tmp_path / name).touch()
    # A compiled wheel for another Python is fine where the project is installed (left alone) ...
    (tmp_path / "numpy-2.4.6-cp39-cp39-manylinux_2_28_x86_64.whl").touch()
    todo, present = gpu_wheels.to_install(tmp_path, installed={"typing-extensions", "numpy"})
    assert [w.name for w in todo] == ["braceexpand-0.1.7-py2.py3-none-any.whl", "hjson-3.1.0-py3-none-any.whl"]
    assert present == ["numpy", "typing-extensions"]
    # ... and refused where it would be installed.
    with pytest.raises(SystemExit, match="numpy-2.4.6-cp39.*built for cp39"):
        gpu_wheels.to_install(tmp_path, installed={"typing-extensions"})
    with pytest.raises(SystemExit, match="no wheels in"):
        gpu_wheels.to_install(tmp_path / "empty", installed=set())


def test_downloads_are_pinned_binary_wheels_for_the_target_python():
    binary = gpu_wheels.pins(["pydantic", "webdataset"])
    assert binary == [f"pydantic=={__import__('pydantic').VERSION}", f"webdataset=={gpu_wheels.md.version('webdataset')}"]
    with pytest.raises(SystemExit, match="not installed in .*: no-such-project"):
        gpu_wheels.pins(["pydantic", "no-such-project"])
    dl, build = gpu_wheels.download_commands("py", Path("w"), "3.12", binary, ["deepspeed==0.19.8"])
    assert dl[:3] == ["py", "-m", "pip"] and dl[3] == "download" and "--only-binary=:all:" in dl
    assert dl[dl.index("--python-version") + 1] == "3.12" and dl[-2:] == binary
    assert [dl[i + 1] for i, a in enumerate(dl) if a == "--platform"] == list(gpu_wheels.PLATFORMS)
    assert build[3] == "wheel" and "--no-build-isolation" in build and build[-1] == "deepspeed==0.19.8"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """A real wheel of a project nothing here has (built offline), beside an empty file named as a
    wheel of PyYAML: pip would fail on it, so installing it at all would show."""
    src = tmp_path_factory.mktemp("src")
    (src / "gpuwheels_probe").mkdir()
    (src / "gpuwheels_probe" / "__init__.py").write_text("VALUE = 42\n")
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
                                        '[project]\nname = "gpuwheels-probe"\nversion = "1.0"\n')
    out = tmp_path_factory.mktemp("whl")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-index", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True)
    (out / "PyYAML-0.0.1-py3-none-any.whl").touch()
    return out


def gpu_sh(**env):
    return subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PY": sys.executable, "MODULES": "yaml gpuwheels_probe", **env})


def test_gpu_sh_installs_what_python_lacks_from_the_wheels_then_goes_on(wheels, tmp_path):
    # No GPU here: getting as far as the GPU check means the imports passed after the install.
    out = gpu_sh(WHEELS=str(wheels))
    assert out.returncode == 2 and "this benchmark needs one CUDA GPU" in out.stderr, out.stderr
    assert "installed 1 wheels" in out.stderr and "already installed, left alone: pyyaml" in out.stderr
    r = subprocess.run([sys.executable, "bench/gpu_wheels.py", "install", str(wheels), str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True)
    probe = subprocess.run([sys.executable, "-c", "import gpuwheels_probe; print(gpuwheels_probe.VALUE)"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": r.stdout.strip()})
    assert probe.stdout.strip() == "42", probe.stderr


def test_gpu_sh_without_the_wheels_names_the_missing_module(tmp_path):
    out = gpu_sh(WHEELS=str(tmp_path / "none"))
    assert out.returncode == 2
    assert "cannot import what the benchmark needs: ModuleNotFoundError: No module named 'gpuwheels_probe'" in out.stderr
    assert "make gpu-wheels" in out.stderr and "needs one CUDA GPU" not in out.stderr
