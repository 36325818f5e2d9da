#!/usr/bin/env bash
# The GPU checks in one go, at most 8 minutes on one H200: tests/gpu/ (the policy
# on CUDA in bf16 against fp32, the fused log-prob op against naive autograd
# with timings, weight sync through CUDA IPC between two processes on one GPU,
# THD packing under Transformer Engine when installed) and the fused-op
# benchmark, summarised in one JSON file.
#
#   tools/gpu_check.sh [OUT_DIR]          (default: gpu_check)
#
# Needs torch with CUDA and transformers. A GPU machine without network gets the
# rest from wheels made here first:
#   tools/gpu_check.sh --download-wheels .cache/gpu-wheels    (on a machine with PyPI)
#   WHEEL_DIR=.cache/gpu-wheels tools/gpu_check.sh OUT_DIR    (on the GPU machine)
# Writes OUT_DIR/summary.json: the GPU, torch, each test's outcome and
# duration, the FIGURE lines the tests print, and the benchmark's rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
# What the GPU tests import beyond torch and transformers (pure Python, or small).
WHEELS=(megatron-core==0.16.1 pydantic pydantic-core annotated-types typing-inspection aiohttp aiohappyeyeballs
        aiosignal attrs frozenlist multidict propcache yarl idna pyyaml safetensors tqdm psutil requests
        pytest pluggy iniconfig packaging)

if [[ ${1:-} == --download-wheels ]]; then
    dest=${2:?usage: tools/gpu_check.sh --download-wheels DIR}
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" "${WHEELS[@]}"
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$dest" .
    echo "wheels in $dest ($(du -sh "$dest" | cut -f1)); carry them to the GPU machine and set WHEEL_DIR"
    exit 0
fi

out=${1:-gpu_check}
mkdir -p "$out"
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device" >&2
    exit 2
fi
if [[ -n ${WHEEL_DIR:-} ]]; then
    # Only what the image lacks; never replace its torch or transformers.
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEEL_DIR" --no-deps \
        "$(ls "$WHEEL_DIR"/megatron_gppo-*.whl)" "${WHEELS[@]}" 2>&1 | tail -3 || true
fi

status=0
timeout 360 "$PYTHON" -m pytest tests/gpu -s -rA -p no:cacheprovider --junitxml "$out/junit.xml" \
    2>&1 | tee "$out/pytest.log" || status=$?
timeout 90 "$PYTHON" tools/bench_logprobs.py --device cuda --tokens 8192 --repeats 2 \
    > "$out/bench_logprobs.jsonl" 2> "$out/bench_logprobs.err" || status=$?

"$PYTHON" - "$out" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

out = Path(sys.argv[1])
tests = {}
if (out / "junit.xml").exists():
    for case in ET.parse(out / "junit.xml").iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        tests[f"{case.get('classname')}::{case.get('name')}"] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
log = (out / "pytest.log").read_text(errors="replace") if (out / "pytest.log").exists() else ""
figures = [json.loads(line.split("FIGURE ", 1)[1]) for line in log.splitlines() if "FIGURE {" in line]
bench = [json.loads(line) for line in (out / "bench_logprobs.jsonl").read_text().splitlines() if line.strip()] \
    if (out / "bench_logprobs.jsonl").exists() else []
summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "tests": tests, "figures": figures, "bench_logprobs": bench}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
passed = sum(t["outcome"] == "passed" for t in tests.values())
print(f"gpu_check: {passed}/{len(tests)} tests passed on {summary['gpu']}; summary in {out / 'summary.json'}")
EOF
exit $status
