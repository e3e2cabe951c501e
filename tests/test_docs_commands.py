"""Every command line in the shell blocks of the README and docs/ is valid as written: each
`python -m lsm.<module> ...` is accepted by that module's argument parser, its `key=value`
overrides load onto the config it names (`--config`, or the config whose run directory `--run`
points at, else the defaults), every `--config configs/...` file loads, and every `configs/...`
and `scripts/...` path exists. Nothing is run: parsing stops right after `parse_args`. Commands
with placeholders (`<name>`) are skipped."""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import shlex

import pytest

from lsm.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
LSM_COMMAND = re.compile(r"python3? -m lsm\b")
PYTHON = re.compile(r"(?:\S*/)?python3?")
MODULE = re.compile(r"lsm(?:\.\w+)*")
OPERATOR_CHARS = set("();<>|&")
PLACEHOLDER = re.compile(r"<[A-Za-z_][\w-]*>")
PLACEHOLDER_WORD = "@PLACEHOLDER@"
CONFIG_PATH = re.compile(r"(?<![\w/])configs/[\w./-]+\.ya?ml")
CONFIG_FLAG = re.compile(r"--config[= ]['\"]?(configs/[\w./-]+\.ya?ml)")
SCRIPT_PATH = re.compile(r"(?<![\w/])scripts/[\w./-]+\.(?:sh|py)")


