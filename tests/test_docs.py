"""The tutorial pages (docs/tutorials/*.md) and the README's example are run, so
the docs cannot rot.

Each page runs in one fresh Python process in an empty temporary folder, its
fenced blocks in page order:

- ```` ```python ```` is executed (one namespace for the whole page, as if the
  blocks were typed into one session; tracebacks name the page and its line);
- ```` ```python title="NAME" ```` is a file the reader is told to create: it is
  written to ``NAME``, and a later block must run or import it;
- ```` ```bash ```` is run with ``bash -euo pipefail`` (the venv's ``python``,
  ``pytest`` and ``torchrun`` first on ``PATH``);
- ```` ```text ```` is output, shown, not run;
- a block right after a line ``<!-- not-run -->`` is skipped (``pip install``
  lines; keep them rare).

S3 is a moto server: ``AWS_ENDPOINT_URL`` points at it and the bucket
``my-bucket`` exists, so the pages read like code for a real bucket.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from ckptman.testing import S3Emulator

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
README = ROOT / "README.md"
NOT_RUN = "<!-- not-run -->"
BUCKET = "my-bucket"
RUN, FILE, SHELL, SHOWN = "run", "file", "shell", "shown"
_FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)(?P<info>[^`]*)$")
_TITLE = re.compile(r'title="(?P<name>[^"]+)"')


@dataclass(frozen=True)
class Block:
    """One fenced block: what to do with it, its code, the page line of its first code line."""

    action: str
    code: str
    line: int
    name: str = ""


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``; an unknown language is an error (its code would go unrun)."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang, info = opening["indent"], opening["lang"], opening["info"]
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        code = "\n".join(line[len(indent) :] for line in lines[i + 1 : end]) + "\n"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        title = _TITLE.search(info)
        if before == NOT_RUN or lang == "text":
            action = SHOWN
        elif lang == "python":
            action = FILE if title else RUN
        elif lang == "bash":
            action = SHELL
        else:
            raise AssertionError(f"{page.name}:{i + 1}: fence language {lang!r}: use python, bash or text")
        found.append(Block(action, code, i + 2, title["name"] if title else ""))
        i = end + 1
    return found


#: Runs one page's blocks (a JSON list on stdin) in this process, in order.
RUNNER = r"""
import json, os, subprocess, sys

page, todo = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for block in todo:
    if block["action"] == "file":
        with open(block["name"], "w") as f:
            f.write(block["code"])
    elif block["action"] == "run":
        exec(compile("\n" * (block["line"] - 1) + block["code"], page, "exec"), namespace)
    elif block["action"] == "shell":
        sys.stdout.flush()
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]])
        if done.returncode:
            sys.exit(f"{page}:{block['line']}: the bash block exited with {done.returncode}")
"""


def run_blocks(page: Path, todo: list[Block], cwd: Path, env: dict[str, str]) -> str:
    """Run ``todo`` in a fresh interpreter in ``cwd``; return its output (fail with it)."""
    payload = json.dumps([str(page.relative_to(ROOT)), [asdict(b) for b in todo if b.action != SHOWN]])
    done = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=payload,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{page.name} failed:\n{output}"
    return output


def readme_example() -> Block:
    (example,) = [b for b in blocks(README) if b.action == RUN]
    return example


@pytest.fixture(scope="session")
def page_env(ckptman_s3_server: S3Emulator) -> Iterator[dict[str, str]]:
    """The environment the pages run in: moto as the S3 endpoint, with ``my-bucket``
    (each page writes below a prefix of its own)."""
    ckptman_s3_server.create_bucket(BUCKET)
    bin_dir = str(Path(sys.executable).parent)
    yield {
        **os.environ,
        **ckptman_s3_server.env,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "HF_HUB_OFFLINE": "1",  # the tutorials build their models from configs: no download
        "PYTHONUNBUFFERED": "1",
    }
    ckptman_s3_server.remove_bucket(BUCKET)


@pytest.fixture(scope="session")
def runs(
    request: pytest.FixtureRequest, page_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[list[str]]]]:
    """The selected pages' runs, started together on first use (most of a run is
    imports and waiting on servers, so two at a time per core take half the
    time); by page name, each the outputs of its runs. README.md runs twice in
    one folder: the second run resumes."""
    names = [(getattr(item, "originalname", ""), item) for item in request.session.items]
    chosen = {item.callspec.params["page"] for name, item in names if name == "test_tutorial_runs"}
    readme = any(name == "test_readme_example_runs_and_resumes" for name, _ in names)

    def run(page: Path, todo: list[Block], times: int) -> list[str]:
        cwd = tmp_path_factory.mktemp(page.stem)
        return [run_blocks(page, todo, cwd, page_env) for _ in range(times)]

    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        futures = {page.name: pool.submit(run, page, blocks(page), 1) for page in sorted(chosen)}
        if readme:
            futures[README.name] = pool.submit(run, README, [readme_example()], 2)
        yield futures
        for future in futures.values():
            future.cancel()


def test_there_are_tutorials() -> None:
    assert len(TUTORIALS) >= 6, TUTORIALS


@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(page: Path, runs: dict[str, Future[list[str]]]) -> None:
    todo = blocks(page)
    assert any(b.action != SHOWN for b in todo), f"{page.name} has no code that runs"
    for i, block in enumerate(todo):
        if block.action == FILE:
            later = "".join(b.code for b in todo[i + 1 :] if b.action in (RUN, SHELL))
            stem = Path(block.name).stem
            assert block.name in later or re.search(rf"\bimport {stem}\b|\bfrom {stem} import\b", later), (
                f"{page.name}:{block.line}: {block.name} is written but no later block runs or imports it"
            )
    runs[page.name].result()


def test_readme_example_runs_and_resumes(runs: dict[str, Future[list[str]]]) -> None:
    """The README's example: a first run trains and saves its last step; a second
    run in the same folder resumes there."""
    first, second = runs[README.name].result()
    assert "resumed" not in first
    assert re.search(r"^trained steps 1\.\.500\b", first, re.MULTILINE), first
    assert re.search(r"^resumed from step 500$", second, re.MULTILINE), second
    assert re.search(r"^trained steps 501\.\.1000\b", second, re.MULTILINE), second


def test_api_reference_lists_all_of_ckptman_testing() -> None:
    """docs/api.md names ckptman.testing's members one by one (fixtures first):
    a new public name must be added there too."""
    import ckptman.testing

    api = (ROOT / "docs" / "api.md").read_text()
    assert [n for n in ckptman.testing.__all__ if f"        - {n}\n" not in api] == []


def test_blocks_follow_the_rules(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Intro\n\n```python\nx = 1\n```\n\n<!-- not-run -->\n```bash\npip install x\n```\n\n"
        '```python title="train.py"\nprint(1)\n```\n\n```text\nout\n```\n'
    )
    assert [(b.action, b.line, b.name) for b in blocks(page)] == [
        (RUN, 4, ""),
        (SHOWN, 9, ""),
        (FILE, 13, "train.py"),
        (SHOWN, 17, ""),
    ]
    page.write_text("```py\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="fence language 'py'"):
        blocks(page)
