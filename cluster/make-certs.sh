#!/usr/bin/env sh
# TLS certificates for a volref Dask cluster (cluster files' `security:` block, or
# `volref run --scheduler tls://... --tls-ca-file ca.pem --tls-cert volref.pem --tls-key volref.key`).
#   cluster/make-certs.sh ~/volref-certs [DAYS]
# Makes, with openssl: ca.pem / ca.key (a private certificate authority; keep ca.key off the
# cluster) and volref.pem / volref.key (one certificate the CA signed, for client, scheduler
# and workers alike: Dask checks that each side's certificate is signed by the CA, not host
# names). Put the folder where every node reads it (mode 0700) and nowhere else.
set -eu
dir=${1:?usage: make-certs.sh DIR [DAYS]}
days=${2:-365}
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"
umask 077
key="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"   # P-256: quick to make
openssl req -x509 $key -sha256 -days "$days" -subj "/CN=volref-ca" \
    -keyout ca.key -out ca.pem 2>/dev/null
openssl req $key -sha256 -subj "/CN=volref" -keyout volref.key -out volref.csr 2>/dev/null
printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    > volref.ext
openssl x509 -req -in volref.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
    -days "$days" -extfile volref.ext -out volref.pem 2>/dev/null
rm -f volref.csr volref.ext ca.srl
echo "$dir: ca.pem ca.key volref.pem volref.key"
