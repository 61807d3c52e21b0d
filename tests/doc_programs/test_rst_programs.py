"""The code of Ray's core documentation pages, run unmodified with `import ray` answered by
hpcray.

Ray tests each page of `doc/source/ray-core/` as one program: its testcode blocks in order,
in one namespace, each block's output compared with its testoutput as doctest does
(pytest-sphinx; fetch_rst_programs.py says what is honoured). rst_pages.tsv lists the pages
collected; fetch_rst_programs.py writes each one's program (`rst_<page>.py`) and what its
blocks print (`rst_<page>.json`) into ray/, or HPCRAY_RAY_DOC_PAGES names the folder.
Where they are absent every test here skips, saying so.

Each page program runs as test_doc_programs.py runs Ray's doc_code programs, with its
runner: on one node and as a 3-rank job. Ray's example notebooks (`examples/*.ipynb`) run
the same way, by their code cells. It passes when it exits 0, prints no Python
traceback, each block with a testoutput prints what it says (worker lines, `(name pid=N)
...`, are left out of a block's output unless the expectation shows them: they arrive
when the node reads them, and in Ray's own runs too), and no shared-memory segment is left.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import sys
from pathlib import Path

import pytest

from tests.doc_programs import fetch_rst_programs as pages
from tests.doc_programs.test_doc_programs import (ONE, PROGRAMS, RANKS3, RUN_TIMEOUT,
                                                  argv_for, run)
from tests.multinode.test_multinode import segment_leaks

PAGES = Path(os.environ.get("HPCRAY_RAY_DOC_PAGES", PROGRAMS))

# Pages that fail today because hpcray lacks something Ray has: (page program, variant or
# None for both) -> the gap. strict: a fix turns the test into a failure (XPASS).
GAPS: dict = {}

# Pages Ray itself fails where this runs (checked with Ray 2.60 on this machine).
RAY_FAILS_TOO = {
    "rst_actors__async_api": (
        sys.version_info >= (3, 11),
        "its block for 'Python 3.9 and Python 3.10' calls asyncio.wait([ref]); since 3.11 "
        "that takes only futures, and Ray 2.60 fails it here too: 'ray.ObjectRef' object "
        "has no attribute 'add_done_callback' (ray-project/ray#31606)"),
}

# Blocks whose testoutput is checked by Ray's doctest but cannot hold on every run, and
# why: (page program, line of the testcode block) -> reason. Their output is not compared.
NONDETERMINISTIC: dict = {}

# What a block without a testoutput must print, where the page says what it prints: (page
# program, line of the block) -> its output. The multiprocessing quickstart's loop prints
# the map's results, 0 to 99 in order.
DOCUMENTED_OUTPUT = {
    ("rst_ray-more-libs__multiprocessing", 19): "".join(f"{i}\n" for i in range(100)),
}

# Notebook cells whose saved output must be printed again, word for word: (page program,
# cell number) -> why it must hold. The other cells' saved outputs hold times, or an order
# that depends on how many CPUs ran the tasks.
RECORDED_OUTPUT_HOLDS = {
    ("rst_examples__map_reduce", 12): "each mapper's first two words per partition",
    ("rst_examples__map_reduce", 17): "the word counts of the Zen of Python, most first",
}

WORKER_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)?\(.*\bpid=\d+.*?\)(?:\x1b\[0m)? ")


def manifest() -> list[tuple[str, str, str]]:
    return pages.manifest()


def cases():
    for path, _commit, _sha in manifest():
        name = pages.program_name(path)
        for variant in (ONE, RANKS3):
            marks = []
            gap = GAPS.get((name, variant)) or GAPS.get((name, None))
            if gap:
                marks.append(pytest.mark.xfail(strict=True, reason=gap))
            if variant == RANKS3:
                marks.append(pytest.mark.multinode)
            suffix = "1node" if variant == ONE else "3ranks"
            yield pytest.param(path, variant, marks=marks, id=f"{name[4:]}-{suffix}")


def block_outputs(stdout: str) -> dict[int, str]:
    """What each block printed: the text after its marker line, up to the next one."""
    found = list(pages.MARKER_RE.finditer(stdout))
    outputs = {}
    for k, match in enumerate(found):
        end = found[k + 1].start() if k + 1 < len(found) else len(stdout)
        outputs[int(match[1])] = stdout[match.end() + 1:end]
    return outputs


def block_failure(check: dict, got: str) -> str | None:
    """Why a block's output is not what its testoutput says (doctest's comparison), or
    None. ELLIPSIS is pytest's default flag; a block's :options: add to it."""
    flags = doctest.ELLIPSIS
    for name, on in check["flags"].items():
        flag = doctest.OPTIONFLAGS_BY_NAME[name]
        flags = flags | flag if on else flags & ~flag
    want = check["want"]
    if flags & pages.MOCK or want is None:
        return None
    if "pid=" not in want:
        got = "".join(line for line in got.splitlines(keepends=True)
                      if not WORKER_LINE.match(line))
    checker = doctest.OutputChecker()
    if check["exc_msg"] is not None:
        if pages.RAISED + "\n" not in got:
            return f"expected the exception {check['exc_msg']!r}; none was raised:\n{got}"
        raised = got.split(pages.RAISED + "\n", 1)[1]
        if checker.check_output(check["exc_msg"], raised, flags):
            return None
        if flags & doctest.IGNORE_EXCEPTION_DETAIL and checker.check_output(
                doctest._strip_exception_details(check["exc_msg"]),
                doctest._strip_exception_details(raised), flags):
            return None
        return f"expected the exception {check['exc_msg']!r}; got {raised!r}"
    if checker.check_output(want, got, flags):
        return None
    return f"expected:\n{want}got:\n{got}"


@pytest.mark.timeout(RUN_TIMEOUT + 60)
@pytest.mark.parametrize(("path", "variant"), list(cases()))
def test_ray_doc_page(path, variant, tmp_path):
    commit = {row[0]: row[1] for row in manifest()}[path]
    name = pages.program_name(path)
    program = PAGES / f"{name}.py"
    if not program.exists():
        pytest.skip(f"the program of Ray's page {path} is not in {PAGES}: run "
                    "tests/doc_programs/fetch_rst_programs.py RAY_CHECKOUT")
    text = program.read_text()
    assert text.startswith(f"# Source: ray-project/ray {path} at {commit};"), (
        f"{program} is not the page measured ({commit})")
    expected = json.loads(program.with_suffix(".json").read_text())
    fails_in_ray, why = RAY_FAILS_TOO.get(name, (False, ""))
    if fails_in_ray:
        pytest.skip(why)
    (tmp_path / program.name).write_text(text)
    before = set(os.listdir("/dev/shm"))
    code, output, errors = run(argv_for(program.name, variant), tmp_path, stderr_apart=True)
    both = f"stdout:\n{output}\nstderr:\n{errors}"
    assert code == 0, f"exit status {code}; {both}"
    assert "Traceback (most recent call last)" not in output + errors, both
    printed = block_outputs(output)
    for check in expected["blocks"]:
        where = f"{path} block {check['block']} (line {check['line']})"
        assert check["block"] in printed, f"{where} never ran; {both}"
        reason = NONDETERMINISTIC.get((name, check["line"]))
        if reason:
            continue
        documented = DOCUMENTED_OUTPUT.get((name, check["line"]))
        if check["want"] is None and documented is not None:
            check = {**check, "want": documented}
        if (name, check["line"]) in RECORDED_OUTPUT_HOLDS:
            check = {**check, "want": check["recorded"]}
        failure = block_failure(check, printed[check["block"]])
        assert failure is None, f"{where}: {failure}\n{both}"
    assert not segment_leaks(before), f"segments left: {segment_leaks(before)}"


def test_page_program_extraction(tmp_path):
    # Runs without Ray's pages: the extraction on a page of our own, both syntaxes.
    md = "\n".join([
        "# Page", "```{testcode}", "x = 1", "print(x)", "```", "", "```{testoutput}", "1",
        "```", "", "```{testcode}", ":skipif: True", "", "raise SystemExit(1)", "```", "",
        "```{testcode}", ":hide:", "", "print('a', x)", "```", "", "```{testoutput}",
        ":options: +MOCK", "", "whatever", "```", "", "```{testcode}", "1 / 0", "```", "",
        "```{testoutput}", "Traceback (most recent call last):", "  ...",
        "ZeroDivisionError: division by zero", "```", ""])
    program, expected = pages.page_program(md, "doc/source/ray-core/x/page.md", "c0ffee")
    assert "SystemExit" not in program
    assert [c["line"] for c in expected["blocks"]] == [2, 17, 29]
    assert expected["blocks"][1]["flags"] == {"MOCK": True}
    assert expected["blocks"][2]["exc_msg"] == "ZeroDivisionError: division by zero\n"
    rst = "\n".join(["Title", "", ".. testcode::", "", "    print('b')", "",
                     ".. testoutput::", "    :options: +NORMALIZE_WHITESPACE", "",
                     "    b", "", "Text."])
    rst_program, rst_expected = pages.page_program(rst, "doc/source/ray-core/p.rst", "c0ffee")
    assert "print('b')" in rst_program and rst_expected["blocks"][0]["want"] == "b\n"
    assert pages.program_name("doc/source/ray-core/x/page.md") == "rst_x__page"
    (tmp_path / "p.py").write_text(program)
    code, output, _errors = run([sys.executable, "p.py"], tmp_path, stderr_apart=True)
    assert code == 0, output
    printed = block_outputs(output)
    assert [block_failure(c, printed[c["block"]]) for c in expected["blocks"]] == [None] * 3
    assert block_failure({**expected["blocks"][0], "want": "2\n"}, printed[1]) is not None


def test_a_notebook_runs_its_code_cells(tmp_path):
    cells = [{"cell_type": "markdown", "source": ["# Title"]},
             {"cell_type": "code", "source": ["! pip install ray\n", "x = 2"], "outputs": []},
             {"cell_type": "code", "source": ["%time y = 3\n", "print(x)"],
              "outputs": [{"output_type": "stream", "name": "stdout", "text": ["2\n"]},
                          {"output_type": "stream", "name": "stderr", "text": ["w\n"]}]}]
    text = json.dumps({"cells": cells})
    program, expected = pages.page_program(text, "doc/source/ray-core/examples/nb.ipynb", "c0")
    assert program.startswith("# Source: ray-project/ray doc/source/ray-core/examples/nb.ipynb"
                               " at c0; Apache License 2.0. Its code cells in order")
    assert "# ! pip install ray" in program and "# %time y = 3" in program
    assert [(c["line"], c["want"], c["recorded"]) for c in expected["blocks"]] == \
        [(2, None, ""), (3, None, "2\n")]
    assert pages.program_name("doc/source/ray-core/examples/nb.ipynb") == "rst_examples__nb"
    (tmp_path / "nb.py").write_text(program)
    code, output, _errors = run([sys.executable, "nb.py"], tmp_path, stderr_apart=True)
    assert code == 0 and block_outputs(output)[2] == "2\n", output


def test_a_page_without_testcode_runs_its_python_code_blocks():
    md = "\n".join(["# Page", "```python", "x = 1", "```", "", "```bash", "ls", "```", "",
                    "```python", "print(x)", "```", ""])
    program, expected = pages.page_program(md, "doc/source/ray-more-libs/page.md", "c0ffee")
    assert [c["line"] for c in expected["blocks"]] == [2, 10]
    assert "x = 1" in program and "print(x)" in program and "ls" not in program
    assert all(c["want"] is None for c in expected["blocks"])
    rst = "\n".join(["Title", "", ".. code-block:: python", "", "  y = 2", "", "Text.",
                     "", ".. code-block:: bash", "", "  ls", ""])
    rst_program, rst_expected = pages.page_program(rst, "doc/source/x/p.rst", "c0ffee")
    assert "y = 2" in rst_program and "ls" not in rst_program.split("\n", 1)[1]
    assert [c["line"] for c in rst_expected["blocks"]] == [3]
    assert pages.program_name("doc/source/ray-more-libs/page.md") == "rst_ray-more-libs__page"
