"""`reldl demo`: reldl's main job end to end on the model it ships, with results checked against ground truth.

Creates a database file, loads a table of held-out product reviews (with their true fields in other columns),
registers the shipped model with CREATE MODEL, extracts JSON for every row with `llm_generate` in SQL, and
aggregates over the generated column joined back to the truth.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import reldl
from reldl import paths, registry
from reldl.demo import data
from reldl.shell import format_table

MODEL_DIR = Path(__file__).resolve().parent / "model"

STEPS = {
    "extract": """CREATE OR REPLACE TABLE extracted AS
SELECT id, llm_generate('Review: ' || review || chr(10) || 'JSON:', max_tokens := 48, stop := chr(10)) AS answer
FROM reviews""",
    "predicted": """CREATE OR REPLACE VIEW predicted AS
SELECT id, fields->>'product' AS product, TRY_CAST(fields->>'rating' AS INTEGER) AS rating,
       fields->>'sentiment' AS sentiment, fields->>'issue' AS issue
FROM (SELECT id, CASE WHEN json_valid(answer) THEN answer::JSON END AS fields FROM extracted)""",
    "sample": """SELECT r.id, left(r.review, 60) AS review, e.answer
FROM reviews r JOIN extracted e USING (id) ORDER BY r.id LIMIT 5""",
    "confusion": """SELECT r.sentiment AS true_sentiment, coalesce(p.sentiment, '(unparsed)') AS predicted,
       count(*) AS reviews
FROM reviews r JOIN predicted p USING (id)
GROUP BY ALL ORDER BY true_sentiment, predicted""",
    "accuracy": """SELECT count(*) AS reviews,
       round(avg(coalesce(p.product = r.product, false)::INT), 3) AS product,
       round(avg(coalesce(p.rating = r.rating, false)::INT), 3) AS rating,
       round(avg(coalesce(p.sentiment = r.sentiment, false)::INT), 3) AS sentiment,
       round(avg(coalesce(p.issue = r.issue, false)::INT), 3) AS issue,
       round(avg(coalesce(p.product = r.product AND p.rating = r.rating AND p.sentiment = r.sentiment
                          AND p.issue = r.issue, false)::INT), 3) AS all_fields
FROM reviews r JOIN predicted p USING (id)""",
    # tree decoding: n samples or beam_width beams of one prompt share its KV cache (a LIST per row)
    "samples": """SELECT unnest(llm_generate('Review: ' || review || chr(10) || 'JSON:', max_tokens := 48,
                           stop := chr(10), temperature := 1.5, seed := 1, n := 3)) AS sample
FROM reviews WHERE id = (SELECT min(id) FROM reviews)""",
    "beams": """SELECT unnest(list_transform(
           llm_generate('Review: ' || review || chr(10) || 'JSON:', max_tokens := 48, beam_width := 3),
           lambda b: split_part(b, chr(10), 1))) AS beam
FROM reviews WHERE id = (SELECT min(id) FROM reviews)""",
}

SPARSE_ROWS = 12  # rows the sparse variant extracts (calibration: the last 32 reviews)
# `WHERE id IN (... LIMIT n)`, not `... ORDER BY id LIMIT n`: with llm_generate in the select list, DuckDB computes
# the projection for every row before the top-n, so ORDER BY ... LIMIT 1 would still generate for the whole table
SPARSE_STEPS = {
    "create": """CREATE OR REPLACE MODEL demo_fast OPTIONS (model_type = 'llm', base = 'demo', sparsity = 0.5)
AS SELECT review FROM reviews ORDER BY id DESC LIMIT 32""",
    "extract": f"""CREATE OR REPLACE TABLE extracted_fast AS
SELECT id, llm_generate('Review: ' || review || chr(10) || 'JSON:', max_tokens := 48, stop := chr(10),
                        model := 'demo_fast') AS answer
FROM reviews WHERE id IN (SELECT id FROM reviews ORDER BY id LIMIT {SPARSE_ROWS})""",
    "compare": """WITH fields AS (
  SELECT f.id, e.answer = f.answer AS same, CASE WHEN json_valid(f.answer) THEN f.answer::JSON END AS j
  FROM extracted_fast f JOIN extracted e USING (id))
