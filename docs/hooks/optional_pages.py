"""MkDocs hook: nav entries for pages that are not written yet are left out.

Some guides land separately from the rest of the site; their nav entries are in
mkdocs.yml from the start and appear once their file exists, so a strict build passes
before and after. Only the nav is filtered: a link to a missing page in a page's text is
still an error. It must not hold anything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The pages allowed to be absent; any other missing nav entry stays an error.
OPTIONAL = frozenset({"guides/tracing.md", "guides/providers.md", "guides/batch-api.md"})


def present_nav(entry: Any, docs: Path) -> Any:
    """The nav entry without its missing optional pages (None if nothing is left)."""
    if isinstance(entry, str):
        return None if entry in OPTIONAL and not (docs / entry).is_file() else entry
    if isinstance(entry, dict):
        kept = {}
        for title, value in entry.items():
            value = present_nav(value, docs)
            if value is not None:
                kept[title] = value
        return kept or None
    if isinstance(entry, list):
        items = [present_nav(item, docs) for item in entry]
        return [item for item in items if item is not None]
    return entry


def on_config(config: Any) -> Any:
    """Drop the nav entries of optional pages whose file is not in the docs directory."""
    if config.get("nav"):
        config["nav"] = present_nav(config["nav"], Path(config["docs_dir"]))
    return config
