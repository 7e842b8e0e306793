"""Griffe extension: Sphinx cross-reference roles in docstrings read as inline code.

Some docstrings name other objects the reST way (``:func:`spawn_fake_server```,
``:class:`Fault```, ``:meth:`FakeLLMServer.inject```), which Markdown would show with
the role in front. This extension rewrites each such role to plain inline code when the
API reference loads the docstrings; the docstrings themselves stay as ``help()`` shows
them. It must not change anything else in a docstring.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const):`~?([^`]+)`")


def plain_roles(text: str) -> str:
    """``text`` with every Sphinx role replaced by its target as inline code."""
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", text)


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx roles in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the roles of one object's docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(obj.docstring.value)
