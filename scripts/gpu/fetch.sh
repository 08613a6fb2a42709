#!/usr/bin/env bash
# Run HERE (a machine with Debian's registry), before a GPU run: fetches what the GPU image lacks
# (docs/GPU.md) into .gpu-carry/, which the device call carries (it reaches no network):
#   .gpu-carry/debs/    Debian 12 .debs: Boost.Program_options 1.74 with its headers, PCRE2,
#                       utf8proc
#   .gpu-carry/debs/openssl/  OpenSSL 3.0's headers (and library), used only where the image
#                       has no /usr/include/openssl (docs/GPU.md)
#   .gpu-carry/shared/  a copy of ../shared/fixtures (../shared does not travel)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu-carry/debs
grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude
(cd .gpu-carry/debs && apt-get download -qq \
   libboost-program-options1.74-dev libboost-program-options1.74.0 libboost1.74-dev \
   libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 \
   libutf8proc-dev libutf8proc2 2>/dev/null)
mkdir -p .gpu-carry/debs/openssl
(cd .gpu-carry/debs/openssl && apt-get download -qq libssl-dev libssl3 2>/dev/null)
rm -rf .gpu-carry/shared && mkdir -p .gpu-carry/shared && cp -r ../shared/fixtures .gpu-carry/shared/
du -sh .gpu-carry
