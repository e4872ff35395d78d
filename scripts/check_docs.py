#!/usr/bin/env python3
"""Docs that stay true: every name README.md and docs/ give must exist.

``bash scripts/check.sh`` runs it; by hand: ``.venv/bin/python scripts/check_docs.py [FILE.md ...]``
(no argument: README.md and every ``docs/**/*.md``).  Each problem is printed as
``file:line: what``; the exit status is 1 when there is any.  No server is asked.

The names are taken from the code, never from a list kept by hand:

- **CLI** (``orders VERB [SUBVERB] --option``): the typer app of :mod:`worker.cli`, through
  ``typer.main.get_command``.  Checked where ``orders`` stands in a command's place: at the start
  of a code span or of a shell line in a code block, after ``&&``/``|``/``;``/``$(``, after
  ``VAR=value`` assignments and cron fields, or as ``.venv/bin/orders``.
- **settings**: ``section.key`` in code spans and code blocks, against :class:`worker.settings.Settings`
  and its sections' fields; ``ORDERS_SECTION__KEY`` and whole-value ``ORDERS_KEY`` (``ORDERS_SENDERS``,
  ``ORDERS_ENVIRONMENT``) anywhere; other ``ORDERS_*`` variables (``ORDERS_CONFIG``, the tests'
  switches) must appear in the repository's code or scripts.
- **queues, exchanges, routing keys**: a dotted code token whose first part is a settings section, a
  contract name's first part (``orders``, ``order``, ``stock``, ``payment``, ``command``) or a table
  must be one of: a setting, a name of :mod:`schema.topology`, :mod:`schema.messages` or
  :mod:`worker.rabbit` (the event routing keys included), a delay queue of the default tiers, a
  column of :mod:`schema.tables` (``orders.currency``), a span attribute of :mod:`worker.tracing`
  (``orders.order_id``), or a field path of a message or HTTP model (``payment.amount_refunded``).
- **Python names**: a dotted code token starting with ``worker.``, ``handlers.``, ``schema.``,
  ``scripts.`` or ``tests.`` (``worker.handled.handled_from``) names a module, and then a name it
  defines, and then a member of that class (read from the source, nothing imported).
- **HTTP paths of the shim**: ``METHOD /path`` code spans, code spans that are a path whose first
  segment is one of the shim's (``/orders``, ``/console``, ``/healthz``...), and URLs on
  ``localhost:8000``/``127.0.0.1:8000``: against the routes of :func:`worker.shim.app.create_app`
  built on the development settings (``{id}``, ``<id>``, ``$ORDER`` and ``…`` match a parameter).
- **files**: words of code spans and code blocks that are a repository path (``a/b.py``,
  ``deploy/k8s/``: a ``/`` and an extension, or a trailing ``/``), a bare file name with an
  extension (``place_order.py``: some file of that name), every ``*.md`` name (also in prose), and
  relative markdown links with their ``#anchors`` (GitHub's heading slugs).  Absolute paths, URLs
  and ``shared/``/``../shared/`` (the shared folder beside the repository) are not the repository's.

What is not a name is left alone: prose words, single words in code spans (``pending``,
``relay``), metric names, other programs' commands and paths.  Deliberate mentions of things that
do not exist go in :data:`ALLOWED`, each with its reason.
"""

from __future__ import annotations

import ast
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: deliberate mentions of names that do not exist (exact token as written -> why it is fine)
ALLOWED: dict[str, str] = {
    # PayPal's own REST API, named where reconcile and the capture lookups are explained
    "GET /v2/payments/captures/{id}": "PayPal's endpoint, not the shim's",
}

#: extensions that make a code word with a ``/`` a repository path
FILE_EXTENSIONS = frozenset(
    "py sh md yml yaml json toml cfg ini txt html css js mako conf png svg csv sql lock".split()
)
#: extensions that make a bare code word (no ``/``) a file of the repository; ``pg_hba.conf``,
#: ``users.sh`` written by a recipe or ``orders.env`` made by the operator are other files
BARE_FILE_EXTENSIONS = frozenset("py sh md yml yaml json toml cfg html mako".split())
#: Python packages of the repository: a dotted token starting with one is a module path
PACKAGES = ("worker", "handlers", "schema", "scripts", "tests")
#: first parts of the contract's dotted names (queues, exchanges, routing keys)
CONTRACT_PREFIXES = frozenset({"orders", "order", "stock", "payment", "command"})
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
SHELL_LANGUAGES = frozenset({"", "sh", "bash", "shell", "console", "text"})
SKIPPED_DIRS = frozenset({".git", ".venv", "venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"})


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class Command:
    """One verb of the CLI: its options and, for a group, its subverbs."""

    options: frozenset[str]
    subcommands: dict[str, Command] = field(default_factory=dict)


