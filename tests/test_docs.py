"""The documentation stays true: its code runs, its references are complete, the site builds.

* The pages' code blocks are read here (``code_blocks``, ``page_steps``) and the offline Hugging
  Face cache is made here (``hf_home``: ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the
  bundled copy); tests/test_user_journeys.py runs every ```python block of README.md,
  docs/quickstart.md and docs/migration.md with them, and compares what fastpath made there with
  plain transformers. A block whose first line is ``# NAME.ext`` is a file: it is written to the
  working directory instead of being run (``# fastpath.toml``, ``# my_script.py``).
* docs/troubleshooting.md covers every warning and error the library emits: each call site
  (``warnings.warn``, ``logger.warning/error/exception/critical/log``, the warn-once helpers,
  ``raise SomeError(...)``, CLI ``print(..., file=sys.stderr)``) must be matched by a message
  phrase in the first column of a ``| message |`` table, and every such phrase must still
  match a call site.
* docs/policy.md documents every policy setting and match key; every policy example in the
  docs is a valid policy.
* ``mkdocs build --strict`` succeeds and the nav lists every page.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

DOCS = REPO / "docs"
SOURCE = REPO / "transformers_fastpath"
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
FAKE_COMMIT = "0f" * 20  # any 40-hex string: the cache's snapshot name, which refs/main points to

# -- markdown -------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~)[ \t]*([\w+-]*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
_FILE_MARK = re.compile(r"#\s*([\w.-]+\.(?:py|toml|json|txt))\s*$")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the block's first code line in the page

    @property
    def file_name(self) -> str | None:
        """``# fastpath.toml`` / ``# my_script.py`` on the first line: the block is that file."""
        first = self.code.split("\n", 1)[0]
        match = _FILE_MARK.fullmatch(first.strip())
        return match.group(1) if match else None


def code_blocks(text: str) -> list[Block]:
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start(3)) + 1
        blocks.append(Block(match.group(2).lower(), match.group(3), line))
    return blocks


# -- running pages ---------------------------------------------------------------------------

