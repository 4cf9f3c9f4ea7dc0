"""Package ``hstu``: the folders trainer/ modules/ ops/ launch/ install as hstu.trainer, hstu.modules, ... ."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDERS = ["trainer", "modules", "ops", "launch", "serving"]


def _packages():
    pkgs, dirs = ["hstu"], {"hstu": "hstu"}
    for folder in FOLDERS:
        if not os.path.isdir(os.path.join(HERE, folder)):
            continue
        for sub in [""] + find_packages(folder):
            name = "hstu." + folder + ("." + sub if sub else "")
            pkgs.append(name)
            dirs[name] = os.path.join(folder, *sub.split(".")) if sub else folder
    return pkgs, dirs


def _requirements():
    # The stack is pinned in requirements/cpu.txt (the one place); torchrec comes from requirements/nodeps.txt.
    with open(os.path.join(HERE, "requirements", "cpu.txt")) as f:
        return [l.strip() for l in f if l.strip() and not l.startswith("#") and not l.startswith("pytest")]


packages, package_dir = _packages()
setup(
    name="hstu-trainer",
    version="0.1.0",
    description="HSTU generative recommender trainer (retrieval + ranking) on TorchRec / fbgemm / Triton",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    install_requires=_requirements(),
    entry_points={"console_scripts": ["hstu=hstu.trainer.cli:main"]},
)
