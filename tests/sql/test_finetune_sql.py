"""Fine-tuning from SQL: CREATE MODEL tuned OPTIONS (model_type = 'llm', base = ..., finetune = 'full' | 'lora') AS
SELECT prompt, completion FROM examples; the result serves llm_generate; a killed statement resumes; one-line errors
leave the catalog as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlhelpers import create_model_sql, one_line, quote

import reldl
from reldl import registry
from reldl.llm.finetune import trainer as T

PROMPTS = ["Alice went to", "Bob likes the", "Carol saw a"]
ANSWERS = [" the market today", " red apple pie", " small green boat"]


def _examples(conn):
    conn.execute("CREATE TABLE ex (prompt VARCHAR, completion VARCHAR)")
    conn.cursor().executemany("INSERT INTO ex VALUES (?, ?)", list(zip(PROMPTS, ANSWERS)))


def _create(name, method, extra="", query="SELECT prompt, completion FROM ex", verb="CREATE"):
    return (
        f"{verb} MODEL {name} OPTIONS (model_type = 'llm', base = 'base', finetune = {quote(method)}, "
        f"batch_size = 3, seed = 1{extra}) AS {query}"
    )


def _rows(conn):
    return conn.execute("SELECT name, path, options FROM reldl.models ORDER BY name").fetchall()


@pytest.mark.parametrize(
    "method,extra",
    [
        ("full", ", epochs = 40, learning_rate = 0.003"),
        ("lora", ", epochs = 40, learning_rate = 0.02, lora_targets = 'q,v,o,gate,up,down', lora_rank = 8"),
    ],
)
def test_memorize_then_generate(conn, llama_ckpt, method, extra):
    conn.execute(create_model_sql("base", llama_ckpt))
    _examples(conn)
    sql = "SELECT llm_generate(prompt, model := {m}, max_tokens := 24) FROM ex ORDER BY prompt"
    before = [r[0] for r in conn.execute(sql.format(m="'base'")).fetchall()]
    conn.execute(_create("tuned", method, extra))
    ((name, path, options),) = [r for r in _rows(conn) if r[0] == "tuned"]
    o = json.loads(options)
    assert o["finetuned"] and o["finetune"] == method and o["base"] == "base" and o["finetune_dir"] == path
    assert o["report"]["final_loss"] < 0.1 * o["report"]["first_loss"]
    assert (Path(path) / "model.safetensors").is_file() and (Path(path) / "finetune.json").is_file()
    after = [r[0] for r in conn.execute(sql.format(m="'tuned'")).fetchall()]
    for got, want in zip(after, sorted(zip(PROMPTS, ANSWERS))):
        # full fine-tuning also learns to stop (EOS); LoRA on the layers cannot lift EOS's logit, which the test
        # checkpoint scales down in the LM head (checkpoints.py), so its answer runs on after the completion
        assert got == want[1] if method == "full" else got.startswith(want[1]), (got, want)
    assert before != after
    log = conn.execute(
        "SELECT count(*), min(epoch), max(epoch) FROM reldl.training_log WHERE name = 'tuned'"
    ).fetchall()
    assert log == [(40, 1, 40)]
    registry.unload("tuned")
    registry.unload("base")


def test_resume_after_kill(tmp_path, llama_ckpt):
    db = tmp_path / "ft.duckdb"
    stmt = _create("tuned", "full", ", epochs = 3, checkpoint_steps = 1, learning_rate = 0.001")
    with reldl.connect(str(db)) as conn:
        conn.execute(create_model_sql("base", llama_ckpt))
        _examples(conn)
        T.FAULT_AFTER_STEP = 2
        try:
            with pytest.raises(T.SimulatedKill):
                conn.execute(stmt)
        finally:
            T.FAULT_AFTER_STEP = None
        assert [r[0] for r in _rows(conn)] == ["base"]  # nothing registered
        conn.execute(stmt)  # resumes
        o = json.loads([r for r in _rows(conn) if r[0] == "tuned"][0][2])
        assert o["report"]["resumed_from_step"] == 1 and o["report"]["steps"] == 3
        resumed = conn.execute("SELECT llm_generate('Alice went to', model := 'tuned', max_tokens := 6)").fetchall()
        # an uninterrupted run of the same statement under another name gives the same weights
        conn.execute(stmt.replace("MODEL tuned", "MODEL again"))
        p1 = Path([r for r in _rows(conn) if r[0] == "tuned"][0][1])
        p2 = Path([r for r in _rows(conn) if r[0] == "again"][0][1])
        from safetensors.torch import load_file

        a, b = load_file(str(p1 / "model.safetensors")), load_file(str(p2 / "model.safetensors"))
        assert all((a[k] == b[k]).all() for k in a)
        again = conn.execute("SELECT llm_generate('Alice went to', model := 'again', max_tokens := 6)").fetchall()
        assert resumed == again
    registry.unload()


@pytest.mark.parametrize(
    "stmt,msg",
    [
        (_create("t", "full").replace("base = 'base'", "base = 'nope'"), "does not exist"),
        (_create("t", "full").replace("base = 'base'", "base = 'tab'"), "not an LLM"),
        (_create("t", "full", query="SELECT prompt AS p, completion FROM ex"), "missing: prompt"),
        (_create("t", "full", query="SELECT prompt, completion FROM ex WHERE false"), "no examples"),
        (_create("t", "sgd"), "'finetune' must be one of"),
        (_create("t", "full", ", epochs = 0"), "'epochs' must be an integer"),
        (_create("t", "full", ", micro_batch = -1"), "'micro_batch' must be an integer"),
        (_create("t", "full", ", colour = 'red'"), "unknown option"),
        (_create("t", "lora", ", lora_targets = 'fc9'"), "lora_targets"),
        (_create("t", "full", ", optimizer_placement = 'gpu'"), "optimizer_placement"),
        (_create("t", "full", ", gpu_memory = '16XB'"), "gpu_memory must be a size such as '16GB'"),
        (_create("t", "full", ", gpu_memory = '-1GB'"), "gpu_memory must be a size"),
        (_create("t", "full", ", gpu_memory_gb = 'lots'"), "'gpu_memory_gb' must be a number"),
        (_create("t", "full", ", gpu_memory = '1GB', gpu_memory_gb = 1"), "not both"),
        (_create("base", "full"), "already exists"),
    ],
)
def test_errors_leave_catalog_unchanged(conn, llama_ckpt, tmp_path, stmt, msg):
    conn.execute(create_model_sql("base", llama_ckpt))
    conn.execute("CREATE TABLE xy AS SELECT i::DOUBLE AS x, (2 * i)::DOUBLE AS label FROM range(8) t(i)")
    conn.execute("CREATE MODEL tab OPTIONS (model_type = 'linear_reg', epochs = 1) AS SELECT x, label FROM xy")
    _examples(conn)
    before = _rows(conn)
    with pytest.raises(reldl.Error) as e:
        conn.execute(stmt)
    assert msg in one_line(e.value)
    assert _rows(conn) == before


@pytest.mark.parametrize(
    "opts,budget",
    [
        ({"gpu_memory": "16GB"}, 16e9),  # DuckDB's sizes, as offloading's gpu_memory: GB = 1000^3
        ({"gpu_memory": "512 MiB"}, 512 * 2**20),
        ({"gpu_memory": "1073741824B"}, 2**30),  # bytes, with their unit (a bare number is refused)
        ({"gpu_memory_gb": 2}, 2 * 2**30),  # the older alias: GiB
        ({}, None),
    ],
)
def test_gpu_memory_option(opts, budget):
    from reldl.llm.finetune.sql import check_options

    s, _ = check_options("t", {"model_type": "llm", "base": "b", "finetune": "full", **opts}, True)
    assert s.gpu_memory == budget


def test_micro_batch_option():
    from reldl.llm.finetune.sql import check_options

    s, _ = check_options("t", {"model_type": "llm", "base": "b", "finetune": "full", "micro_batch": 2}, True)
    assert s.micro_batch == 2 and s.math()["micro_batch"] == 2  # rows per pass: part of the run's fingerprint
    s, _ = check_options("t", {"model_type": "llm", "base": "b", "finetune": "full"}, True)
    assert s.micro_batch == 0 and "micro_batch" not in s.math()  # default: the whole batch, fingerprint as before
