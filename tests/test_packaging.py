"""Install metadata: tested ranges in pyproject.toml, exact pins in constraints.txt (README, CI)."""
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(line).name: Requirement(line) for line in project["dependencies"]}


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
    pins, requirements = _pins(), _requirements()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    for name, version in pins.items():
        assert requirements[name].specifier.contains(version), name


def test_readme_and_ci_install_with_the_constraints():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "-c constraints.txt" in ci
    assert readme.count("-c constraints.txt") >= 2