@dataclass
class Names:
    """Everything a doc may name, taken from the code."""

    cli: Command
    #: section -> its keys; a top-level setting that is not a section maps to None
    settings: dict[str, frozenset[str] | None]
    #: ``ORDERS_*`` names the repository's code and scripts use (not settings)
    code_env: frozenset[str]
    #: dotted names that exist: settings, contract names, columns, span attributes, model field paths
    dotted: frozenset[str]
    #: first parts of the dotted names that are checked
    dotted_prefixes: frozenset[str]
    #: (methods, path) of every shim route
    routes: tuple[tuple[frozenset[str], str], ...]
    root: Path = ROOT
    #: every file and directory name in the repository (for bare names)
    basenames: frozenset[str] = frozenset()

    @property
    def route_prefixes(self) -> frozenset[str]:
        return frozenset(p.split("/")[1] for _, p in self.routes if p.count("/") >= 1 and p != "/")


# -- collecting the names -----------------------------------------------------------------


def _cli_tree(cmd: Any) -> Command:
    options = {"--help"}
    for param in cmd.params:
        if param.param_type_name == "option":
            options.update(param.opts)
            options.update(param.secondary_opts)
    subs = {name: _cli_tree(sub) for name, sub in (getattr(cmd, "commands", None) or {}).items()}
    return Command(frozenset(options), subs)


def _strings(value: Any, depth: int = 0) -> Iterator[str]:
    """Every string in a module-level value: constants, tuples, sets, dicts, dataclasses (routes)."""
    if depth > 3:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k, depth + 1)
            yield from _strings(v, depth + 1)
    elif isinstance(value, tuple | list | set | frozenset):
        for v in value:
            yield from _strings(v, depth + 1)
    elif hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        for name in value.__dataclass_fields__:
            yield from _strings(getattr(value, name), depth + 1)


def _module_strings(*modules: Any) -> set[str]:
    out: set[str] = set()
    for module in modules:
        for name, value in vars(module).items():
            if not name.startswith("__"):
                out.update(_strings(value))
    return out


def _model_field_paths(*modules: Any) -> set[str]:
    """``field.subfield`` of every pydantic model defined in the modules (``payment.amount_refunded``)."""
    import typing

    from pydantic import BaseModel

    def models_in(annotation: Any) -> Iterator[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield annotation
        for arg in typing.get_args(annotation):
            yield from models_in(arg)

    out: set[str] = set()
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == module.__name__:
                for name, info in value.model_fields.items():
                    for sub in models_in(info.annotation):
                        out.update(f"{name}.{key}" for key in sub.model_fields)
    return out


def _tracing_attributes() -> set[str]:
    tree = ast.parse((ROOT / "worker" / "tracing.py").read_text(encoding="utf-8"))
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", n.value)
    }


def _routes(app: Any) -> list[tuple[frozenset[str], str]]:
    """(methods, path) of every route, through included routers (FastAPI keeps them nested or flat)."""
    out: list[tuple[frozenset[str], str]] = []

    def walk(routes: Iterable[Any], prefix: str) -> None:
        for r in routes:
            nested = getattr(r, "original_router", None)
            if nested is not None:
                context = getattr(r, "include_context", None)
                walk(nested.routes, prefix + (getattr(context, "prefix", "") or ""))
            elif hasattr(r, "path"):
                methods = frozenset(getattr(r, "methods", None) or ())
                out.append((methods, prefix + r.path))
                # a Mount (``/static``) serves everything under it
                if getattr(r, "routes", None) is not None and not methods:
                    out.append((frozenset(), prefix + r.path + "/{rest:path}"))

    walk(app.routes, "")
    return out


