#!/bin/sh
# Installs the load tools `cargo bench --bench tunnel` drives (Debian/Ubuntu, as root).
# The bench itself installs nothing: a missing tool skips the scenarios that need it.
#
#   nginx-light     nginx, the direct backend for small GETs and downloads (latency, rps, bulk)
#   wrk             HTTP/1.1 load (latency, rps)
#   nghttp2-client  h2load, HTTP/2 load (rps)
#   curl            bulk downloads and uploads (bulk)
#   libssl-dev, pkg-config, openssl   building and configuring rathole (variant rathole-tls)
set -eu
if [ "$(id -u)" -ne 0 ]; then
    echo "run as root (or: sudo $0)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q nginx-light wrk nghttp2-client curl libssl-dev pkg-config openssl