SELECT count(*) AS reviews, round(avg(same::INT), 3) AS same_answer_as_dense,
       round(avg(coalesce(j->>'product' = r.product AND TRY_CAST(j->>'rating' AS INTEGER) = r.rating
                 AND j->>'sentiment' = r.sentiment AND j->>'issue' = r.issue, false)::INT), 3) AS sparse_all_fields,
       round(avg(coalesce(p.product = r.product AND p.rating = r.rating AND p.sentiment = r.sentiment
                          AND p.issue = r.issue, false)::INT), 3) AS dense_all_fields
FROM fields JOIN reviews r USING (id) JOIN predicted p USING (id)""",
}


def sparse_variant(con, out: TextIO) -> float:
    """A 50% TEAL variant of the demo model (calibrated on a few reviews), the same extraction over a few rows with
    it, its accuracy against the dense model and the truth, and EXPLAIN's per-layer sparsity; returns the seconds."""
    start = time.perf_counter()
    _step(con, "a 50%-sparse variant of the model (TEAL), calibrated on a few reviews", SPARSE_STEPS["create"], out)
    _step(con, f"the same extraction with the sparse variant over {SPARSE_ROWS} reviews", SPARSE_STEPS["extract"], out)
    _step(con, "the sparse variant against the dense model and the truth", SPARSE_STEPS["compare"], out)
    lines = [r[0] for r in con.execute("EXPLAIN " + SPARSE_STEPS["extract"]).fetchall()]
    sparse = [ln for ln in lines if ln.lstrip().startswith(("sparse model", "layer "))]
    out.write("\n-- EXPLAIN's per-layer sparsity of the variant\n" + "\n".join(sparse) + "\n")
    secs = time.perf_counter() - start
    out.write(
        f"sparse variant step: {secs:.1f} s (on the CPU sparsity saves little; on CUDA decode reads half the "
        "MLP weights)\n"
    )
    return secs


def _step(con, title: str, sql: str, out: TextIO, width: int = 60) -> list[tuple]:
    """Print a query, run it, print its result (if it has rows) and return the rows."""
    out.write(f"\n-- {title}\n{sql};\n")
    cur = con.execute(sql)
    if cur.description is None:
        return []
    rows = cur.fetchall()
    out.write(format_table(cur.description, rows, max_width=width) + "\n")
    return rows


TRAIN_STEPS = {
    "points": """CREATE OR REPLACE TABLE points AS
SELECT id, x1, x2, x3, (x1 + 2 * x2 - x3 > 0)::INT AS y
FROM (SELECT i AS id, ((i * 7919) % 1000) / 500.0 - 1 AS x1, ((i * 104729) % 997) / 498.5 - 1 AS x2,
             ((i * 1299709) % 991) / 495.5 - 1 AS x3 FROM range(1000) t(i))""",
    "train": """CREATE OR REPLACE MODEL clf OPTIONS (model_type = 'logistic_reg', label = 'y', optimizer = 'adam',
  learning_rate = 0.1, epochs = 4, batch_size = 250) AS SELECT x1, x2, x3, y FROM points""",
    "loss": """SELECT epoch, round(avg(loss), 4) AS loss, count(*) AS steps
FROM reldl.training_log WHERE name = 'model:clf' GROUP BY epoch ORDER BY epoch""",
    "accuracy": """SELECT round(avg(((predict('clf', x1, x2, x3) > 0.5)::INT = y)::INT), 3) AS accuracy FROM points""",
}


def train_model(db: Path, out: TextIO) -> float:
    """Train a logistic regression in SQL (relational autodiff: gradients and Adam updates are SQL over parameter
    tables), print its loss per epoch and accuracy; returns the accuracy."""
    out.write(f"\n-- training in the database: {db}\n")
    with reldl.connect(str(db)) as con:
        _step(con, "a synthetic table of 1,000 labelled points", TRAIN_STEPS["points"], out)
        start = time.perf_counter()
        _step(con, "train a model with relational autodiff (CREATE MODEL ... AS SELECT)", TRAIN_STEPS["train"], out)
        secs = time.perf_counter() - start
        out.write(f"trained in {secs:.1f} s\n")
        _step(con, "the loss of every epoch (one row per step in reldl.training_log)", TRAIN_STEPS["loss"], out)
        acc = _step(con, "the trained model in predict()", TRAIN_STEPS["accuracy"], out)[0][0]
    return float(acc)


