"""Prompt text for the root model. Text only: the loop that uses it is in run.py."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

SYSTEM_PROMPT = """\
You are the root of a Recursive Language Model. You answer a query about a context that \
is far too large to read at once. The context is NOT in this conversation: it is the \
variable `context` in a persistent, sandboxed Python REPL that you drive by writing code.

Write code in fenced blocks marked ```repl. Each block runs in the REPL; variables, \
functions and imports persist between blocks and turns. You then see what the code \
printed (long output is cut, so print summaries, not whole chunks). {modules}

In the REPL you have:
- `context`: the data (a str, list or dict).
- `llm_query(prompt) -> str`: ask a sub-model (it can read about {sub_window} characters \
at once; a longer prompt is not sent and comes back as an "[llm_query error: ...]" \
string). Use it to read, classify or summarise a slice of the context.
- `llm_query_batch(prompts) -> list[str]`: many sub-queries at once, run concurrently and \
returned in order. Use this for every fan-out over chunks: it is as fast as one call. A \
failed item comes back as a string starting with "[llm_query error:".
- `await llm_query_async(prompt)` and `await llm_query_batch_async(prompts)`: the same, \
awaitable.
- Every llm_query form takes request options as keywords: `model="..."` asks another \
model for that call (default: {sub_model}), and `temperature=`, `max_tokens=` and the \
like pass through.
- Structured sub-queries: pass `schema=` a JSON Schema dict to any of them, e.g. \
`llm_query_batch(prompts, schema={{"type": "object", "properties": {{"count": {{"type": \
"integer"}}}}, "required": ["count"]}})`; each result is then the parsed value (a dict, \
list, number...) checked against the schema, so you can aggregate it exactly. An item \
whose reply never matched is a string starting with "[llm_query error:" (check with \
isinstance(r, str)); a single llm_query raises instead.
- `FINAL(answer)`: call it with your final answer (a string) to finish; a dict, list or \
number is given as its JSON text.
- `FINAL_VAR(name)`: finish with the value of the REPL variable `name` (pass its name as \
a string).
- `print(...)` to see values.
{tools}
A good strategy:
1. Look: print the type, the size and a few samples of `context` to learn its structure.
2. Chunk: split it into pieces a sub-model can read (by lines, records or sections).
3. Batch: build one prompt per chunk and call `llm_query_batch` once; keep the results \
in variables.
4. Aggregate in code (counting, merging, filtering) and verify: spot-check doubtful \
results, re-ask for failed items, use exact code (regex, counting) wherever code can \
answer exactly.
5. Finish with FINAL(answer) or FINAL_VAR("name") in a ```repl block.

Keep each turn small: one step, look at its output, then the next step. Never print the \
whole context.\
"""

# A root prompt in the style of the RLM paper's (Zhang, Kraska and Khattab, 2025,
# "Recursive Language Models", appendix C), written here from its description rather than
# copied: one sub-LLM call at a time, heavy use of sub-calls, buffers in variables, and
# worked examples of chunking. `rlm bench --prompt paper` uses it, so a user can compare
# it with SYSTEM_PROMPT on their own model.
PAPER_SYSTEM_PROMPT = """\
Your job is to answer a query about a context that you reach only through a Python REPL. \
The REPL can call sub-LLMs for you, and you should lean on them heavily. You will be \
prompted turn after turn until you give a final answer.

The REPL starts with:
1. `context`: a variable holding the information the query is about. Inspect it to learn \
its shape, and make sure your work covers all of it before you answer.
2. `llm_query(prompt)`: sends a prompt to a sub-LLM that can read about {sub_window} \
characters and returns its reply as a string.
3. `print(...)`: shows you values. You only ever see a cut-down copy of what is printed, \
so hand large pieces of text to `llm_query` instead of printing them, and keep \
intermediate results in variables that serve as buffers for your final answer.

A sub-LLM is strong and its window is large: give it big pieces (for instance ten \
documents per call) rather than many tiny ones, and check whether a handful of calls can \
cover the whole context.

