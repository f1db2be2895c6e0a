#!/usr/bin/env bash
# The core's tests against the OLDEST transformers vlm_ros supports (pyproject.toml:
# transformers>=4.56,!=5.0.0), while .venv/ keeps the newest. ROS 2 Humble / JetPack machines
# often carry an older transformers than the one the rest of the tests run on; the APIs the
# core leans on (StaticCache, the cache= rename, the vision layers' signatures) changed between.
#
#   bash scripts/compat.sh [pytest args]     (scripts/test.sh runs it before the main suite)
#
# The floor is installed once, without dependencies beside those it needs at that version,
# into .venv/compat/transformers-<version>/ and put first on PYTHONPATH for this run only.
# Checked by hand, not here: 4.57.3, 5.1.0, 5.3.0, 5.5.4, 5.10.4, 5.17.0 pass the same tests;
# 5.0.0 fails (its PhiModel reads a pad_token_id its PhiConfig does not set), 4.53 lacks
# StaticCache(config=, max_cache_len=).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VLM_ROS_VENV:-$ROOT/.venv}"
FLOOR="${VLM_ROS_TRANSFORMERS_FLOOR:-4.56.2}"
DIR="$VENV/compat/transformers-$FLOOR"
if [[ ! -f "$DIR/.complete" ]]; then
    echo "[compat] installing transformers $FLOOR into $DIR"
    rm -rf "$DIR"
    # transformers 4.x wants huggingface-hub < 1 (which wants requests) and tokenizers < 0.23
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$DIR" \
        "transformers==$FLOOR" "huggingface-hub==0.36.2" "tokenizers==0.22.2" \
        requests urllib3 idna charset-normalizer certifi
    touch "$DIR/.complete"
fi
export PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
"$VENV/bin/python" - "$FLOOR" <<'PY'
import sys

import transformers

assert transformers.__version__ == sys.argv[1], (transformers.__version__, transformers.__file__)
print(f"[compat] transformers {transformers.__version__} from {transformers.__file__}")
PY
TESTS=(test/test_checkpoint.py test/test_parity.py test/test_pipeline.py
       test/test_static_decode.py test/test_onnx_export.py test/test_cpu_kernels.py
       test/test_bench.py test/test_family_facts.py test/test_phi_step.py)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@"
