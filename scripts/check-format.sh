#!/usr/bin/env bash
# Fails when a C++/CUDA source differs from what clang-format (.clang-format: Google, 120 columns)
# would write. Fix with: scripts/check-format.sh --fix
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang-format >/dev/null; then
  echo "check-format: clang-format is missing (scripts/setup.sh installs it)" >&2
  exit 1
fi
mapfile -t files < <(git ls-files 'src/*.cpp' 'src/*.h' 'src/*.cu' 'tests/*.cpp' 'tests/*.h' 'bench/*.cpp')
if [ "${1:-}" = "--fix" ]; then
  clang-format -i "${files[@]}"
  exit 0
fi
if ! clang-format --dry-run -Werror "${files[@]}" 2>/tmp/check-format.$$; then
  grep -E "^[^ ].*(warning|error):" /tmp/check-format.$$ | head -20 >&2
  rm -f /tmp/check-format.$$
  echo "check-format: the files above are not clang-formatted; run scripts/check-format.sh --fix" >&2
  exit 1
fi
rm -f /tmp/check-format.$$
echo "check-format: ${#files[@]} files formatted"
