"""The docs stay true: README.md, docs/*.md and benchmarks/README.md name only things that exist (issue 31).

- every relative link (and its #anchor, when it points into a markdown file) resolves;
- every repository path named in the text (csrc/..., svq_fast/..., recipes/..., benchmarks/..., tests/..., docs/...,
  globs and {a,b} patterns included) exists;
- every `make TARGET` in a code block or inline code is a target of the Makefile;
- every flag given to a repository script in a code block exists: argparse flags are read from the script's
  `add_argument` calls (by `ast`, without importing torch), shell scripts' from their `case` patterns, and the
  training recipes' `--section.field=` overrides from the typed config dataclasses (svq_fast/config.py; `--config
  NAME` from svq_fast/named_configs.py); every `--section.field` written anywhere in the docs is a config field too,
  and every other `--flag` in inline code is accepted by some script here or by a launcher the docs show.

The checker runs on a root folder, so the tests at the end plant a broken link, a renamed file, an unknown make
target and an unknown flag in a temporary copy of the docs and check that each is reported.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import glob
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220

TOP_LEVEL = ("csrc", "svq_fast", "recipes", "benchmarks", "tests", "docs")
TOP_FILES = ("setup.py", "pyproject.toml", "Makefile", "README.md")
TRAIN_RECIPES = {"recipes/train_svqgan.py": "Stage1Config", "recipes/train_transformer.py": "Stage2Config"}
ALWAYS_OK_FLAGS = {"--help", "-h"}

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_PATH = re.compile(
    r"(?<![\w./\-$<{])((?:"
    + "|".join(TOP_LEVEL)
    + r")/[\w.*{},/\-]*[\w*}]|"
    + "|".join(map(re.escape, TOP_FILES))
    + r")"
)
_OUTPUT_FLAG = re.compile(r"--(?:out|md|json|jsonl|run\.out_dir)[ =]$")
_CONFIG_FLAG = re.compile(r"(?<![\w-])--([a-z_0-9]+\.[a-z_0-9]+)\b")
_MAKE = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*make\s+([a-z][\w-]*)")


def doc_files(root: Path) -> list[Path]:
    files = [root / "README.md", root / "benchmarks" / "README.md"]
    files += [root / "benchmarks" / "results" / "tiny_configs_cpu" / "README.md"]  # moved from the README (issue 31)
    files += sorted((root / "docs").rglob("*.md")) if (root / "docs").is_dir() else []
    return [f for f in files if f.is_file()]


def code_blocks(text: str) -> list[str]:
    return _FENCE.findall(text)


def without_code_blocks(text: str) -> str:
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    heading = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = without_code_blocks(md.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for part in m.group(1).split(",") for x in _expand_braces(head + part + tail)]


def path_exists(root: Path, rel: str) -> bool:
    for p in _expand_braces(rel):
        if "*" in p or "?" in p:
            if not glob.glob(str(root / p)):
                return False
        elif not (root / p).exists():
            return False
    return True


def check_links(doc: Path, root: Path) -> list[str]:
    errors = []
    for target in _LINK.findall(without_code_blocks(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        shown = f"{doc.relative_to(root)}: link ({target})"
        if not dest.exists():
            errors.append(f"{shown}: {path} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            errors.append(f"{shown}: no heading with anchor #{anchor} in {path or doc.name}")
    return errors


def check_paths(doc: Path, root: Path) -> list[str]:
    errors = []
    text = doc.read_text()
    for m in _PATH.finditer(text):
        rel = m.group(1)
        nxt = text[m.end() : m.end() + 1]
        if nxt in "<$" and nxt:  # a placeholder follows (benchmarks/results/gpu-<device>): not a real path
            continue
        if _OUTPUT_FLAG.search(text[max(0, m.start() - 20) : m.start()]):  # a path a command will write
            continue
        if not path_exists(root, rel):
            errors.append(f"{doc.relative_to(root)}: names {rel}, which does not exist")
    return errors


@functools.cache
def make_targets(makefile: Path) -> frozenset[str]:
    return frozenset(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", makefile.read_text(), re.M))


def _block_lines(block: str) -> list[str]:
    """A code block's command lines: continuations joined, comments and blank lines dropped."""
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in block.replace("\\\n", " ").splitlines())
    return [line for line in lines if line]


