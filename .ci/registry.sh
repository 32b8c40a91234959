#!/usr/bin/env bash
# CI part: what the Comfy Registry gets. Run from a git checkout (CI's fresh clone): `bash .ci/registry.sh`.
#   1. a venv at build/ci/venv-registry with comfy-cli and pytest from the package index (the only network use)
#   2. `comfy node validate` (the checks `comfy node publish` runs): fails on an error, and on any warning, since
#      comfy-cli drops a classifier list, requires-comfyui or license it cannot read with a warning and exit 0
#   3. `comfy node pack`: node.zip exactly as `comfy node publish` builds it (git-tracked files minus .comfyignore),
#      moved to build/ci/registry/node.zip
#   4. pytest tests/registry with OVIS_U1_REGISTRY_ARCHIVE naming it: every file the pack runs on ships, nothing
#      else does (report: build/ci/results/registry.xml, log: build/ci/registry/comfy.log)
# comfy-cli runs offline and unattended: DO_NOT_TRACK=1 (no telemetry, no consent question), --skip-prompt, stdin
# from /dev/null. COMFY_CLI_SPEC overrides the comfy-cli requirement (default: the version this was checked with).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
BUILD=$ROOT/build/ci
VENV=$BUILD/venv-registry
OUT=$BUILD/registry
ARCHIVE=$OUT/node.zip
COMFY_CLI_SPEC=${COMFY_CLI_SPEC:-comfy-cli==1.23.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)

fail() { echo "FAIL registry: $*" >&2; exit 1; }

comfy() {  # comfy ARGS...: comfy-cli without telemetry, prompts or terminal input; output also in comfy.log
  DO_NOT_TRACK=1 COMFY_NO_TELEMETRY=1 "$VENV/bin/comfy" --skip-prompt --no-json "$@" </dev/null 2>&1 |
    tee -a "$OUT/comfy.log"
}

mkdir -p "$BUILD/results" "$OUT" && rm -f "$ARCHIVE" "$OUT/comfy.log" "$BUILD/results/registry.xml" || exit 1

# comfy-cli archives `git ls-files`; outside a git checkout (or where git refuses) it archives every file on disk.
[[ $(git rev-parse --show-toplevel 2>/dev/null) == "$ROOT" ]] && [[ -n $(git ls-files -- pyproject.toml) ]] ||
  fail "$ROOT is not the top of a git checkout whose files git lists: comfy node pack would archive every file"

python3 -m venv "$VENV" &&
  "$VENV/bin/python" -m pip install --quiet "$COMFY_CLI_SPEC" pytest ||
  fail "could not install $COMFY_CLI_SPEC and pytest into $VENV"
echo "comfy-cli $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("comfy-cli"))')"

validated=$(comfy node validate); rc=$?
echo "$validated"
[[ $rc -eq 0 ]] || fail "comfy node validate exited $rc"
! grep -qi "warning\|error" <<<"$validated" || fail "comfy node validate warned: fix pyproject.toml"

# comfy node pack writes node.zip at the top of the checkout (comfy_cli.constants.NODE_ZIP_FILENAME).
rm -f node.zip
comfy node pack >/dev/null && [[ -f node.zip ]] || fail "comfy node pack made no node.zip"
mv node.zip "$ARCHIVE" || fail "could not move node.zip to $ARCHIVE"
python3 - "$ARCHIVE" <<'PY'
import os, sys, zipfile
infos = zipfile.ZipFile(sys.argv[1]).infolist()
print(f"archive {os.path.relpath(sys.argv[1])}: {len(infos)} files, {os.path.getsize(sys.argv[1]) / 1e6:.2f} MB packed, "
      f"{sum(i.file_size for i in infos) / 1e6:.2f} MB unpacked")
PY

OVIS_U1_REGISTRY_ARCHIVE=$ARCHIVE "$VENV/bin/python" -m pytest -p no:cacheprovider tests/registry \
  --tb=short --junitxml="$BUILD/results/registry.xml"; rc=$?
echo "registry: $(( $(date +%s) - start )) s"
exit $rc
