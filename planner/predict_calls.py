"""`predict(model, f1, f2, ...)` -> `predict(model, [f1, f2, ...])` (and predict_proba): DuckDB macros are not
variadic, so the feature list is built in SQL before the macro sees it.

Two forms of the same rewrite:
- `listify_predict_sql(sql)`: on the text, through sqlglot's tokenizer. Only brackets are inserted; the rest of the
  statement reaches DuckDB exactly as written.
- `listify_predict_calls(tree)`: on a sqlglot tree. Parse with `DIALECT` (below): sqlglot's own duckdb dialect knows
  `PREDICT` as BigQuery's `ML.PREDICT(MODEL m, table)`, fails on more than 3 arguments and writes
  `PREDICT(MODEL m, ...)` back, which DuckDB rejects. The transform also turns such `exp.Predict` nodes back into
  plain calls.

Rules, for both: with three or more positional arguments, every argument after the model goes into one list. With
two, the second is wrapped only when it cannot be a list: a number (`predict(m, 2.5)`) or an unpacked
`*COLUMNS(...)`; anything else (`predict(m, [a, b])`, `predict(m, list_column)`) is left alone. Calls with named
arguments (`:=`, `=>`) are left for DuckDB to report.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator

import sqlglot
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import Token, TokenType

PREDICT_FUNCTIONS = ("predict", "predict_proba")


class ReldlDuckDB(DuckDB):
    """DuckDB as sqlglot reads it, with `predict(...)` an ordinary (anonymous) function call."""

    class Parser(DuckDB.Parser):
        FUNCTIONS = {k: v for k, v in DuckDB.Parser.FUNCTIONS.items() if k != "PREDICT"}


DIALECT = ReldlDuckDB

# ------------------------------------------------------------------------------------------------------ the tree


def _wraps(arg: exp.Expression) -> bool:
    """A lone second argument that is certainly not a list: a number, or an unpacked *COLUMNS(...)."""
    if isinstance(arg, exp.Neg):
        arg = arg.this
    if isinstance(arg, exp.Literal) and not arg.is_string:
        return True
    return isinstance(arg, exp.Columns) and bool(arg.args.get("unpack"))


def _listify(node: exp.Expression) -> exp.Expression:
    if isinstance(node, exp.Predict):  # sqlglot's ML.PREDICT, from a parse without DIALECT
        args = [node.this, node.expression] + ([node.args["params_struct"]] if node.args.get("params_struct") else [])
        node = exp.Anonymous(this="predict", expressions=[a.copy() for a in args if a is not None])
    elif not (isinstance(node, exp.Anonymous) and str(node.this).lower() in PREDICT_FUNCTIONS):
        return node
    elif isinstance(node.parent, exp.Dot) and node.arg_key == "expression":
        return node  # qualified (`s.predict(...)`): someone else's function
    # transform() does not descend into a replaced node: rewrite calls nested in the arguments first
    args = [a.transform(_listify, copy=False) for a in node.expressions]
    if not any(isinstance(a, (exp.PropertyEQ, exp.Kwarg)) for a in args):
        if len(args) >= 3 or (len(args) == 2 and _wraps(args[1])):
            args = [args[0], exp.Array(expressions=args[1:])]
    node.set("expressions", args)
    return node


def listify_predict_calls(tree: exp.Expression, copy: bool = True) -> exp.Expression:
    """The tree with every variadic predict / predict_proba call turned into the list form."""
    return tree.transform(_listify, copy=copy)


def parse_one(sql: str) -> exp.Expression:
    """One statement parsed the way these transforms expect (predict as a plain function call)."""
    return sqlglot.parse_one(sql, read=DIALECT)


# ------------------------------------------------------------------------------------------------------ the text

_OPEN = {TokenType.L_PAREN, TokenType.L_BRACKET, TokenType.L_BRACE}
_CLOSE = {TokenType.R_PAREN, TokenType.R_BRACKET, TokenType.R_BRACE}
_NAMED = {TokenType.COLON_EQ, TokenType.FARROW}


def _call_args(tokens: list[Token], open_at: int) -> tuple[list[list[Token]], bool] | None:
    """The argument token lists of the call whose '(' is tokens[open_at], and whether any is named;
    None if the parentheses do not close."""
    args: list[list[Token]] = [[]]
    named = False
    depth = 0
    for tok in tokens[open_at + 1 :]:
        tt = tok.token_type
        if depth == 0 and tt == TokenType.R_PAREN:
            return ([] if args == [[]] else args), named
        if depth == 0 and tt == TokenType.COMMA:
            args.append([])
            continue
        if depth == 0 and tt in _NAMED:
            named = True
        if tt in _OPEN:
            depth += 1
        elif tt in _CLOSE:
            depth -= 1
        args[-1].append(tok)
    return None


def _wraps_tokens(arg: list[Token]) -> bool:
    kinds = [t.token_type for t in arg]
    if kinds in ([TokenType.NUMBER], [TokenType.DASH, TokenType.NUMBER], [TokenType.PLUS, TokenType.NUMBER]):
        return True
    return len(arg) >= 3 and kinds[0] == TokenType.STAR and arg[1].text.upper() == "COLUMNS"


def function_calls(sql: str, names: Collection[str]) -> Iterator[tuple[Token, list[list[Token]], bool]]:
    """``(name token, argument token lists, whether any argument is named)`` of each unqualified call of a function
    in ``names`` (lower case) whose parentheses close; nothing for SQL sqlglot cannot tokenize."""
    try:
        tokens = sqlglot.tokenize(sql, read="duckdb")
    except (TokenError, ParseError, ValueError):
        return
    for i, tok in enumerate(tokens[:-1]):
        if tok.text.lower() not in names or tokens[i + 1].token_type != TokenType.L_PAREN:
            continue
        if i > 0 and tokens[i - 1].token_type == TokenType.DOT:
            continue  # qualified: someone else's function
        found = _call_args(tokens, i + 1)
        if found is not None:
            yield tok, *found


def listify_predict_sql(sql: str) -> str:
    """SQL text (a statement or a script) with every variadic predict / predict_proba call in the list form;
    the text is otherwise unchanged (SQL sqlglot cannot tokenize is returned as is)."""
    inserts: list[tuple[int, str]] = []
    for _, args, named in function_calls(sql, PREDICT_FUNCTIONS):
        if named or any(not a for a in args):
            continue
        if len(args) >= 3 or (len(args) == 2 and _wraps_tokens(args[1])):
            inserts += [(args[1][0].start, "["), (args[-1][-1].end + 1, "]")]
    for pos, text in sorted(inserts, key=lambda p: p[0], reverse=True):
        sql = sql[:pos] + text + sql[pos:]
    return sql


def calls_predict(sql: str) -> bool:
    """Whether the text calls predict or predict_proba (cheap: tokens only)."""
    try:
        tokens = sqlglot.tokenize(sql, read="duckdb")
    except (TokenError, ParseError, ValueError):
        return False
    return any(
        t.text.lower() in PREDICT_FUNCTIONS and tokens[i + 1].token_type == TokenType.L_PAREN
        for i, t in enumerate(tokens[:-1])
    )


_CAST_TO_LIST = (
    re.compile(r"Unimplemented type for cast \((.+?) -> DOUBLE\[\]\)"),
    re.compile(r"Type (\S+) with value .* can't be cast to the destination type DOUBLE\[\]"),
)


def lone_feature_message(sql: str, error: str) -> str | None:
    """A better message for DuckDB's failure to cast a lone feature argument to the feature list: `predict(m, x)`
    with a column or expression x is read as `predict(m, list)` (a number literal is wrapped), so a one-feature model
    called on a DOUBLE column fails as "Unimplemented type for cast (DOUBLE -> DOUBLE[])". None when `error` is not
    that or `sql` has no such call."""
    found = next((m for p in _CAST_TO_LIST if (m := p.search(error))), None)
    if found is None:
        return None
    for tok, args, named in function_calls(sql, PREDICT_FUNCTIONS):
        if not named and len(args) == 2 and args[1] and args[1][0].token_type != TokenType.L_BRACKET:
            fn = tok.text.lower()
            return (
                f"{fn}: a single feature argument is taken as the list of features (DOUBLE[]) but is "
                f"{found.group(1)}: for a model of one feature write {fn}(model, [x])"
            )
    return None
