"""Split SQL text into statements and recognise reldl's own: CREATE/DROP/SHOW MODEL(S), and calls of reldl functions.

Everything else passes through to DuckDB exactly as the user wrote it. Recognition uses sqlglot's tokenizer (cheap),
and a full sqlglot parse only for statements that involve reldl.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import Token, TokenType

from reldl.errors import ProgrammingError
from reldl.planner.predict_calls import _NAMED, function_calls, listify_predict_sql, parse_one

# reldl SQL functions and their named arguments (after the positional ones)
FUNCTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llm_generate": (
        ("prompt",),
        ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "truncate", "n", "beam_width"),
    ),
    # llm_generate(..., n := k) / beam_width := k, rewritten by list_generate_sql: a LIST of samples or beams
    "llm_generate_list": (
        ("prompt",),
        ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "truncate", "n", "beam_width"),
    ),
    "llm_score": (("prompt", "continuation"), ("model",)),
    "predict": (("model", "features"), ()),  # predict(m, f1, f2, ...) is rewritten to predict(m, [f1, f2, ...])
    "predict_proba": (("model", "features"), ()),
}


@dataclass
class Passthrough:
    sql: str
    functions: set[str] = field(default_factory=set)  # reldl functions it calls
    returns_rows: bool = True  # False for DDL/DML/SET/transactions (PEP 249: no description, no fetch)
    original: str | None = None  # the text as the user wrote it, when reldl's text rewrites changed `sql`


@dataclass
class CreateModel:
    name: str
    options: dict[str, Any]
    replace: bool = False
    if_not_exists: bool = False
    query: str | None = None


@dataclass
class DropModel:
    name: str
    if_exists: bool = False


@dataclass
class ShowModels:
    pass


@dataclass
class SetOption:
    """SET / RESET of a reldl session option (DuckDB rejects unknown settings, so reldl keeps them)."""

    name: str
    value: str | None  # None: RESET


@dataclass
class Explain:
    """EXPLAIN [ANALYZE] of a statement with model calls: reldl shows its plan."""

    statement: str
    analyze: bool = False


@dataclass
class ExplainModel:
    """EXPLAIN CREATE MODEL ...: what registering the model would do (an offloaded LLM's policy and predicted
    throughput), checked as CREATE MODEL checks it; nothing is registered."""

    create: CreateModel
    analyze: bool = False


Statement = Passthrough | CreateModel | DropModel | ShowModels | SetOption | Explain | ExplainModel


def split(sql: str) -> list[tuple[str, list[Token]]]:
    """Statements of a script with their tokens; a script sqlglot cannot tokenize stays whole for DuckDB."""
    try:
        tokens = sqlglot.tokenize(sql, read="duckdb")
    except (TokenError, ParseError, ValueError):
        return [(sql, [])]
    out: list[tuple[str, list[Token]]] = []
    current: list[Token] = []
    for tok in tokens:
        if tok.token_type == TokenType.SEMICOLON:
            if current:
                out.append((sql[current[0].start : current[-1].end + 1], current))
            current = []
        else:
            current.append(tok)
    if current:
        out.append((sql[current[0].start : current[-1].end + 1], current))
    return out


def _words(tokens: list[Token], n: int) -> list[str]:
    return [t.text.upper() for t in tokens[:n]]


def classify(text: str, tokens: list[Token]) -> Statement:
    """One statement's text and tokens -> a reldl statement, or a Passthrough for DuckDB."""
    w = _words(tokens, 6)
    if w[:2] == ["CREATE", "MODEL"] or w[:4] == ["CREATE", "OR", "REPLACE", "MODEL"]:
        return _create_model(text, tokens)
    if w[:2] == ["DROP", "MODEL"]:
        return _drop_model(tokens)
    if w[:2] == ["SHOW", "MODELS"] and len(tokens) == 2:
        return ShowModels()
    if w[:1] in (["SET"], ["RESET"]) and len(tokens) >= 2 and tokens[1].text.lower().startswith("reldl_"):
        return _set_option(tokens)
    calls = {
        t.text.lower()
        for i, t in enumerate(tokens[:-1])
        if t.text.lower() in FUNCTIONS and tokens[i + 1].token_type == TokenType.L_PAREN
    }
    if w[:1] == ["EXPLAIN"] and len(tokens) == 2:  # sqlglot keeps what follows EXPLAIN as one string token
        return _explain(text, tokens[1].text)
    if w[:1] == ["PREPARE"] and len(tokens) == 2:  # likewise PREPARE name AS <statement>
        return _prepare(text, tokens)
    original = text
    if calls & {"predict", "predict_proba"}:
        text = listify_predict_sql(text)
    if calls:
        check_calls(text)  # before the llm_generate_list rewrite: messages name the function the user called
    if "llm_generate" in calls:
        listed = list_generate_sql(text)
        if listed != text:
            text = listed
            calls.add("llm_generate_list")
    return Passthrough(text, calls, returns_rows(tokens), original if text != original else None)