def _commands(text: str) -> list[str]:
    """Shell command lines of the code blocks and of inline code spans."""
    lines = [line for block in code_blocks(text) for line in _block_lines(block)]
    return lines + _block_lines("\n".join(_INLINE.findall(without_code_blocks(text))))


def check_make(doc: Path, root: Path) -> list[str]:
    targets = make_targets(root / "Makefile")
    errors = []
    for line in _commands(doc.read_text()):
        for part in re.split(r"\s*(?:&&|\|\||;)\s*", line):
            m = _MAKE.match(part)
            if m and m.group(1) not in targets:
                errors.append(f"{doc.relative_to(root)}: `make {m.group(1)}` is not a Makefile target")
    return errors


@functools.cache
def script_flags(path: Path) -> frozenset[str] | None:
    """The option strings a script accepts: argparse add_argument calls (.py), case patterns (.sh)."""
    text = path.read_text()
    if path.suffix == ".sh":
        return frozenset(re.findall(r"^\s*(--?[\w-]+)(?:\|[^)]*)?\)", text, re.M))
    flags = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for a in node.args:
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("-"):
                    flags.add(a.value)
    return frozenset(flags) if flags else None


@functools.cache
def _config_roots():
    from svq_fast import config

    return {"Stage1Config": config.Stage1Config(), "Stage2Config": config.Stage2Config()}


def config_key_ok(key: str, kinds=("Stage1Config", "Stage2Config")) -> bool:
    for kind in kinds:
        obj = _config_roots()[kind]
        for part in key.split("."):
            names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
            if part not in names:
                break
            obj = getattr(obj, part)
        else:
            if not dataclasses.is_dataclass(obj):
                return True
    return False


def _script_of(tokens: list[str], root: Path) -> tuple[str, int] | None:
    """(repository path of the script a command runs, index of its first argument) or None."""
    for i, tok in enumerate(tokens):
        if tok.endswith((".py", ".sh")) and (root / tok).is_file():
            return tok, i + 1
        if tok == "-m" and i + 1 < len(tokens):
            mod = tokens[i + 1]
            rel = mod.replace(".", "/") + ".py"
            if mod.split(".")[0] in ("svq_fast", "recipes", "benchmarks") and (root / rel).is_file():
                return rel, i + 2
            return None  # another module (pytest, deepspeed.launcher.runner ...): not ours to check
    return None


def _check_train_args(script: str, args: list[str]) -> list[str]:
    """The training recipes' command line (svq_fast/cli.py): --config NAME, --profile, --section.field=value."""
    from svq_fast.named_configs import CONFIGS

    kind, errors = TRAIN_RECIPES[script], []
    args = [x for a in args for x in (a.split("=", 1) if a.startswith("--config=") else [a])]
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args) and args[i + 1] not in CONFIGS:
            errors.append(f"{script} --config {args[i + 1]}: no such named config")
        if not a.startswith("--") or a in ALWAYS_OK_FLAGS or a in ("--profile", "--config"):
            continue
        key = a[2:].split("=", 1)[0]
        if not config_key_ok(key, (kind,)):
            errors.append(f"{script} --{key}: not a field of {kind}")
    return errors


def check_flags(doc: Path, root: Path) -> list[str]:
    errors = []
    shown = doc.relative_to(root)
    text = doc.read_text()
    for block in code_blocks(text):
        for line in _block_lines(block):
            try:
                tokens = shlex.split(line)
            except ValueError:
                tokens = line.split()
            found = _script_of(tokens, root)
            if found is None:
                continue
            script, start = found
            args = tokens[start:]
            if script in TRAIN_RECIPES:
                errors += [f"{shown}: {e}" for e in _check_train_args(script, args)]
                continue
            known = script_flags(root / script)
            if not any(a.startswith("-") for a in args):
                continue
            if known is None:
                errors.append(f"{shown}: {script} takes no flags this test can read, but the docs give it some")
                continue
            for a in args:
                if a.startswith("-") and not re.match(r"^-\d", a):
                    flag = a.split("=", 1)[0]
                    if flag not in known and flag not in ALWAYS_OK_FLAGS:
                        errors.append(f"{shown}: {script} has no flag {flag}")
    # a `--section.field` anywhere (prose included) names a config field
    for key in _CONFIG_FLAG.findall(text):
        if key == "section.field":
            continue
        if not config_key_ok(key):
            errors.append(f"{shown}: --{key} is not a field of the run configs (svq_fast/config.py)")
    return errors