def _code_env_names(root: Path) -> set[str]:
    """``ORDERS_*`` names the code and scripts read or set (the docs are not asked)."""
    names: set[str] = set()
    places = [root / d for d in ("worker", "handlers", "schema", "scripts", "tests", "deploy", "config")]
    files = [p for d in places if d.is_dir() for p in d.rglob("*") if p.is_file()]
    files += [root / f for f in ("Dockerfile", "compose.yml", "Procfile", "Procfile.local", "setup.cfg")]
    mine = {Path(__file__).resolve(), root / "tests" / "unit" / "test_check_docs.py"}  # they name broken ones
    for path in files:
        if path.suffix in {".py", ".sh", ".yml", ".yaml", ".cfg", ""} and path.is_file() and path not in mine:
            names.update(re.findall(r"ORDERS_[A-Z0-9_]+", path.read_text(encoding="utf-8", errors="replace")))
    return names


def _basenames(root: Path) -> set[str]:
    out: set[str] = set()
    stack = [root]
    while stack:
        directory = stack.pop()
        for entry in directory.iterdir():
            if entry.name in SKIPPED_DIRS:
                continue
            out.add(entry.name)
            if entry.is_dir():
                stack.append(entry)
    return out


def collect_names(root: Path = ROOT) -> Names:
    """The names of the code as it is (imports the CLI, the settings and the shim; no server)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the libraries' deprecation notes are not the docs' problems
        return _collect_names(root)


def _collect_names(root: Path) -> Names:
    import typer
    from pydantic import BaseModel

    import schema.messages
    import schema.tables
    import schema.topology
    import worker.rabbit.dead_letters
    import worker.rabbit.topology
    import worker.shim.models
    from worker.cli import app as cli_app
    from worker.settings import Settings, WorkerSettings, load_settings
    from worker.shim.app import create_app

    settings: dict[str, frozenset[str] | None] = {}
    dotted: set[str] = set()
    for name, info in Settings.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            settings[name] = frozenset(annotation.model_fields)
            dotted.update(f"{name}.{key}" for key in annotation.model_fields)
        else:
            settings[name] = None

    contract = _module_strings(schema.topology, schema.messages, worker.rabbit.topology, worker.rabbit.dead_letters)
    contract.update(schema.topology.delay_queue(s) for s in WorkerSettings.model_fields["retry_delays_seconds"].default)
    dotted.update(contract)
    tables = schema.tables.metadata.tables.values()
    dotted.update(f"{t.name}.{c.name}" for t in tables for c in t.columns)
    dotted.update(_tracing_attributes())
    dotted.update(_model_field_paths(schema.messages, worker.shim.models))

    app = create_app(load_settings(environ={"ORDERS_ENVIRONMENT": "development"}))
    return Names(
        cli=_cli_tree(typer.main.get_command(cli_app)),
        settings=settings,
        code_env=frozenset(_code_env_names(root)),
        dotted=frozenset(dotted),
        dotted_prefixes=frozenset(settings) | CONTRACT_PREFIXES | {t.name for t in tables},
        routes=tuple(_routes(app)),
        root=root,
        basenames=frozenset(_basenames(root)),
    )


# -- reading the markdown -----------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
#: an inline code span: one backtick pair (the docs use no double-backtick spans), not across a blank line
CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+(?:\n(?!\s*\n)[^`\n]*)*?)`(?!`)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@dataclass
class Doc:
    """A markdown file split into what is checked how."""

    path: str
    #: (line, text, language) of every line inside a fenced block
    block_lines: list[tuple[int, str, str]]
    #: (line, text) of every inline code span
    spans: list[tuple[int, str]]
    #: (line, target) of every markdown link outside code
    links: list[tuple[int, str]]
    #: (line, text) of every line, code masked out (for bare *.md names)
    prose: list[tuple[int, str]]
    #: GitHub anchors of its headings
    anchors: set[str]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def parse(path: str, text: str) -> Doc:
    lines = text.split("\n")
    masked: list[str] = []
    block_lines: list[tuple[int, str, str]] = []
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fence: str | None = None
    language = ""
    for number, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, language = m.group(1), m.group(2).lower()
            masked.append("")
            continue
        if fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            else:
                block_lines.append((number, line, language))
            masked.append("")
            continue
        masked.append(line)
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            anchors.add(base if n == 0 else f"{base}-{n}")
    body = "\n".join(masked)
    spans: list[tuple[int, str]] = []
    for m in CODE_SPAN.finditer(body):
        spans.append((body.count("\n", 0, m.start()) + 1, re.sub(r"\s*\n\s*", " ", m.group(1))))
    no_code = CODE_SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), body)
    links = [(no_code.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(no_code)]
    prose = list(enumerate(no_code.split("\n"), 1))
    return Doc(path, block_lines, spans, links, prose, anchors)


# -- the checks -----------------------------------------------------------------------------------

ENV = re.compile(r"\bORDERS_[A-Z0-9_<>*]*[A-Z0-9>*]")
DOTTED = re.compile(r"(?<![\w./:@$=-])[A-Za-z_]\w*(?:\.[\w<>{}*-]*[\w>}*])+")
PLACEHOLDER = re.compile(r"<[^<>]*>|\{[^{}]*\}|\*|…|\$\{?\w+\}?")
URL_PATH = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1):8000(/[^\s\"'`)>,;]*)?")
WORD_TRIM = "\"'`()[]{},;:!?"


def _pattern(token: str, wildcard: str) -> re.Pattern[str]:
    """A token with placeholders (``<n>``, ``{id}``, ``*``, ``…``, ``$VAR``) as a regex."""
    parts = PLACEHOLDER.split(token)
    return re.compile(wildcard.join(re.escape(p) for p in parts))


def _has_placeholder(token: str) -> bool:
    return bool(PLACEHOLDER.search(token))


def check_env(name: str, names: Names) -> str | None:
    """Why ``ORDERS_…`` names nothing; None when it names a setting or a variable the code uses."""
    if name in ALLOWED:
        return None
    settings = set()
    for section, keys in names.settings.items():
        if keys is None:
            settings.add(f"ORDERS_{section.upper()}")
        else:
            settings.update(f"ORDERS_{section.upper()}__{key.upper()}" for key in keys)
    sectioned = "__" in name or "<SECTION>" in name
    # ORDERS_SECTION__KEY is a setting or nothing; other names may also be a variable the code reads
    known = settings if sectioned else settings | names.code_env
    if _has_placeholder(name):
        pattern = _pattern(name, "[A-Z0-9_]+")
        if any(pattern.fullmatch(k) for k in known):
            return None
        return f"{name} matches no setting{'' if sectioned else ' or variable of the code'}"
    if name in known:
        return None
    if sectioned:
        section, _, key = name.removeprefix("ORDERS_").lower().partition("__")
        if names.settings.get(section) is None:
            return f"{name}: no settings section {section!r}"
        return f"{name}: settings section {section!r} has no key {key!r}"
    # a prefix the code completes (ORDERS_PASSWORD_ + a user's name); not ORDERS_ itself
    prefixes = [k for k in names.code_env if k.endswith("_") and "__" not in k and k != "ORDERS_"]
    if any(name.startswith(k) and len(name) > len(k) for k in prefixes):
        return None
    return f"{name} is no setting (ORDERS_SECTION__KEY, or a whole one: ORDERS_SENDERS) and no variable the code reads"


def check_dotted(token: str, names: Names, argument: bool = False) -> str | None:
    """Why a dotted code token names nothing; None when it exists or is not one of ours.

    ``argument``: the token is an argument of a call in an example (``fresh_database(settings.database)``),
    a variable's attribute rather than a module's name, so it is not looked for as a module.
    """
    first = token.split(".", 1)[0]
    if token in ALLOWED:
        return None
    if token.rsplit(".", 1)[-1].lower() in FILE_EXTENSIONS:
        return None  # a file name (checked as one)
    if first in PACKAGES:
        if first == "worker" and token in names.dotted:
            return None  # worker.batch_size: a setting, not a module
        problem = check_python(token, names.root)
        if problem and first == "worker" and token.count(".") == 1:
            return f"`{token}`: no setting worker.{token.split('.')[1]}, and no module or name of the package worker"
        return problem
    plain = PLACEHOLDER.sub("x", token)
    ours = first in names.dotted_prefixes and re.fullmatch(r"[a-z0-9_.-]+", plain) is not None
    if ours:
        if _has_placeholder(token):
            pattern = _pattern(token, "[^.]+")
            if any(pattern.fullmatch(n) for n in names.dotted):
                return None
        elif token in names.dotted:
            return None
    # a module named without its package (``consume.Batches.submit``, ``unit_of_work.order_transaction``)
    packages = [p for p in ("worker", "handlers", "schema") if _module_file(names.root / p, [first]) is not None]
    packages = [] if argument else packages
    if packages:
        problems = [check_python(token, names.root / p, p + ".") for p in packages]
        if None in problems:
            return None
        if not ours:
            return problems[0]
    if not ours:
        return None  # not one of ours: stripe.StripeClient, json.loads, an SDK's attribute
    keys = names.settings.get(first)
    if keys is not None and first not in CONTRACT_PREFIXES:
        return f"`{token}`: settings section {first!r} has no key {token.split('.', 1)[1]!r}"
    return f"`{token}` is no setting, queue, exchange, routing key, column or field"


def _module_file(root: Path, parts: list[str]) -> Path | None:
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return base if base.is_dir() else None


def _defined(tree: ast.AST, name: str) -> ast.AST | None:
    """The top-level statement of ``tree`` (a module or a class) that defines ``name``."""
    return _defined_in(getattr(tree, "body", []), name)


def _defined_in(body: list[ast.stmt], name: str) -> ast.AST | None:
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            return node
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node
        if isinstance(node, ast.Import | ast.ImportFrom):
            if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                return node
        if isinstance(node, ast.If | ast.Try):  # names defined under ``if TYPE_CHECKING`` or in a ``try``
            bodies = [node.body, node.orelse]
            if isinstance(node, ast.Try):
                bodies += [h.body for h in node.handlers] + [node.finalbody]
            for inner in bodies:
                found = _defined_in(inner, name)
                if found is not None:
                    return found
    return None


def check_python(token: str, root: Path, package: str = "") -> str | None:
    """``worker.consume.Batches.submit``: a module, a name it defines, a member of that class.

    ``root`` is where the first part is looked for (the repository, or ``worker/`` with ``package``
    ``"worker."`` for a module named without its package).
    """
    parts = token.split(".")
    for cut in range(len(parts), 0, -1):
        module = _module_file(root, parts[:cut])
        if module is not None:
            break
    else:
        return f"`{token}`: no module {package}{parts[0]}"
    rest = parts[cut:]
    if not rest:
        return None
    if module.is_dir():  # a namespace package: the next part should have been a module
        return f"`{token}`: no module {package}{'.'.join(parts[: cut + 1])}"
    tree = ast.parse(module.read_text(encoding="utf-8"))
    where = package + ".".join(parts[:cut])
    found = _defined(tree, rest[0])
    if found is None:
        return f"`{token}`: {where} defines no {rest[0]!r}"
    if len(rest) == 1 or not isinstance(found, ast.ClassDef):
        return None  # a function's, a value's or an import's attribute: not followed
    if _member(tree, found, rest[1]):
        return None
    return f"`{token}`: {where}.{rest[0]} has no {rest[1]!r}"


def _member(tree: ast.Module, cls: ast.ClassDef, name: str) -> bool:
    """Whether the class (or a base it inherits from) has ``name``; a base from elsewhere may have anything."""
    if _defined(cls, name) is not None:
        return True
    for base in cls.bases:
        target = _defined(tree, base.id) if isinstance(base, ast.Name) else None
        if not isinstance(target, ast.ClassDef):
            return True  # an imported base (BaseModel, Protocol...): not read
        if target is not cls and _member(tree, target, name):
            return True
    return False


def _segments(path: str) -> list[str]:
    return [s for s in path.split("?", 1)[0].split("#", 1)[0].strip("/").split("/")]


def check_http(method: str | None, path: str, names: Names) -> str | None:
    """Why ``[METHOD] /path`` is no route of the shim; None when it is one."""
    shown = f"{method} {path}" if method else path
    if shown in ALLOWED or path in ALLOWED:
        return None
    wanted = _segments(path)
    methods_found: set[str] = set()
    for methods, route in names.routes:
        have = _segments(route)
        if _route_matches(wanted, have):
            if method is None or not methods or method in methods or (method == "HEAD" and "GET" in methods):
                return None
            methods_found.update(methods)
    if methods_found:
        return f"`{shown}`: the shim's {path} takes {', '.join(sorted(methods_found))}, not {method}"
    return f"`{shown}` is no route of the shim"


def _route_matches(wanted: list[str], have: list[str]) -> bool:
    for i, segment in enumerate(have):
        if segment.startswith("{") and segment.endswith(":path}"):
            return len(wanted) > i
        if i >= len(wanted):
            return False
        if segment.startswith("{"):
            continue
        if _has_placeholder(wanted[i]) and _pattern(wanted[i], ".*").fullmatch(segment) is None:
            return False
        if not _has_placeholder(wanted[i]) and wanted[i] != segment:
            return False
    return len(wanted) == len(have)


def _clean_word(word: str) -> str:
    word = word.strip(WORD_TRIM)
    return word.rstrip(".") if not word.endswith("..") else word


def looks_like_path(word: str) -> bool:
    """A repository path: ``a/b.py``, ``deploy/k8s/``, ``../README.md``; not a URL, an absolute path or a pattern."""
    if "/" not in word or "://" in word or word.startswith(("/", "~", "$", "-")) or "=" in word or "@" in word:
        return False
    if not re.fullmatch(r"[\w.*/-]+", word) or re.match(r"^[\d.:]+/", word):
        return False
    if word.endswith("/"):
        return bool(re.fullmatch(r"(\.\./|\./)?[\w-]+(/[\w.-]+)+/", word))
    ext = word.rsplit(".", 1)[-1] if "." in word.rsplit("/", 1)[-1] else ""
    return ext.lower() in FILE_EXTENSIONS


def check_path(word: str, doc_path: str, names: Names) -> str | None:
    """Why a repository path named by a doc is missing; None when it is there or not the repository's."""
    if word in ALLOWED:
        return None
    bare = word.removeprefix("./")
    if bare.startswith(("shared/", "../shared/")):
        return None  # the shared folder beside the repository, not part of it
    doc_dir = (names.root / doc_path).parent
    for base in (names.root, doc_dir):
        if "*" in bare:
            if any(base.glob(bare)):
                return None
        elif (base / bare).exists():
            return None
    return f"`{word}` is not in the repository"


