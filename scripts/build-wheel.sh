#!/usr/bin/env bash
# Builds savedir's release wheel and its sdist into dist/ (earlier savedir
# wheels and sdists there are removed first, so dist/ holds exactly one of each).
#
# The wheel is linked by zig against glibc 2.17 (maturin --zig), so it is a
# manylinux_2_17 (manylinux2014) wheel whatever glibc this machine has;
# `auditwheel show` then checks that its symbols honour the tag. With PyO3's
# abi3 feature the one wheel serves every CPython from 3.9 on (tag
# cp39-abi3-...); without it, only the CPython that built it (cp311-cp311-...).
#
# The build tools (maturin, ziglang, auditwheel) go into a venv of their own,
# .venv-build/, made with $PYTHON (default python3: Debian's own works, with
# its python3-venv package). Needs cargo and rustc on PATH.
#
# Prints the paths of the wheel and the sdist as its last two lines.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-build
TOOLS=("maturin>=1.7,<2" "ziglang>=0.13" "auditwheel>=6.1")
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import maturin, ziglang, auditwheel' 2>/dev/null; then
  echo "== build tools into $VENV/ (${TOOLS[*]})" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${TOOLS[@]}"
fi
# maturin --zig runs `python -m ziglang` from this venv (or a zig on PATH).
export PATH="$PWD/$VENV/bin:$PATH"

mkdir -p dist
rm -f dist/savedir-*.whl dist/savedir-*.tar.gz

echo "== wheel (maturin build --release --zig --compatibility manylinux_2_17)" >&2
maturin build --release --zig --compatibility manylinux_2_17 \
  --interpreter "$VENV/bin/python" --out dist >&2

echo "== sdist (maturin sdist)" >&2
maturin sdist --out dist >&2

wheels=(dist/savedir-*.whl)
sdists=(dist/savedir-*.tar.gz)
if [ "${#wheels[@]}" -ne 1 ] || [ "${#sdists[@]}" -ne 1 ]; then
  echo "build-wheel.sh: expected one wheel and one sdist in dist/, found: ${wheels[*]} ${sdists[*]}" >&2
  exit 1
fi

echo "== auditwheel show ${wheels[0]}" >&2
auditwheel show "${wheels[0]}" >&2

case "${wheels[0]}" in
  *-abi3-*) echo "== abi3 wheel: one wheel for every CPython it names as its minimum and later" >&2 ;;
  *) echo "== NOT an abi3 wheel: it installs only into the CPython that built it ($("$VENV/bin/python" -V))" >&2 ;;
esac
echo "== built in $(( $(date +%s) - start )) s" >&2
echo "${wheels[0]}"
echo "${sdists[0]}"