# flags of the launchers and tools the docs show around our scripts (deepspeed, torchrun, accelerate, pip, tensorboard)
EXTERNAL_FLAGS = set(
    "--num_gpus --num_nodes --hostfile --nnodes --node_rank --nproc_per_node --rdzv-backend --rdzv-endpoint "
    "--multi_gpu --num_processes --no-build-isolation --target --logdir --help --fail".split()
)
_WORD_FLAG = re.compile(r"(?<![\w.-])(--[a-z][a-z0-9_-]*[a-z0-9])(?![\w.])")


@functools.cache
def _all_script_flags(root: Path) -> frozenset[str]:
    """Every flag some repository script accepts, and the run configs' top-level fields (--stage1, --condition)."""
    flags = set()
    for pattern in ("recipes/**/*.py", "benchmarks/*.py", "benchmarks/*.sh", "svq_fast/**/*.py"):
        for path in root.glob(pattern):
            if path.suffix == ".sh" or "add_argument" in path.read_text():
                flags |= script_flags(path) or set()
    for cfg in _config_roots().values():
        flags |= {"--" + f.name for f in dataclasses.fields(cfg) if not dataclasses.is_dataclass(getattr(cfg, f.name))}
    return frozenset(flags | {"--config", "--profile"})


def check_prose_flags(doc: Path, root: Path) -> list[str]:
    """A flag in inline code (`--window-stride`) is one that some script of ours, or a launcher, accepts."""
    known = _all_script_flags(root) | EXTERNAL_FLAGS
    spans = _INLINE.findall(without_code_blocks(doc.read_text()))
    found = {f for span in spans for f in _WORD_FLAG.findall(span)}
    return [f"{doc.relative_to(root)}: `{f}` is a flag of no script here" for f in sorted(found - known)]


def check_all(root: Path) -> list[str]:
    errors = []
    for doc in doc_files(root):
        for check in (check_links, check_paths, check_make, check_flags, check_prose_flags):
            errors += check(doc, root)
    return errors


# ------------------------------------------------------------------------------------------------ the repository


def test_docs_exist():
    names = [str(p.relative_to(ROOT)) for p in doc_files(ROOT)]
    assert "README.md" in names and any(n.startswith("docs/") for n in names), names


def test_readme_is_a_front_page():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move topics to docs/"


@pytest.mark.parametrize(
    "check", [check_links, check_paths, check_make, check_flags, check_prose_flags], ids=lambda c: c.__name__
)
def test_docs_name_only_what_exists(check):
    errors = [e for doc in doc_files(ROOT) for e in check(doc, ROOT)]
    assert not errors, "\n".join(errors)


def test_every_doc_is_reachable_from_the_readme():
    """A docs/ page no link leads to is a page nobody keeps true."""
    linked, todo = set(), [ROOT / "README.md"]
    while todo:
        doc = todo.pop()
        for target in _LINK.findall(without_code_blocks(doc.read_text())):
            path = target.partition("#")[0]
            if not path or re.match(r"^[a-z][a-z0-9+.-]*:", path):
                continue
            dest = (doc.parent / path).resolve()
            if dest.suffix == ".md" and dest.is_file() and dest not in linked:
                linked.add(dest)
                todo.append(dest)
    orphans = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"no link from README.md leads to {orphans}"


def test_every_make_target_and_knob_is_documented():
    """What a user can run or set from the Makefile and the demo script is named in some doc."""
    docs = "\n".join(p.read_text() for p in doc_files(ROOT))
    makefile = (ROOT / "Makefile").read_text()
    targets = {t for t in make_targets(ROOT / "Makefile") if not t.startswith(".")}
    knobs = set(re.findall(r"^([A-Z_]+) \?=", makefile, re.M))
    knobs |= set(re.findall(r"\$\{([A-Z_]+):[-+]", (ROOT / "recipes" / "demo.sh").read_text()))
    missing = sorted(f"make {t}" for t in targets if f"make {t}" not in docs)
    missing += sorted(k for k in knobs if not re.search(rf"\b{k}\b", docs))
    assert not missing, f"not in README.md or docs/: {missing}"