LIST_ARGUMENTS = ("n", "beam_width")


def list_generate_sql(sql: str) -> str:
    """`llm_generate(...)` calls that name `n` or `beam_width` -> `llm_generate_list(...)`, which returns a
    LIST(VARCHAR) (n samples, or the beams best first): a DuckDB macro cannot change its return type with an argument.
    Only the function names change; the rest of the text reaches DuckDB as written."""
    spans = []
    for tok, args, _ in function_calls(sql, ("llm_generate",)):
        names = {a[0].text.lower() for a in args if len(a) >= 2 and a[1].token_type in _NAMED}
        if names.intersection(LIST_ARGUMENTS):
            spans.append((tok.start, tok.end + 1))
    for start, end in reversed(spans):
        sql = sql[:start] + "llm_generate_list" + sql[end:]
    return sql


def _prepare(text: str, tokens: list[Token]) -> Statement:
    """PREPARE name AS <statement>: DuckDB prepares it as written, except that llm_generate(..., n / beam_width)
    becomes llm_generate_list as in any other statement (EXECUTE then runs the macro in DuckDB)."""
    body = tokens[1].text
    at = text.find(body)
    try:
        inner = sqlglot.tokenize(body, read="duckdb")
    except (TokenError, ParseError, ValueError):
        inner = []
    if at < 0 or not any(t.text.lower() in FUNCTIONS for t in inner):
        return Passthrough(text, set(), False)
    as_ = next((t for t in inner if t.token_type == TokenType.ALIAS or t.text.upper() == "AS"), None)
    if as_ is not None:
        check_calls(listify_predict_sql(body[as_.end + 1 :]))
    return Passthrough(text[:at] + list_generate_sql(body) + text[at + len(body) :], set(), False)


def _explain(text: str, body: str) -> Statement:
    """EXPLAIN [ANALYZE] of a statement with model calls is reldl's to answer; any other EXPLAIN is DuckDB's."""
    body = body.strip()
    analyze = body[:8].upper() == "ANALYZE " or body[:8].upper() == "ANALYZE\n"
    if analyze:
        body = body[8:].lstrip()
    inner = split(body)
    if len(inner) == 1 and inner[0][1]:
        stmt = classify(*inner[0])
        if isinstance(stmt, Passthrough) and stmt.functions:
            return Explain(stmt.sql, analyze)
        if isinstance(stmt, CreateModel):
            return ExplainModel(stmt, analyze)
        if isinstance(stmt, (DropModel, ShowModels, SetOption)):
            what = " ".join(t.text.upper() for t in inner[0][1][:2])
            raise ProgrammingError(f"EXPLAIN {what}: nothing to explain (EXPLAIN takes a query or CREATE MODEL)")
    return Passthrough(text, set(), True)


# statements whose result is a status (DuckDB's "Count"/"Success" row), not rows, unless they say RETURNING
_NO_ROWS = {
    "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "SET", "RESET", "BEGIN", "START", "COMMIT", "END",
    "ROLLBACK", "ABORT", "ATTACH", "DETACH", "USE", "VACUUM", "CHECKPOINT", "FORCE", "LOAD", "INSTALL", "COPY",
    "EXPORT", "IMPORT", "ANALYZE", "TRUNCATE", "PREPARE", "DEALLOCATE", "COMMENT", "MERGE",
}  # fmt: skip


def returns_rows(tokens: list[Token]) -> bool:
    if not tokens or tokens[0].text.upper() not in _NO_ROWS:
        return True
    if tokens[0].text.upper() == "COPY" and any(t.text.upper() == "TO" for t in tokens):
        return False
    return any(t.token_type == TokenType.RETURNING for t in tokens)


