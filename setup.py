"""Packaging beside pyproject.toml: the Hydra config tree ``conf/`` ships inside the package as ``mole.conf``.

The tree stays at the repository root (where a researcher reads and edits it); a wheel maps it to
``mole/conf/`` so that an installed mole finds its configs from any working directory.
"""

from setuptools import find_namespace_packages, setup

CONF_PACKAGES = ["mole.conf", *(f"mole.conf.{name}" for name in find_namespace_packages("conf"))]

setup(
    packages=[*find_namespace_packages(include=["mole", "mole.*"]), *CONF_PACKAGES],
    package_dir={"mole.conf": "conf"},
    package_data={
        "mole": ["data/fixtures/*", "eval/tasks/*.yaml", "eval/tasks/_*_yaml", "eval/tasks/benchmarks/_*_yaml"],
        **{name: ["*.yaml"] for name in CONF_PACKAGES},
    },
)
