#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60), seeded from real QEMU
# saves: the example in the repository, indexed and not, and its pieces.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); uses the stable toolchain
# with RUSTC_BOOTSTRAP=1 for the sanitizer flags.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(stream stream_chunked directory libvirt ram vmstate)

seeds=fuzz/seeds
mkdir -p "$seeds"
example=examples/pc-i440fx.sav
if [ ! -f "$seeds/.made" ] || [ ! -f "$seeds/vmstate" ]; then
  python3 - "$example" "$seeds" <<'PY'
import os, shutil, struct, subprocess, sys
src, out = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
os.makedirs(out, exist_ok=True)
def put(name, b):
    open(os.path.join(out, name), "wb").write(b)
put("stream", data)
put("stream_cut_half", data[: len(data) // 2])
tmp = os.path.join(out, "indexed.tmp")
shutil.copyfile(src, tmp)
subprocess.run([sys.executable, "-m", "savedir", "index", "-q", tmp], check=True)
idx = open(tmp, "rb").read()
os.remove(tmp)
put("indexed", idx)
put("directory_tail", idx[len(data) - 64 :])
hdr = b"LibvirtQemudSave" + struct.pack("<5I", 2, 4096, 1, 0, 0) + bytes(56)
xml = b"<domain type='kvm'><name>seed</name><uuid>00000000-0000-0000-0000-000000000001</uuid></domain>\0"
put("libvirt", hdr + xml.ljust(4096, b"\0") + data[:4096])
# RAM: the first section's payload, after its header.
put("ram", b"\x00" + data[27 + 1 + 4 + 1 + 3 + 4 + 4 : 27 + 170])
# vmstate: the cpu section's vmdesc entry and payload.
import json
import savedir
with savedir.open(src) as f:
    dev = next(d for d in f.vmdesc["devices"] if d["name"] == "cpu")
    body = json.dumps(dev).encode()
    put("vmstate", struct.pack("<H", len(body)) + body + bytes(f["cpu"].payload))
open(os.path.join(out, ".made"), "w").close()
PY
fi

for t in "${targets[@]}"; do
  corpus="fuzz/corpus/$t"
  mkdir -p "$corpus"
  case $t in
    stream) cp -n "$seeds"/stream* "$seeds"/indexed "$corpus"/ ;;
    stream_chunked) for f in "$seeds"/stream_cut_half "$seeds"/stream; do printf '\x07' | cat - "$f" > "$corpus/$(basename "$f")"; done ;;
    directory) cp -n "$seeds"/indexed "$seeds"/directory_tail "$corpus"/ ;;
    libvirt) cp -n "$seeds"/libvirt "$corpus"/ ;;
    ram) cp -n "$seeds"/ram "$corpus"/ ;;
    vmstate) cp -n "$seeds"/vmstate "$corpus"/ ;;
  esac
  case $t in stream|stream_chunked) maxlen=65536 ;; *) maxlen=1048576 ;; esac
  echo "== fuzz $t for ${secs}s"
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -max_len="$maxlen" 2>&1 \
    | grep -E '^(#[0-9]+ *DONE|Done|==[0-9]+==|SUMMARY|.*panicked|artifact)' || true)
  if ls fuzz/artifacts/"$t"/crash-* >/dev/null 2>&1; then
    echo "!! $t: crashes in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
