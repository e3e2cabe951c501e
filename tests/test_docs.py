"""Every ```python block in the README and docs/ runs, and the README links every page."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page, n, code) for page in PAGES
          for n, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))]


def test_docs_have_code_blocks():
  assert {page.name for page, _, _ in BLOCKS} >= {"README.md", "attention.md"}


@pytest.mark.parametrize("page,n,code", BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}#{n}" for p, n, _ in BLOCKS])
def test_code_block_runs(page, n, code, capsys):
  exec(compile(code, f"{page.name}#{n}", "exec"), {"__name__": "__docs__"})
  printed = capsys.readouterr().out
  # The examples print errors between two computations of the same thing: keep them honest.
  for line in printed.splitlines():
    try:
      value = float(line)
    except ValueError:
      continue
    assert value < 1e-4, f"{page.name}#{n} printed {value}"


def test_readme_links_every_page():
  readme = (ROOT / "README.md").read_text()
  missing = [page.name for page in sorted((ROOT / "docs").glob("*.md"))
             if f"](docs/{page.name})" not in readme]
  assert not missing, f"README.md's Docs list lacks {missing}"