def check_calls(text: str) -> None:
    """Reject unknown or repeated named arguments of reldl functions with a one-line error."""
    try:
        tree = parse_one(text)
    except (ParseError, TokenError):
        return  # DuckDB reports the syntax error itself
    for call in tree.find_all(exp.Anonymous):
        name = str(call.this).lower()
        if name not in FUNCTIONS:
            continue
        positional, named = FUNCTIONS[name]
        seen: set[str] = set()
        for arg in call.expressions:
            if isinstance(arg, (exp.PropertyEQ, exp.Kwarg)):
                key = arg.this.name.lower()
                if key not in named and key not in positional:  # DuckDB also lets positional ones be named
                    raise ProgrammingError(f"{name}: unknown argument {key!r} (named arguments: {', '.join(named)})")
                if key in seen:
                    raise ProgrammingError(f"{name}: argument {key!r} given twice")
                seen.add(key)
        n_pos = sum(not isinstance(a, (exp.PropertyEQ, exp.Kwarg)) for a in call.expressions)
        n_pos += len(seen.intersection(positional))
        if n_pos != len(positional):
            want = ", ".join(positional)
            raise ProgrammingError(f"{name}: expects {len(positional)} positional argument(s) ({want}), got {n_pos}")
        check_literals(name, call)


# -- arguments given as literals, checked before the statement runs (and under EXPLAIN), with the messages the UDFs
# give for the same values at run time (udfs/llm.py). Other expressions are checked by the UDFs, row by row.


class _NotLiteral(Exception):
    pass


def _literal(node: exp.Expression) -> Any:
    """The Python value of a literal argument: number, string, NULL, boolean, or a list of them; _NotLiteral else."""
    if isinstance(node, exp.Paren):
        return _literal(node.this)
    if isinstance(node, exp.Null):
        return None
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Literal):
        if node.is_string:
            return node.this
        text = node.this
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                raise _NotLiteral from None
    if isinstance(node, exp.Neg):
        value = _literal(node.this)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
        raise _NotLiteral
    if isinstance(node, exp.Array):
        return [_literal(x) for x in node.expressions]
    raise _NotLiteral


