"""Package layout of the ecif distribution (everything else is in pyproject.toml).

Three import packages come from this repository:

* ``ecif`` (``ecif/``): the library and the ``ecif`` command, with its architecture configs;
* ``ecif_app`` (``app/``, its pages ``ecif_app.views`` in ``app/views/``): the Streamlit app, which
  stays at the top of the repository and is shipped in the wheel under this name; ``ecif app``
  finds ``ecif_app/main.py`` by import (``ecif.jobs.launch.app_script``);
* ``ecif._assets`` (``assets/``): data files shipped with the wheel (the demo model's
  ``models/*.safetensors`` and ``models/*.json``), found by ``ecif.paths.asset_path`` both in a
  checkout and in an installed wheel.

This lives in ``setup.py`` rather than in ``[tool.setuptools]`` because pyproject.toml cannot
combine package discovery (new ``ecif`` sub-packages are picked up without editing anything) with
packages mapped from other folders.  ``pip install .`` and ``pip install -e .`` both use it.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ecif", "ecif.*"]) + ["ecif_app", "ecif_app.views", "ecif._assets", "ecif._assets.models"],
    package_dir={"ecif_app": "app", "ecif._assets": "assets"},
    package_data={
        "ecif": ["models/configs/*.json"],
        # Only what the code loads (assets/review.png is the README's screenshot).
        "ecif._assets.models": ["*.safetensors", "*.json"],
    },
)