def check_bare_file(word: str, names: Names) -> str | None:
    """A name without a directory (``place_order.py``, ``rabbit/``): some file or directory of the repository has it."""
    if word in ALLOWED or word.rstrip("/") in names.basenames or "*" in word or _has_placeholder(word):
        return None
    return f"`{word}`: no {'directory' if word.endswith('/') else 'file'} of that name in the repository"


def check_link(target: str, doc: Doc, names: Names, anchors: dict[str, set[str]]) -> str | None:
    if re.match(r"^[a-z][\w+.-]*:", target) or target.startswith("//"):
        return None  # http:, mailto:
    path, _, fragment = target.partition("#")
    if not path:
        if fragment and fragment not in doc.anchors:
            return f"link #{fragment}: no such heading here"
        return None
    if path.startswith(("/", "../../")) or "shared/" in path:
        return None
    file = ((names.root / doc.path).parent / path).resolve()
    if not file.exists():
        return f"link {target}: {path} is not in the repository"
    if fragment and file.suffix == ".md":
        known = anchors.get(str(file))
        if known is None:
            known = parse(str(file), file.read_text(encoding="utf-8")).anchors
            anchors[str(file)] = known
        if fragment not in known:
            return f"link {target}: {path} has no heading #{fragment}"
    return None


SEPARATORS = frozenset({"&&", "||", "|", ";", "$(", "(", "`"})
STOP = re.compile(r"^(\||\|\||&&|;|>|>>|<|2>|2>&1|#.*|\)|&)$")


