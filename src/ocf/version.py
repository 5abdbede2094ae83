"""The package version, from installed metadata (setup.cfg is the single source)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ocf")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

AGENT = f"ocf/{__version__}"
