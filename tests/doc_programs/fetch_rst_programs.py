"""Turns Ray's core documentation pages into programs: each page's testcode blocks, in order.

Ray tests the code of its documentation pages with pytest and the pytest-sphinx plugin
(Bazel's `doctest` rule over `doc/source/ray-core/**/*.md` and `*.rst`): all the
`testcode` blocks of one page run in one namespace, one after the other, and each block's
standard output is compared, as doctest compares it, with the `testoutput` block right
after it. This module writes that program for a page, so that test_rst_programs.py can run
it unmodified on hpcray:

- `rst_<page>.py`: one header line naming the page, its commit and the licence, then each
  block as the page gives it, preceded by a line that prints a marker naming the block (the
  test cuts the output there). A block whose testoutput is a traceback runs through
  `exec` in the same namespace and prints the exception's last line, which doctest
  compares with the expected one.
- `rst_<page>.json`: what each block must print (`want`; None where the page gives no
  testoutput: not compared), the exception expected (`exc_msg`) and the doctest option
  flags the testoutput sets. (pytest-sphinx would require a block without testoutput to
  print nothing; its parser sees rst directives only, not MyST fences, so Ray's own runs
  of the .md pages are not that strict either. Worker lines alone would break that rule.)

What is honoured, as pytest-sphinx does: `:skipif: EXPR` (the block is left out when EXPR
is true; a skipped testoutput is no expectation), `:hide:` (hidden from the rendered page,
still run and checked), `:options:` (doctest flags; pytest's default ELLIPSIS is on),
Ray's own `+MOCK` flag (registered by Ray's docs: the output is illustrative, never
compared), rst `.. testcode::` directives and MyST ```{testcode} fences (also rst inside
```{eval-rst}). `testsetup`/`testcleanup` blocks join the program as Sphinx runs them (setup
first, cleanup last); Sphinx's groups are ignored: pytest-sphinx runs one namespace a page.
A page with no testcode block at all (Ray's library pages, such as
ray-more-libs/multiprocessing.md) is run by its plain Python code blocks (```python fences,
`.. code-block:: python`), in order, none compared: Ray's doctest does not run those.
A notebook (Ray's examples, `*.ipynb`) is run by its code cells, in order, as a kernel
runs them (each block's "line" is its cell's number; `!` shell lines and `%` magics become
comments). Ray runs its notebooks without comparing what they print; what each cell
printed when it was saved is kept (`recorded`), for the test to compare where it must
hold (test_rst_programs.py, RECORDED_OUTPUT_HOLDS).

Ray's text is not kept in this repository: the output goes to the ignored `ray/` folder.

    fetch_rst_programs.py RAY_CHECKOUT [DEST]
        every page of rst_pages.tsv, read with `git show COMMIT:PATH` and checked
        against its SHA-256
    fetch_rst_programs.py --text PAGE_PATH COMMIT TEXT_FILE [DEST]
        one page from a saved copy of its text; prints its rst_pages.tsv row
"""

from __future__ import annotations

import doctest
import hashlib
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = "doc/source/ray-core/"
MARKER = "### hpcray-doc-block {index} (line {line}) ###"
MARKER_RE = re.compile(r"^### hpcray-doc-block (\d+) \(line (\d+)\) ###$", re.M)
RAISED = "### hpcray-doc-raised ###"
MOCK = doctest.register_optionflag("MOCK")

_RST_DIRECTIVE = re.compile(
    r"^(?P<indent>\s*)\.\.\s+(?P<kind>testcode|testoutput|testsetup|testcleanup)::\s*"
    r"(?P<argument>[^\n'\"]*)$")
