"""Installs modalimmune_jax, its data pipelines and experiment binaries."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent
_REQUIREMENTS = [
    line.strip()
    for line in (_HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setuptools.setup(
    name="modalimmune_jax",
    version="0.1.0",
    description="ModalImmune: training multimodal models that are immune to losing a modality (JAX/Flax).",
    long_description=(_HERE / "README.md").read_text() if (_HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["modalimmune_jax*", "data_pipelines*", "experiments*"]),
    install_requires=_REQUIREMENTS,
)
