"""Offloaded models from SQL (issue 8): CREATE MODEL ... OPTIONS (offload = 'auto' | policy), llm_generate through
the FlexGen executor with exactly the dense model's greedy text, EXPLAIN's policy and predicted throughput,
one-line errors that leave the catalog as it was, and `reldl calibrate`'s offload keys. On the CPU the "GPU" is the
CPU (the executor's CPU mode); tiers stand in for each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import checkpoints as ck
import pytest
from sqlhelpers import one_line, quote, usable

import reldl
from reldl import registry
from reldl.llm.offload import sql as offload_sql
from reldl.llm.offload.policy import ModelShape, Policy, placed_shares

PROMPTS = ["Alice went to", "The product is really", "Bob", "Paris London Berlin Tokyo Madrid Rome", "x", "Oslo is"]
DISK_HALF = "weights = 50/0/50, cache = 0/100/0, gpu_batch_size = 2, num_gpu_batches = 2"
CPU_JSON = json.dumps(
    {"gpu_batch_size": 4, "weights": [0, 1, 0], "cache": [0, 0, 1], "activations": [0, 1, 0], "cpu_attention": True}
)
COMPRESSED = "compress_weight = true, compress_cache = true, gpu_batch_size = 3"
COMPRESSED_OFF = COMPRESSED + ", weights = 0/50/50, cache = 30/30/40"


@pytest.fixture(scope="module")
def opt_ckpt(ckpt_root) -> Path:
    return ck.make_checkpoint(ckpt_root / "opt_offload", "opt")


def _create(name, path, offload=None, extra="", verb="CREATE"):
    off = "" if offload is None else f", offload = {quote(offload)}"
    return (
        f"{verb} MODEL {name} OPTIONS (model_type = 'llm', path = {quote(path)}, dtype = 'float32', device = 'cpu'"
        f"{off}{extra})"
    )


def _generate(conn, model, max_tokens=6, extra=""):
    sql = f"SELECT p, llm_generate(p, model := {quote(model)}, max_tokens := {max_tokens}{extra}) FROM t ORDER BY p"
    return conn.execute(sql).fetchall()


def _spec(conn, name):
    row = conn.execute("SELECT options FROM reldl.models WHERE name = ?", [name]).fetchall()
    return json.loads(row[0][0])["offload"]


def _explain(conn, sql):
    return [r[0] for r in conn.execute("EXPLAIN " + sql).fetchall()]


@pytest.fixture
def table(conn):
    conn.execute("CREATE TABLE t AS SELECT unnest(?) AS p", [PROMPTS])
    yield conn
    registry.unload()


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_offloaded_equals_dense(table, family, opt_ckpt, llama_ckpt):
    conn, path = table, (opt_ckpt if family == "opt" else llama_ckpt)
    conn.execute(_create("dense", path))
    conn.execute(_create("auto", path, "auto"))
    conn.execute(_create("disk", path, DISK_HALF))
    conn.execute(_create("cpu", path, CPU_JSON))
    assert _spec(conn, "auto")["mode"] == "auto" and _spec(conn, "disk")["mode"] == "policy"
    assert _spec(conn, "disk")["policy"]["weights"] == [0.5, 0.0, 0.5]
    assert _spec(conn, "cpu")["policy"]["cpu_attention"] is True
    dense = _generate(conn, "dense")
    assert len({r[1] for r in dense}) > 1
    for m in ("auto", "disk", "cpu"):
        assert _generate(conn, m) == dense, m
    # the DL-centric plan: every distinct prompt in one engine call; stop strings cut as the Engine cuts them
    conn.execute("SET reldl_plan = 'dl'")
    assert _generate(conn, "disk") == dense
    stop = dense[0][1][2:4]
    extra = f", stop := {quote(stop)}"
    assert _generate(conn, "disk", extra=extra) == _generate(conn, "dense", extra=extra)
    # 4-bit: the same text wherever the compressed tensors live
    conn.execute(_create("q_gpu", path, COMPRESSED))
    conn.execute(_create("q_off", path, COMPRESSED_OFF))
    assert _generate(conn, "q_off") == _generate(conn, "q_gpu")
    conn.execute("RESET reldl_plan")


def test_auto_under_caps_and_explain(table, opt_ckpt, tmp_path):
    conn = table
    conn.execute(_create("dense", opt_ckpt))
    off_dir = tmp_path / "offload"
    conn.execute(_create("capped", opt_ckpt, "auto", f", gpu_memory = '1MB', offload_dir = {quote(off_dir)}"))
    spec = _spec(conn, "capped")
    assert spec["caps"] == {"gpu": 1e6} and spec["offload_dir"] == str(off_dir)
    pol = spec["policy"]
    assert min(pol["weights"][0], pol["cache"][0], pol["activations"][0]) < 1  # the cap moved something off the GPU
    assert spec["estimate"]["gpu_bytes"] <= 1e6
    assert _generate(conn, "capped") == _generate(conn, "dense")
    sql = "SELECT llm_generate(p, model := 'capped', max_tokens := 6) FROM t"
    lines = _explain(conn, sql)
    text = "\n".join(lines)
    assert "offloaded model capped: policy searched (offload = 'auto'); hardware uncalibrated" in text
    placed = "weights " + "/".join(str(round(100 * f)) for f in pol["weights"])  # the searched policy, as shown
    assert any("offload policy: block" in ln and placed in ln for ln in lines)
    shown = [ln for ln in lines if "weights as placed" in ln]  # only where whole tensors change the shares
    want = offload_sql.placed_weight_line(ModelShape(**spec["shape"]), offload_sql.policy_of(spec))
    assert shown == ([f"  {want}"] if want else [])
    (thr,) = [ln for ln in lines if "predicted throughput:" in ln]
    assert "tokens/s" in thr and "6 new tokens" in thr
    conn.execute("SET reldl_plan = 'dl'")
    lines = _explain(conn, sql)
    assert any("~6 distinct prompts" in ln for ln in lines)
    assert any("DL-centric plan hands the engine every distinct prompt" in ln for ln in lines)
    conn.execute("RESET reldl_plan")
    dense_lines = _explain(conn, "SELECT llm_generate(p, model := 'dense') FROM t")
    assert not any("offload" in ln for ln in dense_lines)
    conn.execute("DROP MODEL capped")
    assert not registry._offloaded


def test_unsupported_decoding_is_one_line(table, opt_ckpt):
    conn = table
    conn.execute(_create("big", opt_ckpt, DISK_HALF))
    for extra, word in (
        (", temperature := 0.7, seed := 1", "temperature"),
        (", n := 2", "n > 1"),
        (", beam_width := 2", "beam_width"),
    ):
        with pytest.raises(reldl.NotSupportedError) as e:
            conn.execute(f"SELECT llm_generate('Alice', model := 'big', max_tokens := 3{extra})").fetchall()
        msg = one_line(e.value)
        assert "offloaded" in msg and "greedily" in msg and word in msg
    with pytest.raises(reldl.NotSupportedError) as e:
        conn.execute("SELECT llm_score('Alice', ' went', model := 'big')").fetchall()
    assert "only generates" in one_line(e.value)
    # greedy with top_k / top_p (ignored under greedy decoding, as by the Engine) is fine
    out = conn.execute("SELECT llm_generate('Alice', model := 'big', max_tokens := 3, top_k := 5)").fetchall()
    assert isinstance(out[0][0], str)
    usable(conn)


# a fresh process with its temp folder (TMPDIR) in argv[2]: one model dropped, one still loaded when the process exits
SPILL_SCRIPT = """
import sys, tempfile
from pathlib import Path
import reldl
ckpt, tmp = sys.argv[1], Path(tempfile.gettempdir())
spills = lambda: sorted(p.name for p in tmp.glob("reldl-offload-*"))
conn = reldl.connect()
for m, batch, c in (("dropped", 2, "0/50/50"), ("kept", 3, "0/50/50"), ("nodisk", 4, "0/100/0")):  # three engines
    conn.execute(f"CREATE MODEL {m} OPTIONS (model_type = 'llm', path = '{ckpt}', dtype = 'float32', "
                 f"device = 'cpu', offload = 'weights = 50/50/0, cache = {c}, gpu_batch_size = {batch}')")
    conn.execute(f"SELECT llm_generate('Alice', model := '{m}', max_tokens := 2)").fetchall()
