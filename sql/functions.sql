-- Named-argument front ends of reldl's SQL functions (temporary macros, created on every connection).
-- The Python UDFs behind them take every argument positionally; $generate and $score are their names on this
-- connection (filled in by udfs/llm.py), $generate_list the list-returning one.
CREATE OR REPLACE TEMP MACRO llm_generate(
    prompt, model := NULL, max_tokens := 64, temperature := 0.0, top_p := 1.0, top_k := 0,
    seed := NULL, stop := NULL, truncate := NULL
) AS $generate(prompt, model, max_tokens, temperature, top_p, top_k, seed, to_json(stop), truncate);

-- n samples / beam_width beams as a LIST(VARCHAR). On reldl connections the planner rewrites llm_generate(...) calls
-- that pass n or beam_width to this function (a macro's return type cannot depend on an argument). n and beam_width
-- reach the UDF as JSON (like stop) so that it checks them whatever their SQL type (2.5, '2', true, NULL); the
-- beam_width default is a marker (no beam search) that a NULL the user passes cannot be mistaken for.
CREATE OR REPLACE TEMP MACRO llm_generate_list(
    prompt, model := NULL, max_tokens := 64, temperature := 0.0, top_p := 1.0, top_k := 0,
    seed := NULL, stop := NULL, truncate := NULL, n := 1, beam_width := {'reldl_default': true}
) AS $generate_list(
    prompt, model, max_tokens, temperature, top_p, top_k, seed, to_json(stop), truncate, to_json(n), to_json(beam_width)
);

CREATE OR REPLACE TEMP MACRO llm_score(prompt, continuation, model := NULL)
AS $score(prompt, continuation, model);
