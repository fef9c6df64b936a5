"""Install metadata: tested ranges in pyproject.toml, exact pins in constraints.txt (README, CI)."""
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _requirements(extras: bool = False) -> dict[str, Requirement]:
    """Core dependencies (with `extras`: and those of every extra, but effitune's own)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    if extras:
        lines += [line for group in project["optional-dependencies"].values() for line in group]
    return {Requirement(line).name: Requirement(line) for line in lines if Requirement(line).name != "effitune"}


def _pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    return {Requirement(line).name: str(next(iter(Requirement(line).specifier)).version) for line in lines if line}


def test_a_gpu_environment_keeps_its_torch():
    requirements = _requirements()
    # the GPU benchmark's versions (torch 2.11.0+cu130) and this machine's pins are both admitted
    assert requirements["torch"].specifier.contains("2.11.0")
    assert requirements["torch"].specifier.contains("2.14.1")
    assert requirements["torchvision"].specifier.contains("0.26.0")
    assert not any(str(spec).startswith("==") for req in requirements.values() for spec in req.specifier)


def test_constraints_pin_what_the_ranges_admit():
    pins, requirements = _pins(), _requirements(extras=True)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    for name, version in pins.items():
        assert requirements[name].specifier.contains(version), name


def test_readme_and_ci_install_with_the_constraints():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "-c constraints.txt" in ci
    assert readme.count("-c constraints.txt") >= 2


def test_the_test_command_installs_the_tflite_extra_and_then_a_typing_extensions_jupyter_can_use():
    """litert-converter pins xdsl==0.28.0, which caps typing-extensions below 4.13; jupyter-client (the
    notebook test) needs 4.13 or newer. One resolve of both backtracks for over ten minutes, so the
    extra is installed second and typing-extensions lifted again third (measured: the converter
    works with 4.16)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "tflite" not in project["optional-dependencies"]["all"][0]
    for text in ((ROOT / ".ci" / "run").read_text(), (ROOT / "README.md").read_text()):
        line = next(line for line in text.splitlines() if "pytest" in line and "pip install" in line)
        steps = [step.strip() for step in line.split("&&")]
        all_step = next(i for i, step in enumerate(steps) if '".[all]"' in step)
        tflite_step = next(i for i, step in enumerate(steps) if '".[tflite]"' in step)
        lift_step = next(i for i, step in enumerate(steps) if "typing-extensions>=4.13" in step)
        assert all_step < tflite_step < lift_step < next(i for i, step in enumerate(steps) if "pytest" in step)