def page_steps(page: Path) -> list[dict[str, object]]:
    steps = []
    for block in code_blocks(page.read_text()):
        name = block.file_name
        if block.lang == "python" or (name and block.lang in ("toml", "json", "text", "")):
            steps.append({"file": name, "code": block.code, "line": block.line})
    assert any(not s["file"] for s in steps), f"{page.name} has no python block to run"
    return steps


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An offline Hugging Face cache where ``HUB_ID`` resolves to the bundled all-MiniLM-L6-v2."""
    from conftest import minilm_path

    return make_hf_home(tmp_path_factory.mktemp("hf_home"), minilm_path())


def make_hf_home(home: Path, source: Path) -> Path:
    """An offline Hugging Face cache in ``home`` where ``HUB_ID`` resolves to the model directory ``source``."""
    repo = home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    for item in source.iterdir():
        (snapshot / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    return home


def offline_env(hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_FASTPATH", "HF_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


# -- README ---------------------------------------------------------------------------------------

def test_readme_starts_with_the_setup_and_test_commands() -> None:
    readme = (REPO / "README.md").read_text()
    first = code_blocks(readme)[0]
    assert first.lang == "bash" and readme.index("```") < readme.index("\n## "), "README must open with the commands"
    commands = [line for line in first.code.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    setup, tests = commands
    assert 'pip install -e ".[dev]"' in setup and "transformers-fastpath bench feature-extraction" in setup
    assert "python -m pytest" in tests
    from transformers_fastpath.bench import WORKLOADS

    assert "feature-extraction" in WORKLOADS


# Written by a benchmark script, not by hand: README references it before the first run.
GENERATED = {"docs/charts/headline.png"}


def test_readme_links_point_to_files() -> None:
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert GENERATED <= set(targets), "README.md must show the headline chart"
    for target in targets:
        if "://" not in target and target not in GENERATED:
            assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"


# -- policy reference ------------------------------------------------------------------------------

def test_policy_reference_documents_every_setting_and_match_key() -> None:
    from transformers_fastpath.planning.policy.schema import MATCH_KEYS, SETTINGS

    doc = (DOCS / "policy.md").read_text()
    section = re.search(r"^## Settings\n(.*?)(?=^## |\Z)", doc, re.M | re.S)
    assert section, "docs/policy.md has no '## Settings' section"
    rows = {m.group(1) for m in re.finditer(r"^\| `(\w+)` \|", section.group(1), re.M)}
    assert set(SETTINGS) - rows == set(), f"docs/policy.md '## Settings' has no row for {sorted(set(SETTINGS) - rows)}"
    assert rows - set(SETTINGS) == set(), f"docs/policy.md documents settings that do not exist: {sorted(rows - set(SETTINGS))}"
    for key in MATCH_KEYS:
        assert f"`{key}`" in doc, f"docs/policy.md does not document the match condition {key!r}"


def _policy_examples() -> Iterator[tuple[str, Block]]:
    for page in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        for block in code_blocks(page.read_text()):
            if block.lang == "toml" and re.search(r"^\[\[?(defaults|rules|tool\.transformers-fastpath)", block.code, re.M):
                yield page.name, block


def test_policy_examples_in_the_docs_are_valid() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the package depends on tomli there
        import tomli as tomllib

    from transformers_fastpath import PolicyError, load_policy

    examples = list(_policy_examples())
    assert len(examples) >= 5
    for page, block in examples:
        data = tomllib.loads(block.code)
        data = data.get("tool", {}).get("transformers-fastpath", data)
        assert data, f"{page}:{block.line}: empty policy example"
        try:
            load_policy(data)
        except PolicyError as exc:
            pytest.fail(f"the policy example at {page}:{block.line} is invalid: {exc}")


# -- troubleshooting: every warning and error is documented -----------------------------------------

# Helpers that emit a message their caller words: (file, qualname) -> which argument is the
# message. The call inside a helper is not a site; each call *to* it (from its own module, or
# one that imports it by name) is.
WARN_WRAPPERS: dict[tuple[str, str], int] = {
    ("loading/quantization.py", "warn_once"): 0,
    ("interception/bootstrap.py", "_warn_once"): 0,
    ("plugins.py", "_warn_env"): 0,
    ("passes/sdpa_backends.py", "BackendChain._log_once"): 0,
    ("cli.py", "_cmd_explain.fail"): 0,
    ("cli.py", "_Parser.error"): 0,  # parser.error(...): argparse-style usage errors
    ("pipelines/resilience.py", "_add_note"): 1,  # PEP 678 notes added to the user's exception
}
LOG_LEVEL_METHODS = {"warning", "warn", "error", "exception", "critical", "fatal"}
LOGGERS = {"logger", "log", "_logger", "LOGGER", "logging"}
# Raised but never shown as such to a user, with the reason.
NOT_USER_FACING = {
    "AttributeError": "Python's attribute protocol (module __getattr__) and a layout lookup that the "
                      "fused pass turns into a PassSkipped reason",
    "MaskRejected": "per-call fallback reasons of the fused encoder, counted in runtime_of(model).stats "
                    "and listed in docs/fused-encoder.md ('When the original forward runs')",
    "_NotPerInput": "control flow inside pipelines/resilience.py, caught in the same module",
}
MIN_PHRASE = 12  # characters of literal text a documented phrase must pin down
HOLE = "\x00"  # a formatted value inside a message template
PARAM = "\x01"  # where a helper puts its caller's message


@dataclass(frozen=True)
class Site:
    path: str  # relative to transformers_fastpath/
    line: int
    function: str
    kind: str  # "warnings.warn", "logger.warning", "raise PolicyError", "stderr print"...
    template: str  # literal text, HOLE where a value is formatted in
    origin: str = ""  # where the text is worded, when not at the call (a helper's return)
    passthrough: bool = False  # re-raises or re-logs the text of a caught exception

    @property
    def where(self) -> str:
        via = f", worded at transformers_fastpath/{self.origin}" if self.origin else ""
        return f"transformers_fastpath/{self.path}:{self.line} ({self.function}, {self.kind}{via})"


class _Scanner:
    """Reads message templates out of the package's AST.

    A message expression yields one or more (template, origin) alternatives: string literals,
    f-strings and ``%`` formats give their literal text with HOLE for values; ``a or b`` gives
    the alternatives of both; a local name gives what it was last assigned before the call; a
    call of a package function that returns reasons (``reason = config_reason(config)``) gives
    each of its ``return``s, worded in that function.
    """

    def __init__(self) -> None:
        self.trees = {str(p.relative_to(SOURCE)): ast.parse(p.read_text(), str(p))
                      for p in sorted(SOURCE.rglob("*.py"))}
        self.functions: dict[str, tuple[str, ast.FunctionDef]] = {}
        for path, tree in self.trees.items():
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef):
                    self.functions.setdefault(node.name, (path, node))
        self._caught_cache: dict[int, set[str]] = {}
        self.constants = {path: {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                                 for t in n.targets if isinstance(t, ast.Name)}
                          for path, tree in self.trees.items()}
        self.class_templates = self._class_templates()

    def alternatives(self, node: ast.AST | None, scope: ast.AST | None, before: int, path: str,
                     depth: int = 0) -> list[tuple[str, str]]:
        if node is None:
            return [("", "")]
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, str):
                return [(HOLE, "")]
            return [(re.sub(r"%[-#0 +]*\d*(?:\.\d+)?[sdrfigx]", HOLE, node.value), "")]
        if isinstance(node, ast.JoinedStr):
            parts = []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    parts.append(value.value)
                else:  # a local string built just above ({_disabled_reason}) is part of the wording
                    inner = value.value if isinstance(value, ast.FormattedValue) else value
                    parts.append(self._local_string(inner, scope, before, path, depth) or HOLE)
            return [("".join(parts), "")]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
            left = self.alternatives(node.left, scope, before, path, depth)
            right = self.alternatives(node.right, scope, before, path, depth)
            return [(a + b, oa or ob) for a, oa in left for b, ob in right]
        if isinstance(node, ast.BoolOp):  # reason or f"...": either may be the message
            return [alt for value in node.values for alt in self.alternatives(value, scope, before, path, depth)]
        if depth >= 3:
            return [(HOLE, "")]
        if isinstance(node, ast.Name) and scope is not None:
            assigned = [n for n in ast.walk(scope) if isinstance(n, ast.Assign) and n.lineno < before
                        and any(isinstance(t, ast.Name) and t.id == node.id for t in n.targets)]
            if assigned:
                last = max(assigned, key=lambda n: n.lineno)
                return self.alternatives(last.value, scope, last.lineno, path, depth + 1)
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in self.functions and name != "str":
                fpath, func = self.functions[name]
                found = []
                for ret in (n for n in ast.walk(func) if isinstance(n, ast.Return) and n.value is not None):
                    if isinstance(ret.value, ast.Constant) and ret.value.value is None:
                        continue
                    for text, origin in self.alternatives(ret.value, func, ret.lineno, fpath, depth + 1):
                        found.append((text, origin or f"{fpath}:{ret.lineno} ({name})"))
                if found:
                    return found
        return [(HOLE, "")]

    def _wrapper_template(self, path: str, qualname: str, index: int) -> str:
        """What a helper says around its caller's message, PARAM where that message goes
        (``"transformers-fastpath explain: PARAM"``)."""
        node: ast.AST = self.trees[path]
        for name in qualname.split("."):
            node = next(n for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
        params = [a.arg for a in node.args.args if a.arg not in ("self", "cls")]  # type: ignore[attr-defined]
        param = params[index] if index < len(params) else None

        def mentions(expr: ast.AST) -> bool:
            return any(isinstance(n, ast.Name) and n.id == param for n in ast.walk(expr))

        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            found = _emitter(call)
            if found is None or found[1] is None:
                continue
            kind, message = found
            if isinstance(message, ast.Name) and message.id == param:
                return PARAM
            if isinstance(message, ast.JoinedStr):
                return "".join(v.value if isinstance(v, ast.Constant) else PARAM if mentions(v) else HOLE
                               for v in message.values)
            if isinstance(message, ast.Constant) and isinstance(message.value, str):  # logger "%s" formatting
                values = call.args[2:] if kind == "logger.log" else call.args[1:]
                pieces = re.split(r"%[-#0 +]*\d*(?:\.\d+)?[sdrfigx]", message.value)
                out = pieces[0]
                for i, piece in enumerate(pieces[1:]):
                    out += (PARAM if i < len(values) and mentions(values[i]) else HOLE) + piece
                return out
            return self.alternatives(message, node, call.lineno, path)[0][0]
        return ""

    def _caught(self, scope: ast.AST | None) -> set[str]:
        """Names bound by ``except ... as NAME`` in the function (cached per function)."""
        if scope is None:
            return set()
        if id(scope) not in self._caught_cache:
            self._caught_cache[id(scope)] = {h.name for h in ast.walk(scope)
                                             if isinstance(h, ast.ExceptHandler) and h.name}
        return self._caught_cache[id(scope)]

    def _local_string(self, node: ast.AST, scope: ast.AST | None, before: int, path: str, depth: int) -> str:
        """The text of a name last assigned a string expression in the same function, else ''."""
        if not isinstance(node, ast.Name) or depth >= 3:
            return ""
        assigned = [n for n in ast.walk(scope) if isinstance(n, ast.Assign) and n.lineno < before
                    and any(isinstance(t, ast.Name) and t.id == node.id for t in n.targets)] if scope else []
        if not assigned:  # a module constant: ENV_SWITCH = "TRANSFORMERS_FASTPATH"
            constant = self.constants.get(path, {}).get(node.id)
            return constant or ""
        last = max(assigned, key=lambda n: n.lineno)
        if not isinstance(last.value, (ast.Constant, ast.JoinedStr, ast.BinOp)):
            return ""
        return self.alternatives(last.value, scope, last.lineno, path, depth + 1)[0][0]

    def _class_templates(self) -> dict[str, str]:
        """Exception classes of the package whose ``__init__`` words the message: their template."""
        found = {}
        for path, tree in self.trees.items():
            for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
                init = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
                for call in (n for n in ast.walk(init) if isinstance(n, ast.Call)) if init else ():
                    if isinstance(call.func, ast.Attribute) and call.func.attr == "__init__" and call.args:
                        text = self.alternatives(call.args[0], init, call.lineno, path)[0][0]
                        if _literal_length(text) >= MIN_PHRASE:
                            found[cls.name] = text
        return found

    def sites(self) -> list[Site]:
        sites: list[Site] = []
        for path, tree in self.trees.items():
            owner_of: dict[int, tuple[ast.AST, str]] = {}

            def visit(node: ast.AST, qualname: str, scope: ast.AST | None) -> None:
                for child in ast.iter_child_nodes(node):
                    name, inner = qualname, scope
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        name = child.name if qualname == "<module>" else f"{qualname}.{child.name}"
                        if not isinstance(child, ast.ClassDef):
                            inner = child
                    if inner is not None:
                        owner_of[id(child)] = (inner, name)
                    visit(child, name, inner)

            visit(tree, "<module>", None)
            imported = {alias.asname or alias.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        for alias in n.names}
            wrappers = {qual.rsplit(".", 1)[-1]: (index, self._wrapper_template(file, qual, index))
                        for (file, qual), index in WARN_WRAPPERS.items()
                        if file == path or qual.rsplit(".", 1)[-1] in imported}
            inside = {qual for file, qual in WARN_WRAPPERS if file == path}
            for node in ast.walk(tree):
                scope, function = owner_of.get(id(node), (None, "<module>"))
                sites.extend(self._site(path, node, scope, function, wrappers, inside))
        return sites

    def _site(self, path: str, node: ast.AST, scope: ast.AST | None, function: str, wrappers: dict[str, int],
              inside: set[str]) -> list[Site]:
        if not isinstance(node, (ast.Raise, ast.Call)):
            return []
        caught = self._caught(scope)
        extra = ""
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            _, cls = _callee(node.exc)
            args = [*node.exc.args, *(k.value for k in node.exc.keywords)]
            if not cls or cls in NOT_USER_FACING:
                return []
            if cls == "SystemExit" and all(isinstance(a, ast.Constant) and isinstance(a.value, int) for a in args):
                return []  # an exit status, not a message
            kind = f"raise {cls}"
            message = args[0] if args else None
            # the other arguments (key=, allowed=...) are worded into the message too
            extra = HOLE.join(self.alternatives(a, scope, node.lineno, path)[0][0] for a in args[1:]
                              if not _is_passthrough(a, caught))
            prefix = self.class_templates.get(cls, "")
        elif isinstance(node, ast.Call):
            if function in inside:
                return []  # the helper's own call: its callers are the sites
            _, attr = _callee(node)
            if attr in wrappers:
                index, prefix = wrappers[attr]
                kind, message = attr, node.args[index] if len(node.args) > index else None
            else:
                found = _emitter(node)
                if found is None:
                    return []
                (kind, message), prefix = found, ""
        else:
            return []
        if _is_passthrough(message, caught) and not prefix:
            return [Site(path, node.lineno, function, kind, "", passthrough=True)]
        alts = [] if _is_passthrough(message, caught) else self.alternatives(message, scope, node.lineno, path)
        worded = [(t, o) for t, o in alts if _literal_length(t) >= MIN_PHRASE] or [(HOLE.join(t for t, _ in alts), "")]
        return [Site(path, node.lineno, function, kind, HOLE.join(x for x in (_wrap(prefix, text), extra) if x), origin)
                for text, origin in worded]


def _emitter(call: ast.Call) -> tuple[str, ast.AST | None] | None:
    """(kind, message expression) when ``call`` warns, logs a warning or worse, adds a note to an
    exception, or prints to stderr; else None."""
    owner, attr = _callee(call)
    args = call.args
    if (owner, attr) == ("warnings", "warn"):
        return "warnings.warn", args[0] if args else None
    if owner in LOGGERS and attr in LOG_LEVEL_METHODS:
        return f"logger.{attr}", args[0] if args else None
    if owner in LOGGERS and attr == "log":
        return "logger.log", args[1] if len(args) > 1 else None
    if attr == "add_note":
        return "add_note", args[0] if args else None
    if attr == "print" and any(k.arg == "file" and ast.unparse(k.value) == "sys.stderr" for k in call.keywords):
        return "stderr print", args[0] if args else None
    return None


def _wrap(outer: str, message: str) -> str:
    """A helper's or exception class's wording around the caller's message."""
    if not outer:
        return message
    if PARAM in outer:
        return outer.replace(PARAM, message, 1).replace(PARAM, HOLE)
    return outer + HOLE + message if message else outer