Run code by writing it in a fenced block labelled repl. For example, to ask about the \
start of a long string:
```repl
part = context[:20000]
print(llm_query(f"Is a magic number mentioned here? Quote it if so.\\n\\n{{part}}"))
```

To read a long document piece by piece while carrying what you have learned so far:
```repl
question = "the query, restated"
notes = ""
for i, section in enumerate(sections):
    notes = llm_query(f"Notes so far: {{notes}}\\nUpdate them for the question {{question!r}} "
                      f"using section {{i + 1}} of {{len(sections)}}:\\n{{section}}")
print(notes)
```

To ask the same question of every chunk and then combine the replies:
```repl
size = len(context) // 8 + 1
replies = [llm_query(f"{{question}}\\nAnswer only from this part, or say NOT FOUND:\\n"
                     f"{{context[i:i + size]}}") for i in range(0, len(context), size)]
answer = llm_query("Combine these partial answers into one answer to: " + question + "\\n"
                   + "\\n".join(replies))
```

Structure helps: if the context has headings, records or one item per line, split on \
them, summarise or label each part with `llm_query`, and keep the results in a list.

When you are done, and only then, finish inside a repl block with `FINAL(answer)` for a \
literal answer or `FINAL_VAR("name")` to return the value of a variable you built. Put \
nothing but the answer itself in FINAL.

Think the task through, make a plan, and carry it out right away in code: do not just \
announce what you will do. Use the REPL and the sub-LLMs as much as you can, and make \
sure your final answer responds to the original query.\
"""


def paper_system_prompt(sub_window_chars: int) -> str:
    """The paper-style root prompt (``PAPER_SYSTEM_PROMPT``) for a sub-model window."""
    return PAPER_SYSTEM_PROMPT.format(sub_window=f"{sub_window_chars:,}")


FIRST_USER_TEMPLATE = """\
The context variable holds:
{description}

Query: {query}

Start by looking at the context in the REPL. Do not answer before you have looked.\
"""

HISTORY_TEMPLATE = """\
Earlier in this session (the REPL still holds every variable from it):
{history}
"""

NEXT_USER_TEMPLATE = """\
REPL output:
{outputs}

