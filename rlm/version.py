"""The package's version as installed: one place for `rlm --version` and the servers.

Holds only the version lookup; it imports nothing from the rest of the package at module
level, so any module (the CLI, the MCP server) can use it without an import circle.
"""

from __future__ import annotations


def package_version() -> str:
    """The installed package's version (the source tree's when it was never installed)."""
    from importlib import metadata

    try:
        return metadata.version("rlm-sandbox")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from rlm import __version__

        return __version__