def _literal_length(template: str) -> int:
    return len(re.sub(r"\s+", " ", template.replace(HOLE, "")).strip())


def _is_passthrough(node: ast.AST | None, caught: set[str]) -> bool:
    """``str(exc)`` / ``exc.problem`` of an exception caught in the same function."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "str" and node.args:
        node = node.args[0]
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id in caught


def _callee(call: ast.Call) -> tuple[str, str]:
    func = call.func
    if isinstance(func, ast.Name):
        return "", func.id
    if isinstance(func, ast.Attribute):
        owner = func.value
        return (owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)), func.attr
    return "", ""


@functools.cache
def message_sites() -> tuple[Site, ...]:
    return tuple(_Scanner().sites())


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class Phrase:
    text: str  # as written in the doc, "…" standing for any value
    line: int
    files: tuple[str, ...] = ()  # the row's "from" column: the message comes from one of these

    def pattern(self) -> re.Pattern[str]:
        pieces = [_norm(p) for p in self.text.split("…")]
        return re.compile(".*?".join(re.escape(p) for p in pieces if p), re.S)

    @property
    def literal_length(self) -> int:
        return sum(len(p.strip()) for p in self.text.split("…"))


def documented_phrases() -> list[Phrase]:
    """Code spans in the first column of every table whose header's first cell is 'message'."""
    lines = (DOCS / "troubleshooting.md").read_text().splitlines()
    phrases, in_table, header = [], False, False
    for number, line in enumerate(lines, 1):
        if not line.startswith("|"):
            in_table = False
            continue
        cells = re.split(r"(?<!\\)\|", line)[1:-1]
        first = cells[0].strip() if cells else ""
        if not in_table:
            in_table = first.lower() == "message"
            header = True
            continue
        if header or re.fullmatch(r":?-+:?", first):
            header = False
            continue
        files = tuple(f for f in re.findall(r"`([\w/]+\.py)`", cells[1])) if len(cells) > 1 else ()
        for span in re.findall(r"`([^`]+)`", first):
            phrases.append(Phrase(span.replace("\\|", "|"), number, files))
    return phrases