def _command_positions(text: str) -> Iterator[list[str]]:
    """The words after each ``orders`` that stands where a command does."""
    words = re.sub(r"(\$\(|&&|\|\||[;|()])", r" \1 ", text).split()
    start = True
    for i, word in enumerate(words):
        if word in SEPARATORS or word in {"$(", "("}:
            start = True
            continue
        if start and (word == "orders" or word.endswith("/bin/orders")):
            yield words[i + 1 :]
            start = False
            continue
        if start and (re.fullmatch(r"[A-Za-z_]\w*=\S*", word) or re.fullmatch(r"[\d*/,-]+", word)):
            continue  # VAR=value before the command, cron fields
        if start and word in {"sudo", "exec", "time", "nohup", "command", "then", "do"}:
            continue
        start = False


def check_cli(words: list[str], names: Names) -> list[str]:
    """Why ``orders <words>`` is no valid command line (verbs, subverbs, options)."""
    problems: list[str] = []
    command, path = names.cli, ["orders"]
    for raw in words:
        if STOP.match(raw) or raw in SEPARATORS:
            break
        word = raw.strip("[]{}\"'")
        if not word or word in {"...", "…"}:
            continue
        if word.startswith("-"):
            option = word.split("=", 1)[0].rstrip(".,;:")
            if re.fullmatch(r"--?[A-Za-z][\w-]*", option) and option not in command.options:
                problems.append(f"`{' '.join(path)}` has no option {option}")
            continue
        if command.subcommands:
            sub = command.subcommands.get(word)
            if sub is None:
                if re.fullmatch(r"[a-z][a-z-]*", word):
                    problems.append(f"`{' '.join(path)}` has no verb {word!r}")
                break
            command, path = sub, [*path, word]
    return problems


