"""HTML building blocks with inline styles: notebook viewers on code hosts strip
<style> blocks and scripts, so nothing here relies on either."""

from __future__ import annotations

import html
from typing import Any

from rlm.display.formatting import as_text, head_tail

# HTML keeps much more than the terminal (it is collapsed) but still bounds a notebook's size.
HTML_MAX_CHARS = 50_000


MONO = "ui-monospace,SFMono-Regular,Menlo,Consolas,'DejaVu Sans Mono',monospace"
# Inline styles only: notebook viewers on code hosts strip <style> blocks and scripts,
# and a fixed light palette stays readable under a dark notebook theme.
STYLE = {
    "root": "font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;font-size:14px;"
    "line-height:1.45;color:#1f2328;background:#ffffff;max-width:1000px;padding:8px 12px;"
    "border:1px solid #d0d7de;border-radius:6px;margin:6px 0",
    "title": "font-size:16px;font-weight:600;margin:2px 0 6px 0",
    "query": "margin:4px 0 8px 0",
    "answer": "border:2px solid #1a7f37;background:#f0fff4;border-radius:6px;padding:6px 10px;margin:6px 0",
    "limit": "border:2px solid #bf8700;background:#fff8c5;border-radius:6px;padding:6px 10px;margin:6px 0",
    "noanswer": "border:2px solid #cf222e;background:#fff5f5;border-radius:6px;padding:6px 10px;margin:6px 0",
    "label": "font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#57606a",
    "pre": f"white-space:pre-wrap;word-break:break-word;font-family:{MONO};font-size:12.5px;"
    "margin:4px 0;padding:6px 8px;background:#f6f8fa;color:#1f2328;border-radius:4px",
    "answer_pre": f"white-space:pre-wrap;word-break:break-word;font-family:{MONO};font-size:13px;"
    "margin:4px 0;color:#1f2328",
    "stderr": f"white-space:pre-wrap;word-break:break-word;font-family:{MONO};font-size:12.5px;"
    "margin:4px 0;padding:6px 8px;background:#fff8c5;color:#7d4e00;border-radius:4px",
    "error": f"white-space:pre-wrap;word-break:break-word;font-family:{MONO};font-size:12.5px;"
    "margin:4px 0;padding:6px 8px;background:#ffebe9;color:#cf222e;border-radius:4px",
    "final": f"white-space:pre-wrap;word-break:break-word;font-family:{MONO};font-size:12.5px;"
    "margin:4px 0;padding:6px 8px;background:#dafbe1;color:#116329;border-radius:4px",
    "omitted": "color:#57606a;font-style:italic",
    "table": "border-collapse:collapse;margin:6px 0;font-size:13px",
    "th": "text-align:left;padding:2px 14px 2px 0;color:#57606a;font-weight:600;white-space:nowrap;"
    "vertical-align:top",
    "td": f"padding:2px 0;font-family:{MONO};font-size:12.5px;word-break:break-word",
    "details": "margin:4px 0;border-left:3px solid #d0d7de;padding-left:8px",
    "iteration": "margin:6px 0;border:1px solid #d0d7de;border-radius:6px;padding:4px 8px",
    "summary": "cursor:pointer;font-weight:600",
    "subsummary": "cursor:pointer;color:#57606a;font-size:13px",
    "prose": "white-space:pre-wrap;word-break:break-word;margin:4px 0 8px 0",
    "cell_head": "font-size:12px;color:#57606a;margin:8px 0 2px 0",
    "note_warn": "color:#9a6700;margin:4px 0",
    "note_err": "color:#cf222e;margin:4px 0",
    "child": "margin:6px 0 6px 12px;border-left:3px solid #8250df;padding-left:8px",
    "code_div": "background:#f6f8fa;border-radius:4px;margin:2px 0",
    "code_pre": f"white-space:pre-wrap;word-break:break-word;font-family:{MONO};font-size:12.5px;"
    "margin:0;padding:6px 8px;line-height:1.35",
}


def esc(value: Any) -> str:
    return html.escape(as_text(value), quote=True)


def pre_html(text: str, style: str, limit: int = HTML_MAX_CHARS) -> str:
    head, omitted, tail = head_tail(text, 10**9, limit)
    body = esc(head)
    if omitted:
        body += f'<span style="{STYLE["omitted"]}">{esc(omitted)}</span>{esc(tail)}'
    return f'<pre style="{STYLE[style]}">{body}</pre>'


def code_html(code: str) -> str:
    """Python highlighted by pygments with inline styles (no stylesheet to ship)."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    formatter = HtmlFormatter(noclasses=True, nobackground=True, style="default",
                              cssstyles=STYLE["code_div"], prestyles=STYLE["code_pre"])
    return highlight(code, PythonLexer(), formatter)


def table_html(rows: list[tuple[str, str]]) -> str:
    cells = "".join(
        f'<tr><th style="{STYLE["th"]}">{esc(label)}</th><td style="{STYLE["td"]}">{esc(value)}</td></tr>'
        for label, value in rows
    )
    return f'<table style="{STYLE["table"]}">{cells}</table>'


def details_html(summary: str, body: str, *, style: str = "details", summary_style: str = "subsummary",
                 open_: bool = False, css_class: str | None = None) -> str:
    """A collapsible part; ``summary`` is already HTML (escaped by the caller).
    ``css_class`` only names it for the page's script: styles stay inline."""
    attr = (" open" if open_ else "") + (f' class="{esc(css_class)}"' if css_class else "")
    return (f'<details{attr} style="{STYLE[style]}"><summary style="{STYLE[summary_style]}">{summary}</summary>'
            f"{body}</details>")


