#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on an air-gapped GPU node, fetched here (a machine with the package
# registries) into .whl/ (git-ignored), for CPython 3.12 on x86-64 Linux. Only what such a node usually lacks:
# its image has torch, accelerate, safetensors, sentencepiece, pyarrow, but not these, or older ones.
#
#   bash benchmarks/gpu_wheels.sh            # then carry .whl/ to the node; gpu_check.sh installs from it
#
# Each is pinned to the version this repository is tested with (the versions in .venv when present, else the
# pins below); gpu_check.sh prints the versions it really ran. Under 64 MiB in all (the device tool's limit for
# the working tree plus what it carries), because two wheels are trimmed of files no GPU check opens:
# bitsandbytes keeps its CPU library and the one for the node's CUDA (CUDA=130 by default: torch 2.11+cu130),
# not the eight others (115 MiB); mistral_common keeps its SentencePiece tokenizers, not the two Tekken JSONs
# (33 MiB). NO_BNB=1 leaves bitsandbytes out (the nf4 stage then says "skipped").
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY=${PY:-python3}
mkdir -p "$DEST"
grep -qs '^/.whl/$' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo /.whl/ >> .git/info/exclude; }

version() {  # the version installed in .venv, else the default given
  local found
  found=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true)
  echo "${found:-$2}"
}

PURE=(  # pure-Python wheels (py3-none-any)
  "transformers==$(version transformers 5.24.0)"
  "peft==$(version peft 0.21.2)"
  "trl==$(version trl 1.16.0)"
  "datasets==$(version datasets 5.2.0)"
  "accelerate==$(version accelerate 1.16.0)"
  "mistral_common==$(version mistral_common 1.13.1)"
  "dill==$(version dill 0.4.1)"
  "multiprocess==$(version multiprocess 0.70.19)"
  "hjson==$(version hjson 3.1.0)"
  "pydantic==$(version pydantic 2.14.4)"
  "typing-inspection==$(version typing-inspection 0.4.2)"
  "annotated-types==$(version annotated-types 0.7.0)"
  "jsonschema==$(version jsonschema 4.26.0)"
  "jsonschema-specifications==$(version jsonschema-specifications 2025.9.1)"
  "referencing==$(version referencing 0.37.0)"
)
BINARY=(  # compiled: cp312 manylinux
  "pydantic_core==$(version pydantic_core 2.50.5)"
  "rpds-py==$(version rpds-py 0.30.0)"
)
[[ -z "${NO_BNB:-}" ]] && BINARY+=("bitsandbytes==$(version bitsandbytes 0.50.2)")
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${PURE[@]}" "${BINARY[@]}"
# DeepSpeed publishes only a source archive; its wheel is pure Python (kernels compile on first use).
DEEPSPEED="deepspeed==$(version deepspeed 0.19.8)"
ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1 || DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w "$DEST" "$DEEPSPEED"

# Drop the members no check opens, and their RECORD lines (pip installs what RECORD and the archive agree on).
$PY - "$DEST" "${CUDA:-130}" <<'TRIM'
import re, sys, zipfile
from pathlib import Path

dest, cuda = Path(sys.argv[1]), sys.argv[2]
rules = {"bitsandbytes-": re.compile(rf"bitsandbytes/libbitsandbytes_(?!cpu\.|cuda{cuda}\.).*\.so$"),
         "mistral_common-": re.compile(r"mistral_common/data/tekken_.*\.json$")}
for wheel in sorted(dest.glob("*.whl")):
    rule = next((r for prefix, r in rules.items() if wheel.name.startswith(prefix)), None)
    if rule is None:
        continue
    with zipfile.ZipFile(wheel) as source:
        drop = {name for name in source.namelist() if rule.match(name)}
        if not drop:
            continue
        trimmed = wheel.with_suffix(".trimmed")
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
            for item in source.infolist():
                if item.filename in drop:
                    continue
                data = source.read(item)
                if item.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(line for line in lines if line.split(",")[0] not in drop) + "\n").encode()
                target.writestr(item, data)
    trimmed.replace(wheel)
    print(f"{wheel.name}: left out {len(drop)} file(s) no check opens")
TRIM
du -ch "$DEST"/*.whl | tail -1
