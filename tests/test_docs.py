"""The docs cannot rot: every Python snippet in README.md, CONTRIBUTING.md and docs/ runs on the
CPU; every relative link, anchor, repository path and test name they quote exists; the front
page stays short with its two commands up front; every figure on the result pages has the
command that produced it next to it.

Run alone: ``python -m pytest -q tests/test_docs.py``.
"""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def doc_files():
    """README.md, CONTRIBUTING.md (root or docs/) and every Markdown file under docs/,
    repository-relative, in a fixed order."""
    files = [f for f in ("README.md", "CONTRIBUTING.md") if os.path.isfile(os.path.join(ROOT, f))]
    files += sorted(os.path.relpath(p, ROOT) for p in
                    glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return files


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# ---- Markdown parsing -----------------------------------------------------------------------
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


def code_blocks(text):
    """``(language, code, first line number)`` of every fenced block; an indented fence (a block
    inside a list item) is dedented by the fence's own indent."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[indent:] if line[:indent].strip() == "" else line)
            j += 1
        blocks.append((lang, "\n".join(body) + "\n", i + 2))
        i = j + 1
    return blocks


def prose(text):
    """``text`` with fenced code blocks and HTML comments blanked (line numbers kept)."""
    out, in_fence, fence = [], False, ""
    for line in text.split("\n"):
        m = FENCE.match(line)
        if m and not in_fence:
            in_fence, fence = True, m.group(2)
            out.append("")
        elif in_fence:
            if line.strip().startswith(fence):
                in_fence = False
            out.append("")
        else:
            out.append(line)
    text = "\n".join(out)
    return re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)


INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text):
    """``(target, line number)`` of every Markdown link and image outside code."""
    found = []
    for n, line in enumerate(prose(text).split("\n"), 1):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((m.group(1), n))
    return found


def inline_code(text):
    """``(span, line number)`` of every inline code span outside fenced blocks."""
    found = []
    for n, line in enumerate(prose(text).split("\n"), 1):
        for m in INLINE_CODE.finditer(line):
            found.append((m.group(2).strip(), n))
    return found


def slug(heading):
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)    # links: their text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text):
    seen, out = {}, set()
    for line in prose(text).split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            k = seen.get(s, 0)
            out.add(s if k == 0 else f"{s}-{k}")
            seen[s] = k + 1
    out.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return out


# ---- 1. every python snippet runs on the CPU -------------------------------------------------
RUNNER = r"""
import json, sys, traceback
blocks = json.load(sys.stdin)
ns = {"__name__": "__main__"}
for path, line, code in blocks:
    try:
        exec(compile(code, f"{path}:{line}", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"\nthe python block at {path}:{line} failed", file=sys.stderr)
        sys.exit(1)
"""

SNIPPET_TIMEOUT_S = 300


def python_blocks(rel):
    return [(rel, line, code) for lang, code, line in code_blocks(read(rel))
            if lang in ("python", "py")]


FILES_WITH_PYTHON = [f for f in doc_files() if python_blocks(f)]


def test_the_front_page_has_runnable_snippets():
    assert "README.md" in FILES_WITH_PYTHON


@pytest.mark.parametrize("rel", FILES_WITH_PYTHON)
def test_python_snippets_run_on_the_cpu(rel):
    """A file's ```python blocks run in order, in one namespace, in a fresh CPU-only process
    from the repository root (TRITON_INTERPRET unset: a snippet that runs the kernels on the
    CPU sets it itself, as a user would)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(python_blocks(rel)),
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=SNIPPET_TIMEOUT_S)
    assert proc.returncode == 0, f"{rel}: a python snippet failed\n{proc.stdout}\n{proc.stderr}"


# ---- 2. links, paths and test names exist ----------------------------------------------------
REPO_PATH = re.compile(r"^(?:\./)?((?:bench|docs|tests|fastmix|kernels|\.ci)/[\w./*-]*"
                       r"|train\.py|setup\.py|pyproject\.toml|Makefile|LICENSE|README\.md"
                       r"|CONTRIBUTING\.md)(?:::([\w\[\]/.-]+))?$")
# Paths that name another project's files, not this repository's: OpenMixup's docs page the
# official ViT recipes cite.
EXTERNAL_PATHS = {"docs/official-vit-configs.md": {"docs/en/mixup_benchmarks/Mixup_cifar.md"}}
TEST_NAME = re.compile(r"^(?:([\w/.-]+\.py)::)?(test_\w+)(?:\[[^\]]*\])?$")


def link_problems(rel, text):
    problems = []
    base = os.path.dirname(os.path.join(ROOT, rel))
    for target, n in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):      # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, rel)
        if path and not os.path.exists(full):
            problems.append(f"{rel}:{n}: link to a missing file: {target}")
        elif anchor and full.endswith(".md") and anchor not in anchors(
                read(full) if path else text):
            problems.append(f"{rel}:{n}: no heading for the anchor #{anchor} in "
                            f"{os.path.relpath(full, ROOT)}")
    return problems


