"""predict() on models trained in the database that are lookups, not networks run per row: a matrix factorization
(``predict('recs', user, item)`` is ``p_user . q_item`` from its embedding tables) and a GCN (``predict('topics',
node)`` is the class its trained forward pass gave the node). Such calls are replaced by SQL over the model's tables
before planning, so they run inside DuckDB's own plan, and a statement left without model calls runs as plain SQL.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlglot import exp

from reldl.planner import predict_calls

# (model name, argument trees) -> the expression replacing the call, or None to leave the call alone
Resolver = Callable[[str, list[exp.Expression]], exp.Expression | None]


def _model_name(call: exp.Anonymous) -> str | None:
    if not call.expressions:
        return None
    first = call.expressions[0]
    return first.this if isinstance(first, exp.Literal) and first.is_string else None


def rewrite(sql: str, resolve: Resolver) -> str | None:
    """``sql`` with every resolvable ``predict(...)`` call replaced, or None when nothing changed."""
    tree = predict_calls.parse_one(sql)
    changed = False

    def sub(node: exp.Expression) -> exp.Expression:
        nonlocal changed
        if not (isinstance(node, exp.Anonymous) and str(node.this).lower() == "predict"):
            return node
        if isinstance(node.parent, exp.Dot) and node.arg_key == "expression":
            return node  # someone else's s.predict(...)
        name = _model_name(node)
        if name is None:
            return node
        args = list(node.expressions[1:])
        if len(args) == 1 and isinstance(args[0], exp.Array):
            args = list(args[0].expressions)
        new = resolve(name, args)
        if new is None:
            return node
        changed = True
        return new

    out = tree.transform(sub)
    return out.sql(dialect=predict_calls.DIALECT) if changed else None