_MYST_FENCE = re.compile(
    r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\{(?P<kind>[\w-]+)\}\s*(?P<argument>.*)$")
_PYTHON_FENCE = re.compile(r"^\s*(?P<fence>`{3,}|~{3,})(?:python|py)\s*$")
_RST_PYTHON_CODE = re.compile(r"^(?P<indent>\s*)\.\.\s+code-block::\s*python\s*$")
_OPTION = re.compile(r"^:(?P<name>[\w-]+):\s*(?P<value>.*)$")


@dataclass
class Block:
    kind: str  # testcode, testoutput, testsetup, testcleanup
    line: int  # 1-based line of the directive in the page
    body: str
    skipif: str | None = None
    flags: dict = field(default_factory=dict)  # doctest flag -> on/off
    recorded: str | None = None  # a notebook cell's saved stdout


def _split_options(lines: list[str]) -> tuple[list[str], dict]:
    """A directive's leading `:name: value` lines (or MyST's `---` YAML front) and the rest."""
    options = {}
    i = 0
    if lines and lines[0].strip() == "---":
        end = next((j for j in range(1, len(lines)) if lines[j].strip() == "---"), None)
        if end is not None:
            for text in lines[1:end]:
                name, _, value = text.partition(":")
                options[name.strip()] = value.strip()
            i = end + 1
    while i < len(lines):
        match = _OPTION.match(lines[i].strip())
        if not match:
            break
        options[match["name"]] = match["value"]
        i += 1
    return lines[i:], options


def _block(kind: str, line: int, content: list[str]) -> Block:
    body_lines, options = _split_options(content)
    body = textwrap.dedent("\n".join(body_lines)).strip("\n")
    block = Block(kind, line, body + "\n" if body else "", options.get("skipif") or None)
    for option in options.get("options", "").replace(",", " ").split():
        name = option[1:]
        if option[0] not in "+-" or name not in doctest.OPTIONFLAGS_BY_NAME:
            raise ValueError(f"line {line}: unknown doctest option {option!r}")
        block.flags[doctest.OPTIONFLAGS_BY_NAME[name]] = option[0] == "+"
    return block


def _rst_blocks(lines: list[str], first_line: int) -> list[Block]:
    blocks = []
    i = 0
    while i < len(lines):
        match = _RST_DIRECTIVE.match(lines[i])
        if not match:
            i += 1
            continue
        indent = len(match["indent"])
        j = i + 1
        while j < len(lines) and (not lines[j].strip()
                                  or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        blocks.append(_block(match["kind"], first_line + i, lines[i + 1:j]))
        i = j
    return blocks


def _myst_blocks(lines: list[str]) -> list[Block]:
    blocks = []
    i = 0
    while i < len(lines):
        match = _MYST_FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence = match["fence"]
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and not lines[j].strip().strip(fence[0])):
            j += 1
        content = lines[i + 1:j]
        if match["kind"] in ("testcode", "testoutput", "testsetup", "testcleanup"):
            blocks.append(_block(match["kind"], i + 1, content))
        elif match["kind"] == "eval-rst":
            blocks.extend(_rst_blocks(content, i + 2))
        i = j + 1
    return blocks


def _python_code_blocks(lines: list[str], markdown: bool) -> list[Block]:
    """A page's plain Python code blocks (```python fences, `.. code-block:: python`), as
    testcode blocks without an expected output."""
    blocks = []
    i = 0
    while i < len(lines):
        match = (_PYTHON_FENCE if markdown else _RST_PYTHON_CODE).match(lines[i])
        if not match:
            i += 1
            continue
        j = i + 1
        if markdown:
            while j < len(lines) and lines[j].strip() != match["fence"]:
                j += 1
        else:
            indent = len(match["indent"])
            while j < len(lines) and (not lines[j].strip()
                                      or len(lines[j]) - len(lines[j].lstrip()) > indent):
                j += 1
        blocks.append(_block("testcode", i + 1, lines[i + 1:j]))
        i = j + 1 if markdown else j
    return blocks


def _notebook_blocks(text: str) -> list[Block]:
    """A notebook's code cells, as testcode blocks numbered by cell, each with what it
    printed on stdout when the notebook was saved (`recorded`)."""
    blocks = []
    for number, cell in enumerate(json.loads(text)["cells"], 1):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        lines = [("# " + line if line.lstrip().startswith(("!", "%")) else line)
                 for line in source.splitlines()]
        block = Block("testcode", number, "\n".join(lines) + "\n")
        block.recorded = "".join("".join(output.get("text", ()))
                                 for output in cell.get("outputs", ())
                                 if output.get("output_type") == "stream"
                                 and output.get("name") == "stdout")
        blocks.append(block)
    return blocks


def page_blocks(text: str, path: str) -> list[Block]:
    """The test directives of a page, in order (MyST fences for .md, directives for .rst);
    for a page that has none, its Python code blocks (run, output not compared); for a
    notebook, its code cells."""
    if path.endswith(".ipynb"):
        return _notebook_blocks(text)
    lines = text.splitlines()
    markdown = path.endswith(".md")
    blocks = _myst_blocks(lines) if markdown else _rst_blocks(lines, 1)
    if not any(block.kind == "testcode" for block in blocks):
        blocks = _python_code_blocks(lines, markdown)
    return blocks


def _skipped(block: Block) -> bool:
    # pytest-sphinx evaluates the expression in an empty namespace.
    return bool(block.skipif) and bool(eval(block.skipif, {}))  # noqa: S307


def program_name(path: str) -> str:
    """rst_<page> for a core page (its path under doc/source/ray-core/), rst_<folder>__<page>
    for a page of another part of Ray's documentation."""
    for prefix in (PREFIX, "doc/source/"):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    page = path
    return "rst_" + page.rsplit(".", 1)[0].replace("/", "__")


def page_program(text: str, path: str, commit: str) -> tuple[str, dict]:
    """The program of one page (its source text) and what each of its blocks must print."""
    blocks = page_blocks(text, path)
    setup = [b for b in blocks if b.kind == "testsetup" and not _skipped(b)]
    cleanup = [b for b in blocks if b.kind == "testcleanup" and not _skipped(b)]
    runs: list[tuple[Block, dict | None]] = [(b, None) for b in setup]
    for k, block in enumerate(blocks):
        if block.kind != "testcode":
            continue
        outputs = []
        for later in blocks[k + 1:]:
            if later.kind != "testoutput":
                break
            if not _skipped(later):
                outputs.append(later)
        if len(outputs) > 1:
            raise ValueError(f"{path} line {block.line}: several testoutput blocks")
        if _skipped(block):
            continue
        want = outputs[0].body if outputs else None
        flags = dict(outputs[0].flags) if outputs else {}
        exc = doctest.DocTestParser._EXCEPTION_RE.match(want or "")
        runs.append((block, {"want": want, "exc_msg": exc["msg"] if exc else None,
                             "flags": {doctest_flag_name(f): on for f, on in flags.items()},
                             "output_line": outputs[0].line if outputs else None,
                             "recorded": block.recorded}))
    runs += [(b, None) for b in cleanup]

    what = "code cells" if path.endswith(".ipynb") else "testcode blocks"
    parts = [f"# Source: ray-project/ray {path} at {commit}; Apache License 2.0. Its "
             f"{what} in order (tests/doc_programs/fetch_rst_programs.py).\n"]
    checks = []
    for index, (block, check) in enumerate(runs, 1):
        parts.append(f"\nprint({MARKER.format(index=index, line=block.line)!r}, flush=True)\n")
        if check and check["exc_msg"] is not None:
            where = f"<{path} line {block.line}>"
            parts.append(
                f"try:\n    exec(compile({block.body!r}, {where!r}, 'exec'))\n"
                "except Exception as _hpcray_doc_exc:\n"
                "    import traceback as _hpcray_doc_tb\n"
                f"    print({RAISED!r})\n"
                "    print(_hpcray_doc_tb.format_exception_only(type(_hpcray_doc_exc), "
                "_hpcray_doc_exc)[-1], end='', flush=True)\n")
        else:
            parts.append(block.body)
        if check is not None:
            checks.append({"block": index, "line": block.line, **check})
    expected = {"page": path, "commit": commit, "blocks": checks}
    return "".join(parts), expected


def doctest_flag_name(flag: int) -> str:
    return next(name for name, value in doctest.OPTIONFLAGS_BY_NAME.items() if value == flag)


def write_page(text: str, path: str, commit: str, dest: Path) -> Path:
    program, expected = page_program(text, path, commit)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / (program_name(path) + ".py")
    target.write_text(program)
    target.with_suffix(".json").write_text(json.dumps(expected, indent=1) + "\n")
    return target


def manifest() -> list[tuple[str, str, str]]:
    rows = []
    for line in (HERE / "rst_pages.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            path, commit, sha = line.split("\t")
            rows.append((path, commit, sha))
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] == ["--text"]:
        path, commit, text_file = argv[1:4]
        dest = Path(argv[4]) if len(argv) > 4 else HERE / "ray"
        data = Path(text_file).read_bytes()
        written = write_page(data.decode(), path, commit, dest)
        print(f"{path}\t{commit}\t{hashlib.sha256(data).hexdigest()}")
        print(f"wrote {written}", file=sys.stderr)
        return 0
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    checkout = argv[0]
    dest = Path(argv[1]) if len(argv) > 1 else HERE / "ray"
    for path, commit, sha in manifest():
        data = subprocess.run(["git", "-C", checkout, "show", f"{commit}:{path}"],
                              check=True, capture_output=True).stdout
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            print(f"{path} at {commit} has SHA-256 {got}, expected {sha}", file=sys.stderr)
            return 1
        write_page(data.decode(), path, commit, dest)
    print(f"wrote {len(manifest())} page programs to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