def test_named_config_docstrings_are_short_and_name_real_results():
    """A named config's docstring says what it is for and names its results file (<= 12 lines, issue 31); the
    measured history lives in that file."""
    import inspect

    from svq_fast.named_configs import CONFIGS

    errors = []
    for name, fn in CONFIGS.items():
        doc = inspect.getdoc(fn) or ""
        if len(doc.splitlines()) > 12:
            errors.append(f"{name}: docstring of {len(doc.splitlines())} lines (at most 12)")
        for rel in re.findall(r"benchmarks/results/[\w./-]*[\w/]", doc):
            if not path_exists(ROOT, rel):
                errors.append(f"{name}: names {rel}, which does not exist")
    assert not errors, "\n".join(errors)


# ------------------------------------------------------------------------------------------------ the checker


@pytest.fixture
def tmp_repo(tmp_path):
    """A copy of the docs beside links to the rest of the repository."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for entry in ROOT.iterdir():
        if entry.name in ("README.md", "docs", ".git", ".venv", "runs", "build"):
            continue
        os.symlink(entry, repo / entry.name)
    (repo / "README.md").write_text((ROOT / "README.md").read_text())
    for doc in (ROOT / "docs").rglob("*.md"):
        dest = repo / doc.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(doc.read_text())
    return repo


def _plant(repo: Path, text: str) -> None:
    readme = repo / "README.md"
    readme.write_text(readme.read_text() + "\n" + text + "\n")


def test_checker_passes_the_copy(tmp_repo):
    assert check_all(tmp_repo) == []


@pytest.mark.parametrize(
    "planted, expected",
    [
        ("See [the data page](docs/no_such_page.md).", "docs/no_such_page.md does not exist"),
        ("See [streaming](docs/data.md#no-such-heading).", "no heading with anchor #no-such-heading"),
        ("Its numbers: `benchmarks/results/no_such_run/report.md`.", "names benchmarks/results/no_such_run"),
        ("```bash\nmake no-such-target\n```", "`make no-such-target` is not a Makefile target"),
        (
            "```bash\npython recipes/sample.py --gpt x --no-such-flag 3\n```",
            "recipes/sample.py has no flag --no-such-flag",
        ),
        (
            "```bash\ndeepspeed --num_gpus 8 recipes/train_svqgan.py --config svqgan_tiny --run.no_such=1\n```",
            "--run.no_such: not a field of Stage1Config",
        ),
        ("```bash\ndeepspeed recipes/train_transformer.py --config=gpt_nope\n```", "no such named config"),
        ("Resume with `--run.resumee=auto`.", "--run.resumee is not a field"),
        ("Pass `--window-strides 4`.", "`--window-strides` is a flag of no script here"),
    ],
    ids=["link", "anchor", "path", "make", "flag", "config-field", "config-name", "prose-field", "prose-flag"],
)
def test_checker_fails_on_a_planted_error(tmp_repo, planted, expected):
    _plant(tmp_repo, planted)
    errors = check_all(tmp_repo)
    assert any(expected in e for e in errors), errors


def test_checker_fails_when_a_named_file_is_renamed(tmp_repo):
    """Rename recipes/tokenize_shards.py (which README.md names) in the copy: the checker names it."""
    (tmp_repo / "recipes").unlink()
    (tmp_repo / "recipes").mkdir()
    for entry in (ROOT / "recipes").iterdir():
        name = "tokenize_tokens.py" if entry.name == "tokenize_shards.py" else entry.name
        os.symlink(entry, tmp_repo / "recipes" / name)
    errors = check_all(tmp_repo)
    assert any("recipes/tokenize_shards.py" in e for e in errors), errors


def test_brace_and_glob_paths():
    assert path_exists(ROOT, "recipes/train_{svqgan,transformer}.py")
    assert path_exists(ROOT, "benchmarks/bench_*.py")
    assert not path_exists(ROOT, "recipes/train_{svqgan,nothing}.py")
    assert _expand_braces("a{1,2}b{x,y}") == ["a1bx", "a1by", "a2bx", "a2by"]