def _matches(phrase: Phrase, site: Site) -> bool:
    if phrase.files and site.path not in phrase.files and site.origin.split(":")[0] not in phrase.files:
        return False
    return bool(site.template) and phrase.pattern().search(_norm(site.template)) is not None


def test_message_scanner_finds_the_known_kinds_of_site() -> None:
    """The scan itself is not vacuous: known sites of each kind are found, with their text."""
    sites = message_sites()
    assert len(sites) >= 60
    kinds = {s.kind for s in sites}
    for kind in ("warnings.warn", "logger.warning", "raise PolicyError", "raise StrictModeError",
                 "raise PassSkipped", "stderr print"):
        assert kind in kinds, f"the scanner found no {kind!r} site"
    assert kinds & {qual.rsplit(".", 1)[-1] for _, qual in WARN_WRAPPERS}, "the scanner found no helper call"
    assert any(s.origin for s in sites), "the scanner followed no reason-returning helper (config_reason...)"
    runner = [s for s in sites if s.path == "passes/runner.py" and s.kind == "logger.warning"]
    assert any("rolled back" in s.template for s in runner)


def test_troubleshooting_covers_every_warning_and_error() -> None:
    phrases = [p for p in documented_phrases() if p.literal_length >= MIN_PHRASE]
    assert len(phrases) >= 40, "docs/troubleshooting.md: no '| message | ...' tables found"
    missing, unreadable = [], []
    for site in message_sites():
        if site.passthrough:
            continue  # the caught exception's own raise site is checked
        if _literal_length(site.template) < MIN_PHRASE:
            unreadable.append(site)
        elif not any(_matches(p, site) for p in phrases):
            missing.append(site)
    report = [f"  {s.where}\n      message: {_norm(s.template).replace(HOLE, '…')!r}" for s in missing]
    report += [f"  {s.where}\n      message has no literal text to document: word it in the call, or add the "
               f"helper that words it to WARN_WRAPPERS in tests/test_docs.py" for s in unreadable]
    assert not report, (
        "docs/troubleshooting.md does not cover these messages. Add a row to the table of the matching "
        "area: first column a code span quoting part of the message ('…' for the variable parts, at least "
        f"{MIN_PHRASE} literal characters), then where it comes from, what it means and what to do:\n"
        + "\n".join(report))