def _shown(value: Any, node: exp.Expression) -> str:
    """A literal as the SQL user wrote it: NULL, true, 'text', 1.5."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return node.sql(dialect="duckdb")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_integer(v: Any) -> bool:
    return _is_number(v) and float(v).is_integer()


def _check_integer(fn: str, key: str, v: Any, shown: str, low: int | None, null_ok: bool) -> None:
    bound = f" >= {low}" if low is not None else ""
    if v is None:
        if not null_ok:
            raise ProgrammingError(f"{fn}: {key} must be an integer{bound}, got NULL")
        return
    if not (isinstance(v, int) and not isinstance(v, bool)):  # 2.0 too: DuckDB does not cast a DECIMAL to BIGINT
        raise ProgrammingError(f"{fn}: {key} must be an integer, got {shown}")
    if low is not None and v < low:
        raise ProgrammingError(f"{fn}: {key} must be{bound}, got {shown}")


def _check_generate_arg(fn: str, key: str, v: Any, shown: str) -> None:
    from reldl.llm.params import MAX_BRANCHES

    if key in ("model", "prompt"):
        if v is not None and not isinstance(v, str):
            what = "a model name (text)" if key == "model" else "text"
            raise ProgrammingError(f"{fn}: {key} must be {what}, got {shown}")
    elif key == "max_tokens":
        _check_integer(fn, key, v, shown, 0, null_ok=False)
    elif key == "top_k":
        _check_integer(fn, key, v, shown, 0, null_ok=True)  # NULL: the default
    elif key == "seed":
        _check_integer(fn, key, v, shown, None, null_ok=True)  # NULL: unseeded
    elif key in ("n", "beam_width"):
        if not (_is_integer(v) and 1 <= v <= MAX_BRANCHES):
            raise ProgrammingError(f"{fn}: {key} must be an integer from 1 to {MAX_BRANCHES}, got {shown}")
    elif key in ("temperature", "top_p"):
        if v is None:
            return  # NULL: the default
        if not _is_number(v):
            raise ProgrammingError(f"{fn}: {key} must be a number, got {shown}")
        if key == "temperature" and v < 0:
            raise ProgrammingError(f"{fn}: temperature must be >= 0, got {shown}")
        if key == "top_p" and not 0 < v <= 1:
            raise ProgrammingError(f"{fn}: top_p must be in (0, 1], got {shown}")
    elif key == "stop":
        items = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(s, str) and s for s in items):
            raise ProgrammingError(f"{fn}: stop must be a non-empty string or a list of non-empty strings, got {shown}")
    elif key == "truncate":
        if v not in (None, "left"):
            raise ProgrammingError(f"{fn}: truncate must be 'left' or NULL, got {shown}")


def check_literals(name: str, call: exp.Expression) -> None:
    """Literal arguments of one call of a reldl function: the right type and range, else a one-line
    ProgrammingError naming the function and the argument (`llm_generate: max_tokens must be an integer, got 1.5`)."""
    fn = "llm_generate" if name == "llm_generate_list" else name  # the planner's rewrite; users call llm_generate
    positional, named = FUNCTIONS[name]
    values: dict[str, Any] = {}
    plain = [a for a in call.expressions if not isinstance(a, (exp.PropertyEQ, exp.Kwarg))]
    args = list(zip(positional, plain))
    args += [
        (a.this.name.lower(), a.expression) for a in call.expressions if isinstance(a, (exp.PropertyEQ, exp.Kwarg))
    ]
    literal = True
    for key, node in args:
        try:
            v = _literal(node)
        except _NotLiteral:
            literal = literal and key in positional  # the data (prompt) may be anything; parameters must be known
            continue
        values[key] = v
        shown = _shown(v, node)
        if name in ("llm_generate", "llm_generate_list"):
            _check_generate_arg(fn, key, v, shown)
        elif name == "llm_score":
            if v is not None and not isinstance(v, str):
                what = "a model name (text)" if key == "model" else "text"
                raise ProgrammingError(f"{fn}: {key} must be {what}, got {shown}")
        elif key == "model" and v is not None and not isinstance(v, str):  # predict, predict_proba
            raise ProgrammingError(f"{fn}: model must be a model name (text), got {shown}")
    if literal and name in ("llm_generate", "llm_generate_list"):
        _check_combination(fn, values)


def _check_combination(fn: str, v: dict[str, Any]) -> None:
    """Arguments that are each valid but not together (beam search with sampling or stop strings, n with
    beam_width), when every argument is a literal: SamplingParams' own checks, as the UDF runs them."""
    from reldl.llm.params import SamplingParams

    stop = v.get("stop")
    try:
        SamplingParams(
            max_tokens=int(v.get("max_tokens", 64)),
            temperature=float(v.get("temperature") or 0.0),
            top_p=float(v.get("top_p") or 1.0),
            top_k=int(v.get("top_k") or 0),
            seed=None if v.get("seed") is None else int(v["seed"]),
            stop=tuple(stop if isinstance(stop, list) else [stop] if stop else []),
            n=int(v.get("n", 1)),
            beam_width=None if v.get("beam_width") is None else int(v["beam_width"]),
        )
    except ValueError as e:
        raise ProgrammingError(f"{fn}: {e}") from None


def _set_option(tokens: list[Token]) -> SetOption:
    name = tokens[1].text.lower()
    if tokens[0].text.upper() == "RESET":
        if len(tokens) != 2:
            raise ProgrammingError(f"syntax: RESET {name}")
        return SetOption(name, None)
    rest = tokens[2:]
    if rest and rest[0].token_type in (TokenType.EQ, TokenType.VAR) and rest[0].text.upper() in ("=", "TO"):
        rest = rest[1:]
    if len(rest) != 1:
        raise ProgrammingError(f"syntax: SET {name} = 'value'")
    return SetOption(name, rest[0].text)


def _drop_model(tokens: list[Token]) -> DropModel:
    rest = tokens[2:]
    if_exists = _words(rest, 2) == ["IF", "EXISTS"]
    if if_exists:
        rest = rest[2:]
    if len(rest) != 1:
        raise ProgrammingError("syntax: DROP MODEL [IF EXISTS] name")
    return DropModel(_ident(rest[0]), if_exists)


def _ident(tok: Token) -> str:
    return tok.text


_QUERY_START = {"SELECT", "WITH", "FROM", "VALUES"}


