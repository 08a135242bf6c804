#!/usr/bin/env bash
# Unpack the built OHIF Viewer (npm package @ohif/app, its dist/ only) into .cache/ohif/<version>/,
# for tests/report/test_viewer.py. Idempotent: nothing is fetched when that version is there.
#
# `npm pack` fetches the one tarball (checked against the registry's integrity hash) without the
# package's 39 build-time dependencies, which the built dist/ does not need.
set -euo pipefail
cd "$(dirname "$0")/.."

OHIF_VERSION="${OHIF_VERSION:-3.13.2}"  # keep in step with tests/report/viewer_support.py
target=".cache/ohif/${OHIF_VERSION}"

if [ -f "${target}/dist/index.html" ]; then
  echo "OHIF Viewer ${OHIF_VERSION} already at ${target}/dist"
  exit 0
fi
command -v npm >/dev/null || { echo "npm not found: cannot fetch @ohif/app (the viewer test will skip)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
(cd "${work}" && npm pack --silent "@ohif/app@${OHIF_VERSION}" >/dev/null)
tar -xzf "${work}"/ohif-app-"${OHIF_VERSION}".tgz -C "${work}"
[ -f "${work}/package/dist/index.html" ] || { echo "@ohif/app@${OHIF_VERSION} has no dist/index.html" >&2; exit 1; }
mkdir -p "${target}"
rm -rf "${target}/dist.partial"
mv "${work}/package/dist" "${target}/dist.partial"
mv "${work}/package/package.json" "${target}/package.json"
mv "${target}/dist.partial" "${target}/dist"
echo "OHIF Viewer ${OHIF_VERSION} unpacked to ${target}/dist"