def _defined_tests():
    names = set()
    for p in glob.glob(os.path.join(ROOT, "tests", "*.py")) + glob.glob(
            os.path.join(ROOT, "bench", "*.py")):
        with open(p, encoding="utf-8") as f:
            for name in re.findall(r"^\s*def (test_\w+)", f.read(), re.M):
                names.add((os.path.relpath(p, ROOT), name))
    return names


def _find_test_file(name):
    if "/" in name:
        return [name]
    return [d + "/" + name for d in ("tests", "bench") if os.path.isfile(os.path.join(ROOT, d, name))]


def path_problems(rel, text, defined=None):
    """Repository paths and test names quoted in inline code that do not exist."""
    problems = []
    defined = _defined_tests() if defined is None else defined
    for span, n in inline_code(text):
        m = REPO_PATH.match(span)
        if m and not any(c in span for c in "<>{}$ "):
            path = m.group(1).rstrip("/")
            if path in EXTERNAL_PATHS.get(rel, ()):
                continue
            hits = glob.glob(os.path.join(ROOT, path)) if "*" in path else (
                [path] if os.path.exists(os.path.join(ROOT, path)) else [])
            if not hits:
                problems.append(f"{rel}:{n}: names a missing path: `{span}`")
                continue
            if m.group(2) and path.endswith(".py"):
                test = re.sub(r"\[.*$", "", m.group(2))
                if (path, test) not in defined:
                    problems.append(f"{rel}:{n}: no test {test} in {path}: `{span}`")
            continue
        t = TEST_NAME.match(span)
        if t:
            file, test = t.group(1), t.group(2)
            files = _find_test_file(file) if file else None
            if file and not files:
                problems.append(f"{rel}:{n}: names a missing test file: `{span}`")
            elif not any(name == test and (files is None or f in files) for f, name in defined):
                problems.append(f"{rel}:{n}: names a test that does not exist: `{span}`")
    return problems


@pytest.mark.parametrize("rel", doc_files())
def test_links_paths_and_test_names_exist(rel):
    text = read(rel)
    problems = link_problems(rel, text) + path_problems(rel, text)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rel", [f for f in doc_files() if f.startswith("docs/")
                                 and not f.startswith("docs/study")])
def test_every_docs_page_is_linked_from_the_front_page_or_the_index(rel):
    linked = set()
    for page in ("README.md", "docs/README.md"):
        if os.path.isfile(os.path.join(ROOT, page)):
            base = os.path.dirname(os.path.join(ROOT, page))
            for target, _ in links(read(page)):
                linked.add(os.path.relpath(os.path.normpath(
                    os.path.join(base, target.partition("#")[0])), ROOT))
    assert rel in linked, f"{rel} is linked from neither README.md nor docs/README.md"


# ---- 3. the front page ------------------------------------------------------------------------
def test_the_front_page_is_short_with_the_two_commands_first():
    lines = read("README.md").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(lines) <= 210, f"README.md has {len(lines)} lines; the front page keeps to ~200"
    head = "\n".join(lines[:40])
    assert "make train" in head and "make test" in head, \
        "`make train` and `make test` belong in README.md's first 40 lines"


# ---- 4. every figure carries its command -------------------------------------------------------
# A figure: a percentage or an x-ratio (1.3x, 0.09-0.53x). A command: a backticked make, python,
# pytest, bash or torchrun line (or an installed fastmix-* command).
FIGURE = re.compile(r"\d\s?%|\b\d+(?:\.\d+)?x\b")
COMMAND = re.compile(r"`(?:make|python3?|\.venv/bin/python|pytest|bash|torchrun|fastmix-[\w-]+)"
                     r"\b[^`]*`")
# The pages written to this rule (the front page and docs/ pages with results); docs/methods.md,
# docs/official-vit-configs.md and the study folders give their commands in their own sections.
FIGURE_PAGES = ["README.md", "CONTRIBUTING.md", "docs/README.md", "docs/architecture.md",
                "docs/data.md", "docs/faithfulness.md", "docs/mixers.md", "docs/performance.md",
                "docs/reliability.md", "docs/speed.md", "docs/studies.md", "docs/training.md"]
COMMAND_WINDOW = 5


def blocks_of(text):
    """Tables and paragraphs of ``text`` (code and comments blanked) as ``(first, last)`` line
    indices, with the index of the next heading after each."""
    lines = prose(text).split("\n")
    out, i = [], 0
    while i < len(lines):
        if not lines[i].strip() or lines[i].lstrip().startswith("#"):
            i += 1
            continue
        table = lines[i].lstrip().startswith("|")
        j = i
        while j + 1 < len(lines) and lines[j + 1].strip() and \
                not lines[j + 1].lstrip().startswith("#") and \
                lines[j + 1].lstrip().startswith("|") == table:
            j += 1
        out.append((i, j))
        i = j + 1
    return lines, out