def check_doc(doc_path: str, text: str, names: Names, anchors: dict[str, set[str]] | None = None) -> list[Problem]:
    """Every problem of one markdown file (``doc_path`` relative to the repository's root)."""
    doc = parse(doc_path, text)
    anchors = {} if anchors is None else anchors
    found: list[Problem] = []

    def report(line: int, message: str | None) -> None:
        if message:
            found.append(Problem(doc_path, line, message))

    # environment variables, anywhere
    for number, line in enumerate(text.split("\n"), 1):
        for name in ENV.findall(line):
            report(number, check_env(name, names))
    # shim URLs, anywhere
    for number, line in enumerate(text.split("\n"), 1):
        for m in URL_PATH.finditer(line):
            if m.group(1):
                report(number, check_http(None, m.group(1), names))

    code: list[tuple[int, str, str]] = [(n, s, "span") for n, s in doc.spans]
    code += [(n, line, language) for n, line, language in doc.block_lines]
    for number, text_, kind in code:
        if kind == "span":
            report(number, _check_span_http(text_, names))
        if kind == "span" or kind in SHELL_LANGUAGES:
            for words in _command_positions(text_):
                for message in check_cli(words, names):
                    report(number, message)
        if kind not in {"json"}:
            for m in DOTTED.finditer(text_):
                argument = text_[: m.start()].rstrip().endswith(("(", ","))
                report(number, check_dotted(m.group(0), names, argument))
        for raw in text_.split():
            word = _clean_word(raw)
            if looks_like_path(word):
                report(number, check_path(word, doc_path, names))
            elif kind == "span" and re.fullmatch(r"[a-z][\w-]*/", word):
                report(number, check_bare_file(word, names))  # a directory named alone: ``payments/``
            elif re.fullmatch(r"[\w-]+\.[A-Za-z]+", word) and word.rsplit(".", 1)[1] in BARE_FILE_EXTENSIONS:
                if kind == "span" or word.endswith(".md"):
                    report(number, check_bare_file(word, names))
    for number, line in doc.prose:
        for m in re.finditer(r"(?<![\w/.#-])([\w-]+\.md)\b(?![\w/-])", line):
            if not re.search(r"\]\([^)]*$", line[: m.start()]):  # a link's target is checked as a link
                report(number, check_bare_file(m.group(1), names))
    for number, target in doc.links:
        report(number, check_link(target, doc, names, anchors))
    return sorted(set(found), key=lambda p: (p.line, p.message))


def _check_span_http(span: str, names: Names) -> str | None:
    m = re.fullmatch(r"(?:(" + "|".join(HTTP_METHODS) + r") )?(/\S*)", span.strip())
    if not m:
        return None
    method, path = m.group(1), m.group(2)
    if span.strip() in ALLOWED:
        return None
    if _segments(path)[0] not in names.route_prefixes:
        return None  # /tmp/..., /proc, a provider's API (GET /v1/refunds)
    return check_http(method, path, names)


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def main(argv: list[str]) -> int:
    names = collect_names()
    files = [Path(a).resolve() for a in argv] or doc_files()
    anchors: dict[str, set[str]] = {}
    problems: list[Problem] = []
    for file in files:
        rel = str(file.relative_to(ROOT))
        problems += check_doc(rel, file.read_text(encoding="utf-8"), names, anchors)
    for problem in problems:
        print(problem)
    if problems:
        print(f"check_docs: {len(problems)} name(s) in the docs that do not exist", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
