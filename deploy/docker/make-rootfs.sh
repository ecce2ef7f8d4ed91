#!/bin/sh
# Assembles the runtime filesystem of the wsgate image: the binary, tini, exactly the shared
# libraries the binary links against, a non-root user and the CA bundle. Nothing else: no
# shell, no package manager, no curl.
#
# The Dockerfile runs it in its build stage and copies the result into an empty (`scratch`)
# image; deploy/tests runs the same script and starts the result with chroot, so the runtime
# image is exercised here without a container engine.
#
# Usage: make-rootfs.sh WSGATE_BINARY TINI_STATIC_BINARY OUT_DIR
set -eu
bin=$1 tini=$2 out=$3

mkdir -p "$out/usr/local/bin" "$out/usr/bin" "$out/etc/ssl/certs" "$out/tmp" "$out/home/nonroot"
install -m 0755 "$bin" "$out/usr/local/bin/wsgate"
install -m 0755 "$tini" "$out/usr/bin/tini"

# Every library the dynamic loader resolves for the binary, plus the loader itself (the
# line without "=>"). `cp -L --parents` keeps the paths the binary was linked with.
ldd "$bin" | awk '/=>/ { if ($3 ~ /^\//) print $3; next } $1 ~ /^\// { print $1 }' |
    while read -r lib; do cp -L --parents "$lib" "$out"; done

# Without /etc/passwd the uid would have no name; some libraries look it up.
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$out/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$out/etc/group"
printf 'hosts: files dns\n' >"$out/etc/nsswitch.conf"
# TLS to Redis (rediss://) needs the system roots when the binary reads them.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/"
fi
chown 65532:65532 "$out/home/nonroot"
chmod 1777 "$out/tmp"
