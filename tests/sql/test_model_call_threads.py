"""Statements with model calls run on DuckDB's calling thread; the user's `threads` setting comes back afterwards,
also when the statement fails and when two cursors run model calls at once."""

from __future__ import annotations

import threading

import pytest

import reldl


def _threads(con) -> int:
    return int(con.execute("SELECT current_setting('threads')").fetchall()[0][0])


def test_threads_setting_restored_after_model_call(llm):
    llm.execute("SET threads = 2")
    assert llm.execute("SELECT llm_generate('hello', max_tokens := 2) IS NOT NULL").fetchall() == [(True,)]
    assert _threads(llm) == 2
    with pytest.raises(reldl.ProgrammingError):
        llm.execute("SELECT llm_generate('hello', max_tokens := -1)")
    assert _threads(llm) == 2


def test_udf_runs_while_threads_is_one(llm, monkeypatch):
    from reldl.udfs.llm import LLMFunctions

    seen = []
    original = LLMFunctions._engine

    def spy(self, model):
        cur = self.duck.cursor()
        seen.append(int(cur.execute("SELECT current_setting('threads')").fetchall()[0][0]))
        cur.close()
        return original(self, model)

    monkeypatch.setattr(LLMFunctions, "_engine", spy)
    llm.execute("SET threads = 2")
    llm.execute("SELECT llm_generate('hi', max_tokens := 1)").fetchall()
    assert seen == [1]
    assert _threads(llm) == 2


def test_concurrent_model_calls_restore_threads_once_both_end(llm):
    llm.execute("SET threads = 2")
    errors = []

    def work(i: int) -> None:
        cur = llm.cursor()
        try:
            cur.execute("SELECT llm_generate('row ' || i::VARCHAR, max_tokens := 4) FROM range(20) t(i)").fetchall()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            cur.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _threads(llm) == 2


def test_model_created_in_open_transaction_is_usable_there(conn, llama_ckpt):
    conn.execute("BEGIN")
    conn.execute(f"CREATE MODEL pending OPTIONS (model_type = 'llm', path = '{llama_ckpt}')")
    ((text,),) = conn.execute("SELECT llm_generate('hello', max_tokens := 3)").fetchall()
    assert isinstance(text, str)
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]
    with pytest.raises(reldl.ProgrammingError, match="no LLM is registered"):
        conn.execute("SELECT llm_generate('hello')")