def uncommanded_figures(text):
    """``(line number, line)`` of each figure whose table or paragraph has no command in it or
    in the COMMAND_WINDOW lines after it (within the same section). A table with a command in
    some rows (a command column) needs one in every row that quotes a figure."""
    lines, blocks = blocks_of(text)
    bad = []
    for first, last in blocks:
        rows = [k for k in range(first, last + 1) if FIGURE.search(INLINE_CODE.sub("", lines[k]))]
        if not rows:
            continue
        if lines[first].lstrip().startswith("|") and any(
                COMMAND.search(lines[k]) for k in range(first, last + 1)):
            bad += [(k + 1, lines[k].strip()[:100]) for k in rows if not COMMAND.search(lines[k])]
            continue
        end = last
        for k in range(last + 1, min(last + 1 + COMMAND_WINDOW, len(lines))):
            if lines[k].lstrip().startswith("#"):
                break
            end = k
        # a command on the rows themselves, in the block or just after it; inside a fenced
        # block right after it too (the raw text keeps those)
        window = "\n".join(lines[first:end + 1])
        raw = "\n".join(text.split("\n")[last + 1:end + 1])
        if not (COMMAND.search(window) or re.search(
                r"^\s*(?:make|python3?|\.venv/bin/python|pytest|bash|torchrun)\b", raw, re.M)):
            bad += [(k + 1, lines[k].strip()[:100]) for k in rows]
    return bad


@pytest.mark.parametrize("rel", [f for f in FIGURE_PAGES if os.path.isfile(os.path.join(ROOT, f))])
def test_every_figure_has_its_command_next_to_it(rel):
    bad = uncommanded_figures(read(rel))
    assert not bad, f"{rel}: figures with no command in their table or paragraph or the " \
                    f"{COMMAND_WINDOW} lines after it:\n" + "\n".join(f"  {n}: {s}" for n, s in bad)


# ---- the architecture page draws the data flow -------------------------------------------------
def test_the_architecture_page_draws_the_data_flow_as_a_mermaid_diagram():
    """GitHub renders a ```mermaid block; a statement separator (;) inside a label or an
    unknown diagram type would not render."""
    diagrams = [code for lang, code, _ in code_blocks(read("docs/architecture.md"))
                if lang == "mermaid"]
    assert diagrams, "docs/architecture.md has no ```mermaid block"
    for code in diagrams:
        assert re.match(r"\s*(flowchart|graph)\s+(TD|TB|LR|RL|BT)\b", code), code[:80]
        assert ";" not in code
        for node in ("loader", "mixblock", "mix", "ce", "loss", "opt", "ema"):
            assert re.search(rf"^\s*{node}\[", code, re.M), f"no {node} node in the data flow"


# ---- the checks themselves catch what they are for ---------------------------------------------
def test_the_checks_catch_a_broken_link_path_test_and_uncommanded_figure():
    text = ("# A page\n\nSee [gone](docs/no-such-page.md) and [here](#a-page) and "
            "[there](#nowhere).\n\nThe file `kernels/no_such_kernel.py` and the test "
            "`test_no_such_test_anywhere` and `tests/test_docs.py::test_no_such_test`.\n\n"
            "Prose with 4% and `make bench-counts`.\n\n## Next\n\n"
            "| a | b |\n|---|---|\n| x | 1.5x |\n\nProse with 3% and no command.\n\n"
            "## Third\n\n| a | b |\n|---|---|\n| y | 2x | `make bench` |\n| z | 3x | |\n\n"
            "## Code\n\n```python\n[broken](nowhere.md)\n```\n")
    problems = link_problems("README.md", text) + path_problems("README.md", text)
    assert any("no-such-page.md" in p for p in problems)
    assert any("#nowhere" in p for p in problems) and not any("#a-page" in p for p in problems)
    assert any("no_such_kernel" in p for p in problems)
    assert any("test_no_such_test_anywhere" in p for p in problems)
    assert any("test_docs.py: `tests" in p or "no test test_no_such_test in" in p
               for p in problems)
    assert not any("nowhere.md" in p for p in problems)          # code blocks are not prose
    bad = [line for _, line in uncommanded_figures(text)]
    assert bad == ["| x | 1.5x |", "Prose with 3% and no command.", "| z | 3x | |"]
    assert [lang for lang, _, _ in code_blocks(text)] == ["python"]


def test_existing_paths_and_tests_pass_the_checks():
    text = ("[p](bench/RESULTS.md#counted-without-a-gpu-traffic-launches-flops-memory-benchcountspy)"
            " `bench/cases_*.py` `tests/test_docs.py::test_existing_paths_and_tests_pass_the_checks`"
            " `test_docs.py::test_the_front_page_has_runnable_snippets`\n")
    assert link_problems("README.md", text) + path_problems("README.md", text) == []
