-- Front ends of reldl's tabular-model functions (temporary macros, created on every connection).
-- $predict and $predict_proba are this connection's names of the Arrow UDFs (filled in by udfs/predict.py).
-- DuckDB macros are not variadic: predict(model, f1, f2, ...) is rewritten into predict(model, [f1, f2, ...]) by
-- planner/predict_calls.py.
CREATE OR REPLACE TEMP MACRO predict(model, features) AS $predict(model, features::DOUBLE[]);

CREATE OR REPLACE TEMP MACRO predict_proba(model, features) AS $predict_proba(model, features::DOUBLE[]);