def _split(text: str) -> list[str] | None:
  """Shell words and operators (``&&``, ``;``, ``|``, ...) of ``text``; None if a quote is open."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  try:
    return list(lexer)
  except ValueError:
    return None


def _shell_lines(page: pathlib.Path):
  """(line number, logical line) of every shell block in ``page``."""
  language, body, first = None, [], 0
  for number, line in enumerate(page.read_text().splitlines(), 1):
    if line.lstrip().startswith("```"):
      if language is None:
        language, body, first = line.lstrip()[3:].strip(), [], number + 1
        continue
      if language in SHELL_LANGUAGES:
        yield from _logical_lines(body, first)
      language = None
    elif language is not None:
      body.append(line)


def _logical_lines(body: list[str], first: int):
  """Joins ``\\`` continuations and quotes that span lines; drops a leading ``$ `` prompt."""
  i = 0
  while i < len(body):
    start, line = i, body[i].strip().removeprefix("$ ")
    while i + 1 < len(body) and (line.endswith("\\") or _split(line) is None):
      i += 1
      line = (line[:-1].rstrip() + " " if line.endswith("\\") else line + "\n") + body[i].strip()
    yield first + start, line
    i += 1


def _cases():
  cases = []
  for page in PAGES:
    for number, line in _shell_lines(page):
      if not (LSM_COMMAND.search(line) or CONFIG_PATH.search(line) or SCRIPT_PATH.search(line)):
        continue
      cases.append(pytest.param(line, id=f"{page.relative_to(ROOT)}:{number}"))
  return cases


CASES = _cases()


def _lsm_commands(text: str) -> list[tuple[str, list[str]]]:
  """(module, arguments) of every ``python -m lsm.<module>`` command in the shell text ``text``,
  also inside quoted words (``ssh --command='... python -m lsm.train ...'``). Placeholders
  (``<name>``) become PLACEHOLDER_WORD first, so that their ``<`` and ``>`` stay in the word."""
  words = _split(PLACEHOLDER.sub(PLACEHOLDER_WORD, text))
  assert words is not None, f"unbalanced quotes in {text!r}"
  commands = []
  for i, word in enumerate(words):
    if (PYTHON.fullmatch(word) and words[i + 1:i + 2] == ["-m"] and i + 2 < len(words)
        and MODULE.fullmatch(words[i + 2])):
      arguments = []
      for argument in words[i + 3:]:
        if set(argument) <= OPERATOR_CHARS:  # the command ends at `&&`, `;`, `|`, ...
          break
        arguments.append(argument)
      commands.append((words[i + 2], arguments))
    elif any(c.isspace() for c in word) and LSM_COMMAND.search(word):
      commands.extend(_lsm_commands(word))
  return commands


class _Parsed(Exception):
  def __init__(self, namespace):
    super().__init__("parsed")
    self.namespace = namespace


def _parse(module: str, argv: list[str], monkeypatch, capsys) -> argparse.Namespace:
  """What ``python -m <module> <argv>`` parses its arguments into, without running it."""
  target = importlib.import_module(module)
  if hasattr(target, "__path__"):  # a package: `python -m` runs its __main__
    target = importlib.import_module(f"{module}.__main__")
  assert hasattr(target, "main"), f"{module} has no main(argv)"
  parse_args = argparse.ArgumentParser.parse_args

  def parse_and_stop(self, args=None, namespace=None):
    raise _Parsed(parse_args(self, args, namespace))

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
  try:
    returned = target.main(argv)
  except _Parsed as parsed:
    return parsed.namespace
  except SystemExit as exit_:
    raise AssertionError(f"python -m {module} {shlex.join(argv)}: the parser exits with "
                         f"{exit_.code}: {capsys.readouterr().err.strip()}") from None
  raise AssertionError(f"python -m {module} {shlex.join(argv)}: returned {returned} before "
                       f"parsing any arguments: {capsys.readouterr()}")


def _config_of_run(run: str) -> pathlib.Path | None:
  """The config in configs/ whose run directory (train.output_dir) is ``run``, if any."""
  for path in sorted((ROOT / "configs").glob("*.yaml")):
    if str(load_config(path).output_dir).rstrip("/") == run.rstrip("/"):
      return path
  return None


def test_the_pages_hold_commands():
  """The extraction finds the commands the pages are known to show."""
  lines = [case.values[0] for case in CASES]
  modules = {module for line in lines for module, _ in _lsm_commands(line)}
  assert modules >= {"lsm.train", "lsm.generate", "lsm.evaluate", "lsm.bench"}, modules
  assert any("scripts/quickstart.sh" in line for line in lines)


def test_commands_inside_quotes_and_continuations_are_found():
  text = ("gcloud ssh vm --command='cd lsm && .venv/bin/python -m lsm.train --config c.yaml "
          "'\\''a.b=1'\\''; echo done' --zone=z")
  assert _lsm_commands(text) == [("lsm.train", ["--config", "c.yaml", "a.b=1"])]
  lines = list(_logical_lines(["X=1 python -m lsm.bench scan \\", "  --quick | tee log"], 5))
  assert lines == [(5, "X=1 python -m lsm.bench scan --quick | tee log")]
  assert _lsm_commands(lines[0][1]) == [("lsm.bench", ["scan", "--quick"])]
  assert _lsm_commands("python -m lsm.evaluate --run runs/<name>") == [
      ("lsm.evaluate", ["--run", f"runs/{PLACEHOLDER_WORD}"])]


@pytest.mark.parametrize("line", CASES)
def test_command_line_is_valid(line, monkeypatch, capsys):
  for path in CONFIG_PATH.findall(line):
    assert (ROOT / path).is_file(), f"{path}: no such file"
  for path in CONFIG_FLAG.findall(line):  # a training config, also for scripts that pass it on
    load_config(ROOT / path)
  for path in SCRIPT_PATH.findall(line):
    assert (ROOT / path).is_file(), f"{path}: no such script"
  commands = _lsm_commands(line)
  if LSM_COMMAND.search(line):
    assert commands, f"no `python -m lsm...` command could be read from {line!r}"
  monkeypatch.chdir(ROOT)  # paths in the docs are relative to the repository
  checked = 0
  for module, arguments in commands:
    if any(PLACEHOLDER_WORD in argument for argument in arguments):
      continue  # `--run runs/<name>`: a template, not a command
    args = _parse(module, arguments, monkeypatch, capsys)
    checked += 1
    overrides = getattr(args, "overrides", None)
    if overrides is None:
      continue
    if getattr(args, "config", None) is not None:
      configs = [args.config]
    elif getattr(args, "run", None) is not None:  # one run directory, or a list of them
      configs = [_config_of_run(run) for run in (
          args.run if isinstance(args.run, list) else [args.run])]
    else:
      configs = [None]
    for config in configs:
      load_config(config, overrides)  # a ConfigError names the bad key
  if commands and not checked:
    pytest.skip("every lsm command on this line has a placeholder")
