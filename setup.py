"""Only the package layout lives here (everything else is in pyproject.toml).

The folders the design names keep their place in the repository (service/, bridge/), but install under the
one namespace, `genrpc.service` and `genrpc.bridge`: nothing generic such as `service` lands in site-packages.
"""

from setuptools import find_packages, setup

# repository folder -> the package it installs as
NAMESPACED_FOLDERS = {"service": "genrpc.service", "bridge": "genrpc.bridge"}


def _packages() -> list[str]:
    packages = find_packages(include=["genrpc", "genrpc.*"])
    for folder, package in NAMESPACED_FOLDERS.items():
        packages += [package + name[len(folder):] for name in find_packages(include=[folder, folder + ".*"])]
    return packages


setup(packages=_packages(), package_dir={package: folder for folder, package in NAMESPACED_FOLDERS.items()},
      package_data={"genrpc.bridge": ["static/*"]})  # the playground page (bridge/playground.py)