def run(
    directory: Path | None = None,
    rows: int = 300,
    device: str = "auto",
    min_accuracy: float = 0.9,
    out: TextIO | None = None,
) -> int:
    """Run the demo; returns the process exit status (0: accuracy at or above `min_accuracy`)."""
    out = out or sys.stdout
    registry.resolve_device(device)  # an unknown or missing device: one line before anything is made
    if directory:  # checked first: one line naming it (not a traceback) if it cannot be used
        directory = paths.work_dir("reldl demo: directory", directory)
        directory.mkdir(parents=True, exist_ok=True)
        return _run(directory, rows, device, min_accuracy, out)
    directory = Path(tempfile.mkdtemp(prefix="reldl-demo-"))
    try:
        return _run(directory, rows, device, min_accuracy, out)
    except BaseException:  # a failed or interrupted demo leaves no temporary folder behind
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _run(directory: Path, rows: int, device: str, min_accuracy: float, out: TextIO) -> int:
    db = directory / "demo.db"
    out.write(f"reldl demo: database {db}\n")
    with reldl.connect(str(db)) as con:
        con.execute(
            "CREATE OR REPLACE TABLE reviews (id INTEGER, review VARCHAR, product VARCHAR, rating INTEGER, "
            "sentiment VARCHAR, issue VARCHAR)"
        )
        reviews = data.reviews(rows, seed=data.HELDOUT_SEED, split="heldout")
        con.cursor().executemany(
            "INSERT INTO reviews VALUES (?, ?, ?, ?, ?, ?)",
            [(r.id, r.text, r.product, r.rating, r.sentiment, r.issue) for r in reviews],
        )
        out.write(f"loaded {rows} held-out reviews (never seen in training) into table reviews\n")
        _step(
            con,
            "register the model reldl ships (a 2.2M-parameter Llama trained by reldl/demo/train.py)",
            f"CREATE OR REPLACE MODEL demo OPTIONS (model_type = 'llm', path = '{MODEL_DIR}', device = '{device}')",
            out,
        )
        _step(con, "the registered models", "SHOW MODELS", out)
        _step(con, "how reldl's planner will run the extraction, and why", "EXPLAIN " + STEPS["extract"], out, 130)
        start = time.perf_counter()
        _step(con, f"extract product, rating, sentiment and issue from {rows} reviews", STEPS["extract"], out)
        secs = time.perf_counter() - start
        answers = [a for (a,) in con.execute("SELECT answer FROM extracted").fetchall()]
        eng = registry.get_engine("demo", str(MODEL_DIR), "auto", device)
        tokens = sum(len(eng.tokenizer.encode(a or "", add_special_tokens=False).ids) for a in answers)
        out.write(
            f"generated {len(answers)} rows in {secs:.1f} s: {len(answers) / secs:.1f} rows/s, "
            f"{tokens / secs:.0f} tokens/s ({eng.device}, {str(eng.dtype).removeprefix('torch.')})\n"
        )
        _step(con, "the generated JSON as columns", STEPS["predicted"], out)
        _step(con, "a few rows", STEPS["sample"], out)
        _step(
            con,
            "generated sentiment against the truth (a join and a GROUP BY over the generated column)",
            STEPS["confusion"],
            out,
        )
        acc = _step(con, "accuracy against ground truth", STEPS["accuracy"], out)[0]
        _step(con, "three samples of one review's JSON (n := 3, sharing the prompt's KV)", STEPS["samples"], out, 100)
        _step(con, "beam search (beam_width := 3: the beams, best first)", STEPS["beams"], out, 100)
        sparse_variant(con, out)
    exact = acc[-1] or 0.0
    train_model(directory / "train.db", out)
    out.write(
        f"\nexact match on all four fields: {exact:.1%} (the shipped model's documented held-out accuracy is in "
        f"{MODEL_DIR / 'training.json'})\n"
        f"\nNext:\n  reldl sql {db}        # the same database in reldl's SQL shell\n"
        "  CREATE MODEL mine OPTIONS (model_type = 'llm', path = '/dir/with/config.json+safetensors+tokenizer.json');\n"
    )
    if exact < min_accuracy:
        out.write(f"FAILED: exact match {exact:.1%} is below {min_accuracy:.0%}\n")
        return 1
    return 0