def _check_query(tokens: list[Token]) -> int | None:
    """CREATE MODEL ... AS <query>: the index of the query's first token (None without AS). The query must be one
    SELECT (it only reads; a statement after it is a separate statement of the script, split off before this)."""
    words = [t.text.upper() for t in tokens]
    at = words.index("MODEL") + 1
    if words[at : at + 3] == ["IF", "NOT", "EXISTS"]:
        at += 3
    name = tokens[at].text if at < len(tokens) else "?"
    depth = 0
    for i, tok in enumerate(tokens[at:], at):
        if tok.token_type == TokenType.L_PAREN:
            depth += 1
        elif tok.token_type == TokenType.R_PAREN:
            depth -= 1
        elif depth == 0 and tok.token_type == TokenType.ALIAS:  # the keyword AS, not a model named "as"
            rest = [t for t in tokens[i + 1 :] if t.token_type != TokenType.L_PAREN]  # (SELECT ...)
            if not rest or rest[0].text.upper() not in _QUERY_START:
                raise ProgrammingError(f"CREATE MODEL {name}: AS must be followed by a SELECT query")
            return i + 1
    return None


_SYNTAX = "syntax: CREATE [OR REPLACE] MODEL [IF NOT EXISTS] name [OPTIONS (key = value, ...)] [AS SELECT ...]"
_STRINGS = {TokenType.STRING, TokenType.BYTE_STRING, TokenType.HEREDOC_STRING, TokenType.NATIONAL_STRING}
_NOT_NAMES = _STRINGS | {TokenType.NUMBER, TokenType.L_PAREN, TokenType.R_PAREN, TokenType.L_BRACKET}
_NOT_NAMES |= {TokenType.R_BRACKET, TokenType.COMMA, TokenType.EQ, TokenType.DOT, TokenType.DASH, TokenType.PLUS}


def _create_model(text: str, tokens: list[Token]) -> CreateModel:
    """CREATE MODEL, read from DuckDB's tokens: option strings are DuckDB strings ('bob''s' is bob's, '\\n' a
    backslash and an n), and the query after AS is kept exactly as written, for DuckDB to run."""
    at = _check_query(tokens)
    head = tokens if at is None else tokens[: at - 1]
    query = None
    if at is not None:  # token offsets count from the start of the script the statement came from
        query = text[tokens[at].start - tokens[0].start :]

    def word(i: int, *words: str) -> bool:
        return (
            i < len(head)
            and head[i].token_type not in _NOT_NAMES | {TokenType.IDENTIFIER}
            and (head[i].text.upper() in words)
        )

    i = 1
    replace = word(1, "OR") and word(2, "REPLACE")
    i += 2 if replace else 0
    if not word(i, "MODEL"):
        raise ProgrammingError(_SYNTAX)
    i += 1
    if_not_exists = word(i, "IF") and word(i + 1, "NOT") and word(i + 2, "EXISTS")
    i += 3 if if_not_exists else 0
    while i + 2 < len(head) and head[i + 1].token_type == TokenType.DOT:  # schema.name: the name is what counts
        i += 2
    if i >= len(head) or head[i].token_type in _NOT_NAMES:
        raise ProgrammingError(_SYNTAX)
    name = head[i].text
    if not name:
        raise ProgrammingError("CREATE MODEL: the model name is empty")
    if replace and if_not_exists:
        raise ProgrammingError(f"CREATE MODEL {name}: OR REPLACE and IF NOT EXISTS cannot be combined")
    i += 1
    options: dict[str, Any] = {}
    if word(i, "OPTIONS"):
        if i + 1 >= len(head) or head[i + 1].token_type != TokenType.L_PAREN:
            raise ProgrammingError(_SYNTAX)
        i += 2
        while i < len(head) and head[i].token_type != TokenType.R_PAREN:
            if head[i].token_type in _NOT_NAMES or i + 1 >= len(head) or head[i + 1].token_type != TokenType.EQ:
                raise ProgrammingError(f"CREATE MODEL {name}: OPTIONS takes key = value pairs ({_SYNTAX[8:]})")
            key = head[i].text.lower()
            if key in options:
                raise ProgrammingError(f"CREATE MODEL {name}: option {key!r} given twice")
            options[key], i = _option_value(head, i + 2, name, key, text)
            if i < len(head) and head[i].token_type == TokenType.COMMA:
                i += 1
            elif i >= len(head) or head[i].token_type != TokenType.R_PAREN:
                raise ProgrammingError(f"CREATE MODEL {name}: {_SYNTAX}")
        i += 1
    if i != len(head):
        raise ProgrammingError(_SYNTAX)
    if query is not None:
        _check_select(name, query)
    return CreateModel(name=name, options=options, replace=replace, if_not_exists=if_not_exists, query=query)