def test_troubleshooting_rows_still_match_a_message() -> None:
    sites = message_sites()
    stale = [p for p in documented_phrases() if not any(_matches(p, s) for s in sites)]
    short = [p for p in documented_phrases() if p.literal_length < MIN_PHRASE]
    assert not stale, "docs/troubleshooting.md quotes messages the code no longer emits:\n" + "\n".join(
        f"  line {p.line}: `{p.text}`" for p in stale)
    assert not short, "docs/troubleshooting.md phrases too short to identify a message:\n" + "\n".join(
        f"  line {p.line}: `{p.text}`" for p in short)


# -- the docs site ---------------------------------------------------------------------------------

def _nav_pages(config_text: str) -> set[str]:
    return set(re.findall(r":\s*([\w./-]+\.md)\s*$", config_text, re.M))


def test_mkdocs_nav_lists_every_page() -> None:
    nav = _nav_pages((REPO / "mkdocs.yml").read_text())
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages - nav == set(), f"mkdocs.yml nav misses {sorted(pages - nav)}"
    assert nav - pages == set(), f"mkdocs.yml nav lists missing pages {sorted(nav - pages)}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is in the [dev] / [docs] extras")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, proc.stderr
    assert (tmp_path / "site" / "quickstart" / "index.html").is_file()
