#!/usr/bin/env bash
# Installs the issue-8 baselines for benchmarks/bench_offload_baselines.py on the GPU box (no network there) from the
# wheels in .whl/baselines/ (git-ignored; the device call carries them with `carry: [".whl"]`):
#   flexgen 0.1.8   (pure Python; always, the image has none)
#   attrs 26.1.0, accelerate 1.15.0, tqdm 4.70.1   (each only where python3 cannot import it: flexgen.utils does
#       `from attr import define`; the image lists accelerate 1.15.0, and transformers needs tqdm)
# into ${RELDL_BASELINES_SITE:-/tmp/reldl-baselines} with `pip install --no-index --no-deps --target`.
# Idempotent: a package python3 can already import (from the image, PYTHONPATH or that site) is skipped.
# bench_offload_baselines.py appends that site to sys.path itself; for other programs:
#   export PYTHONPATH=$PYTHONPATH:/tmp/reldl-baselines
# flexgen's declared need not installed: pulp (imported only by its experimental/cost_model.py, which the harness
# never imports); torch, transformers, numpy come from the image.
# Re-download (here, where PyPI works):
#   pip download --no-deps -d .whl/baselines flexgen==0.1.8 attrs==26.1.0 accelerate==1.15.0 \
#       tqdm==4.70.1
set -euo pipefail
cd "$(dirname "$0")/../.."
site=${RELDL_BASELINES_SITE:-/tmp/reldl-baselines}
py=${PYTHON:-python3}
mkdir -p "$site"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$site
want=()
for spec in flexgen:flexgen attr:attrs accelerate:accelerate tqdm:tqdm; do
    mod=${spec%%:*} dist=${spec##*:}
    if "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)"; then
        echo "baselines: $mod already importable: $("$py" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null || echo '?')"
        continue
    fi
    whl=$(ls .whl/baselines/"$dist"-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$whl" ]; then
        echo "baselines: no wheel for $dist in .whl/baselines (carry .whl?)" >&2
        exit 1
    fi
    want+=("$whl")
done
if [ ${#want[@]} -gt 0 ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${want[@]}"
    echo "baselines: installed into $site: ${want[*]##*/}"
fi
"$py" -c "import flexgen, accelerate, transformers, torch; print('baselines: flexgen', flexgen.__file__, '| accelerate', accelerate.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