def _option_value(tokens: list[Token], i: int, model: str, key: str, text: str) -> tuple[Any, int]:
    """The literal at tokens[i] (a string, number, boolean, NULL, a bare word, or a [list] / (tuple) of them) and the
    index after it."""
    end = i
    try:
        value, end = _literal_at(tokens, i)
        if end >= len(tokens) or tokens[end].token_type in (TokenType.COMMA, TokenType.R_PAREN):
            return value, end
    except (_NotLiteral, IndexError):
        pass
    depth, j = 0, i  # the whole expression, for the message
    while j < len(tokens) and not (depth == 0 and tokens[j].token_type in (TokenType.COMMA, TokenType.R_PAREN)):
        depth += tokens[j].token_type in (TokenType.L_PAREN, TokenType.L_BRACKET)
        depth -= tokens[j].token_type in (TokenType.R_PAREN, TokenType.R_BRACKET)
        j += 1
    base = tokens[0].start
    shown = text[tokens[i].start - base : tokens[j - 1].end + 1 - base] if j > i else "nothing"
    raise ProgrammingError(f"CREATE MODEL {model}: option {key!r} must be a literal, got {shown}")


def _literal_at(tokens: list[Token], i: int) -> tuple[Any, int]:
    tok = tokens[i]
    tt = tok.token_type
    if tt in _STRINGS:
        return tok.text, i + 1
    if tt == TokenType.NUMBER:
        return (float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)), i + 1
    if tt in (TokenType.DASH, TokenType.PLUS) and tokens[i + 1].token_type == TokenType.NUMBER:
        value, end = _literal_at(tokens, i + 1)
        return (-value if tt == TokenType.DASH else value), end
    if tt in (TokenType.TRUE, TokenType.FALSE):
        return tt == TokenType.TRUE, i + 1
    if tt == TokenType.NULL:
        return None, i + 1
    if tt in (TokenType.L_BRACKET, TokenType.L_PAREN):
        close = TokenType.R_BRACKET if tt == TokenType.L_BRACKET else TokenType.R_PAREN
        items: list[Any] = []
        i += 1
        while tokens[i].token_type != close:
            value, i = _literal_at(tokens, i)
            items.append(value)
            if tokens[i].token_type == TokenType.COMMA:
                i += 1
            elif tokens[i].token_type != close:
                raise _NotLiteral
        return items, i + 1
    if tt not in _NOT_NAMES and tt not in (TokenType.STAR, TokenType.SLASH):  # a bare word: model_type = llm
        return tok.text, i + 1
    raise _NotLiteral


_WRITES = (exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop, exp.Alter, exp.Command, exp.Merge)
_WRITE_TOKENS = {TokenType.INSERT, TokenType.UPDATE, TokenType.DELETE, TokenType.MERGE, TokenType.CREATE}
_WRITE_TOKENS |= {TokenType.DROP, TokenType.ALTER, TokenType.COPY, TokenType.TRUNCATE}


def _check_select(name: str, query: str) -> None:
    """The query of CREATE MODEL ... AS is one statement that DuckDB reads as a SELECT and that writes nothing (DuckDB
    runs `WITH d AS (DELETE ... RETURNING *) SELECT ...`)."""
    import duckdb

    try:
        kinds = [s.type for s in duckdb.extract_statements(query)]
    except duckdb.Error as e:
        raise ProgrammingError(f"CREATE MODEL {name}: {str(e).strip().splitlines()[0]}") from None
    try:
        writes = _parse_duckdb(query).find(*_WRITES) is not None
    except (ParseError, TokenError):  # sqlglot cannot read it: look for a writing keyword
        writes = any(t.token_type in _WRITE_TOKENS for t in sqlglot.tokenize(query, read="duckdb"))
    if kinds != [duckdb.StatementType.SELECT] or writes:
        raise ProgrammingError(f"CREATE MODEL {name}: AS must be followed by a SELECT query")


def _parse_duckdb(sql: str) -> exp.Expression:
    """`sql` parsed as DuckDB SQL, without sqlglot's warnings on stderr."""
    quiet = logging.getLogger("sqlglot")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        return sqlglot.parse_one(sql, read="duckdb")
    finally:
        quiet.level = level


def parse(sql: str) -> list[Statement]:
    """SQL text (one statement or a script) -> statements, in order."""
    return [classify(text, tokens) if tokens else Passthrough(text) for text, tokens in split(sql)]
