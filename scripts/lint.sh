#!/usr/bin/env bash
# clang-format check of every C++/CUDA file, and clang-tidy (.clang-tidy) over kvdn's sources.
#   scripts/lint.sh           format check + clang-tidy (slow: minutes on 2 cores)
#   scripts/lint.sh format    format check only (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
files=$(git ls-files '*.cc' '*.h' '*.cu' '*.cuh')
bad=0
for f in $files; do
  clang-format --dry-run --Werror "$f" >/dev/null 2>&1 || { echo "not formatted: $f"; bad=1; }
done
((bad == 0)) || { echo "run: clang-format -i <files>"; exit 1; }
echo "lint: clang-format clean"
[[ ${1:-} == format ]] && exit 0
[[ -f build/default/compile_commands.json ]] || cmake --preset default >/dev/null
srcs=$(git ls-files 'common/src/*.cc' 'storage/src/*.cc')
clang-tidy -p build/default --quiet $srcs
echo "lint: clang-tidy clean"