print(len(spills()), all(any((tmp / d).iterdir()) for d in spills()))
conn.execute("DROP MODEL dropped")
print(len(spills()))
conn.close()
"""


def test_temporary_offload_dir_goes_with_the_model_and_the_process(opt_ckpt, tmp_path):
    """Without offload_dir the disk tier spills into a temporary directory of the model's own: DROP MODEL removes
    it, and so does the process's exit while the model is still loaded (it stayed behind in the temp folder). A
    model with no disk share makes no directory at all."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", SPILL_SCRIPT, str(opt_ckpt)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "True", "1"]  # one per disk model, its KV cache in it; DROP: one left
    assert not list(tmp_path.glob("reldl-offload-*"))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc")
def test_offload_dir_on_proc_is_refused(conn, opt_ckpt):
    """As root, os.access calls /proc writable: the pseudo-file system is refused by name, in one line."""
    for where in ("/proc/reldl-offload", "/proc/self/fd"):
        with pytest.raises(reldl.ProgrammingError) as e:
            conn.execute(_create("big", opt_ckpt, "auto", f", offload_dir = {quote(where)}"))
        assert one_line(e.value).startswith(f"CREATE MODEL big: offload_dir {where} is on a kernel pseudo-file system")
    assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]


BAD = [
    ("offload = 'weights = 50/50'", "gpu/cpu/disk shares"),
    ("offload = 'weights = 50/20/20'", "weights shares must sum to 100 (gpu/cpu/disk %), got 50/20/20 = 90"),
    ("offload = 'gpu_batch = 4'", "unknown offload policy field"),
    ("offload = 'gpu_batch_size = 0'", "gpu_batch_size must be an integer >= 1"),
    ("offload = '{\"gpu_batch_size\": 2,'", "not valid JSON"),
    ("offload = 'compress_weight = maybe'", "true or false"),
    ("offload = 'fast please'", "'auto' or a policy"),
    ("offload = 'auto', gpu_memory = '16XB'", "size such as '16GB'"),
    ("offload = 'auto', gpu_memory = '-1GB'", "size such as"),
    ("gpu_memory = '16GB'", "need(s) offload"),
    ("offload = 'auto', gpu_memory = '10KB'", "no policy on the grid fits"),
    ("offload = 'gpu_batch_size = 2', gpu_memory = '100KB'", "over the 97.7 KiB available (gpu_memory)"),
    ("offload = 'auto', prompt_len = 250, gen_len = 32", "exceed the model's context"),
    ("offload = 'auto', gen_len = 0", "gen_len must be an integer >= 1"),
    ("offload = 'auto', offload_dirs = '/tmp'", "unknown option"),
]