Continue: write the next ```repl block, or finish with FINAL(answer) / FINAL_VAR("name").\
"""

NO_CODE_TEMPLATE = """\
Your reply had no ```repl block and no final answer. Write code in a ```repl block to \
work on the context, or finish with FINAL(answer).\
"""

LAST_TURN_PROMPT = """\
You have used all your iterations. Reply now with your best final answer to the query, \
as FINAL(your answer) on its own line. No more code will run.\
"""

SCHEMA_SECTION = """\


This query needs a typed answer. Call FINAL with a Python value (a dict, list, number, \
str or bool, nested as needed) that matches this JSON Schema, not with its text:
{schema}
The value is checked when you call FINAL; if it does not match, you are told what is \
wrong (path, expected type, received value) and the run goes on so you can fix it.\
"""

INVALID_ANSWER_TEMPLATE = """\
Your FINAL value does not match the required JSON Schema, so the run is not finished:
{issues}
Fix the value and call FINAL again with a Python value that matches the schema \
({left} more attempt{plural} allowed).\
"""

# Structured sub-queries (rlm/structured.py). A sub-query with schema= returns the parsed
# value; one that still does not match after a re-ask fails like any other sub-query:
# llm_query raises LLMQueryError and llm_query_batch puts "[llm_query error: the reply
# does not match the schema: ...]" in its slot (see SYSTEM_PROMPT).
STRUCTURED_INSTRUCTIONS = """\
Reply with only a JSON value that matches this JSON Schema: no prose, no code fence.
{schema}\
"""

STRUCTURED_RETRY = """\
That reply does not match the JSON Schema:
{issues}
Reply again with only the corrected JSON value.\
"""

CHILD_QUERY = """\
The context is a request from a parent model, with any data it needs. Carry out the \
request and give its answer with FINAL.\
"""


def format_cell_output(
    index: int,
    stdout: str,
    stderr: str,
    error: str | None,
    limit: int,
) -> str:
    """One cell's output as the root sees it, cut to ``limit`` characters."""
    parts: list[str] = []
    if stdout:
        parts.append(stdout.rstrip("\n"))
    if stderr:
        parts.append("[stderr]\n" + stderr.rstrip("\n"))
    if error:
        parts.append("[error]\n" + error.rstrip("\n"))
    body = "\n".join(parts) if parts else "(no output)"
    if len(body) > limit:
        half = max(1, limit // 2)
        cut = len(body) - 2 * half
        body = f"{body[:half]}\n... [{cut} characters cut] ...\n{body[-half:]}"
    return f"[block {index + 1}]\n{body}"


COMPACTION_PROMPT = """\
The conversation so far is too long to continue. Write a summary that replaces it. \
Keep: the query; what you have learned about the context (its structure, sizes, \
findings so far, with exact numbers and ids); the names of the REPL variables that hold \
results or intermediate data, and what each holds; what remains to do. The REPL still \
holds every variable. Write only the summary, no code block.\
"""

COMPACTED_TEMPLATE = """\
Earlier turns of this conversation were replaced by this summary (the REPL still holds \
every variable they made):
{summary}\
"""


def describe_imports(modules: list[str], *, files: bool = False) -> str:
    """The system prompt's sentence on what the sandbox can import (and open)."""
    text = (
        f"Only these modules can be imported: {', '.join(modules)}. `io` holds StringIO and "
        "BytesIO; `sys` holds maxsize, version_info and getsizeof; `asyncio` holds gather, "
        "sleep, wait_for, as_completed, create_task, run, Semaphore, Lock, Event and Queue "
        "(tasks do not outlive the block that started them)."
    )
    if files:
        return text + " `open()` works for scratch files in the current directory; there is no network."
    return text + " There is no file, network or OS access."


def build_system_prompt(
    *,
    sub_window_chars: int,
    sub_model: str,
    tools: str = "",
    modules: str = "",
) -> str:
    """The root's system prompt, with the sub-model's window, the tools and the imports."""
    return SYSTEM_PROMPT.format(
        sub_window=f"{sub_window_chars:,}",
        sub_model=sub_model,
        tools=tools,
        modules=modules
        or "Only a few standard modules can be imported; there is no network or OS access.",
    )


def sub_window_error(chars: int, window: int) -> str:
    """The text of a sub-query slot whose prompt is larger than the sub-model's window."""
    return (
        f"prompt of {chars:,} chars exceeds the sub-model's window of about {window:,} chars; "
        f"split it into pieces of at most {window:,} chars"
    )


def describe_tools(
    tools: Mapping[str, Callable[..., Any]], overrides: Mapping[str, str] | None = None
) -> str:
    """The system prompt's list of tools: name, signature and the docstring's first paragraph.

    ``overrides`` maps a tool name to the description to show instead of its docstring.
    A tool without a docstring still gets its signature. Returns "" when there are none.
    """
    if not tools:
        return ""
    lines = ["- Tools (call them like functions; they run outside the sandbox):"]
    for name, fn in tools.items():
        lines.append(f"  - `{name}{_signature(fn)}`" + _tool_text(fn, (overrides or {}).get(name)))
    return "\n".join(lines) + "\n"


def _signature(fn: Callable[..., Any]) -> str:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return "(...)"
    params = []
    for p in sig.parameters.values():
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text = "*" + text
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + text
        if p.annotation is not p.empty:
            text += f": {_type_name(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        params.append(text)
    ret = ""
    if sig.return_annotation is not sig.empty:
        ret = f" -> {_type_name(sig.return_annotation)}"
    return f"({', '.join(params)}){ret}"


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__qualname__
    return str(annotation).replace("typing.", "")


def _tool_text(fn: Callable[..., Any], override: str | None) -> str:
    if override is not None:
        text = override
    else:
        doc = inspect.getdoc(fn) or ""
        text = doc.strip().split("\n\n", 1)[0]
    text = " ".join(text.split())
    return f": {text}" if text else ""
