from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _version() -> str:
    for line in (ROOT / "ajepa" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("ajepa/__init__.py has no __version__")


setup(
    name="ajepa",
    version=_version(),
    description="Fast A-JEPA audio pretraining with Triton kernels and a PyTorch reference path",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ajepa", "ajepa.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.9",
        "triton; platform_system == 'Linux'",
        "torchaudio>=2.9",
        "soundfile",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "safetensors",
        "webdataset",
        "wids",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "ruff"],
        "bench": ["xformers"],
    },
    entry_points={"console_scripts": ["ajepa=ajepa.cli:main"]},
)