@pytest.mark.parametrize("options,expected", BAD)
def test_bad_offload_options_leave_catalog(conn, opt_ckpt, options, expected):
    conn.execute(_create("big", opt_ckpt, "gpu_batch_size = 1"))
    before = conn.execute("SELECT name, options FROM reldl.models").fetchall()
    sql = (
        f"CREATE OR REPLACE MODEL big OPTIONS (model_type = 'llm', path = {quote(opt_ckpt)}, dtype = 'float32', "
        f"device = 'cpu', {options})"
    )
    with pytest.raises(reldl.ProgrammingError) as e:
        conn.execute(sql)
    assert expected in one_line(e.value)
    assert conn.execute("SELECT name, options FROM reldl.models").fetchall() == before


def test_gpt2_is_refused(conn, other_ckpt):
    with pytest.raises(reldl.ProgrammingError) as e:
        conn.execute(_create("g", other_ckpt, "auto"))
    assert "OPT and Llama-family" in one_line(e.value)
    assert conn.execute("SELECT count(*) FROM reldl.models").fetchall() == [(0,)]


def test_calibrate_stores_offload_keys(conn, opt_ckpt, tmp_path):
    from reldl.calibrate import calibrate_offload

    def fake(quick, disk_path):
        assert quick
        return {"offload_dtoc_bw": 1.5e9, "offload_cpu_attn_flops": 2e9, "offload_ctod_bw": 1e9}, ["gpu_flops"]

    said: list[str] = []
    stored = calibrate_offload(conn.duckdb_connection, said.append, measure=fake)
    assert stored["offload_dtoc_bw"] == 1.5e9 and any("skipped gpu_flops" in s for s in said)
    rows = dict(conn.execute("SELECT key, value FROM reldl.calibration WHERE key LIKE 'offload_%'").fetchall())
    assert rows == stored
    conn.execute(_create("big", opt_ckpt, DISK_HALF))
    assert _spec(conn, "big")["calibrated"] is True
    lines = _explain(conn, "SELECT llm_generate('Alice', model := 'big')")
    assert any("hardware calibrated (reldl calibrate)" in ln for ln in lines)
    # the real quick measurement on this machine (CPU only here: the GPU side is skipped and said so)
    said.clear()
    stored = calibrate_offload(conn.duckdb_connection, said.append, disk_path=str(tmp_path))
    assert stored["offload_dtoc_bw"] > 0 and stored["offload_cpu_attn_flops"] > 0 and stored["offload_cpu_mem"] > 0
    registry.unload()


def test_explain_shows_weights_as_placed():
    """A policy share that whole tensors cannot meet (85% of an OPT-30B layer on the GPU: its two 4h x h matrices
    and the fused q/k/v and o projections) is shown as placed; a share they meet exactly (all on the GPU) adds no
    line."""
    shape = ModelShape.opt("30b")
    line = offload_sql.placed_weight_line(shape, Policy(8, weights=(0.85, 0.15, 0.0)))
    gpu = placed_shares([shape.layer_tensors(fused_qkv=True)], (0.85, 0.15, 0.0))[0]  # no disk share: q, k, v fused
    assert line is not None and line.endswith(f"{round(100 * gpu)}/{100 - round(100 * gpu)}/0") and gpu < 0.85
    assert offload_sql.placed_weight_line(shape, Policy(8)) is None
