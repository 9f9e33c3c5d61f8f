#!/bin/sh
# Development secrets for docker/compose.yaml and deploy/k8s/ (docs/security.md): a throw-away CA,
# a server certificate, a client certificate and one API key. Not for production: use your PKI or
# cert-manager, and keep the keys readable by their service only.
#
#   sh docker/dev-secrets.sh [DIR] [NAMESPACE]     # default DIR: docker/secrets, NAMESPACE: default
#
# Writes, in DIR:
#   ca.crt, ca.key          the CA (ca.key: 0600, only to issue more certificates)
#   tls.crt, tls.key        the server certificate of the replicas and of nginx; its names: localhost,
#                           127.0.0.1, ::1, gap, gap-service, gap-lb and their Kubernetes Service names
#   client.crt, client.key  a client certificate (mTLS): nginx presents it to the replicas
#   api-keys.json           the key file of `gap-service serve --api-keys` (the key's SHA-256, all models)
#   token                   the API key itself (0600): GAP_TOKEN or --token-file for the clients
# The tests (tests/test_security.py) run this script and use what it writes.
set -eu

dir=${1:-$(dirname "$0")/secrets}
namespace=${2:-default}
days=365
mkdir -p "$dir"
cd "$dir"
umask 077

names="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:gap,DNS:gap-service,DNS:gap-lb"
for service in gap-service gap-lb; do
    names="$names,DNS:$service.$namespace,DNS:$service.$namespace.svc,DNS:$service.$namespace.svc.cluster.local"
done

serial() { printf '0x%s' "$(openssl rand -hex 16)"; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=gap-service development CA" -keyout ca.key -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# issue NAME CN EXTENSIONS: NAME.key and NAME.crt signed by the CA
issue() {
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -set_serial "$(serial)" -days "$days" \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
issue tls gap-service "extendedKeyUsage=serverAuth
subjectAltName=$names"
issue client gap-service-client "extendedKeyUsage=clientAuth"

openssl rand -hex 32 > token
digest=$(tr -d '\n' < token | openssl dgst -sha256 -r | cut -d' ' -f1)
printf '[{"name": "dev", "key_sha256": "%s", "models": ["*"]}]\n' "$digest" > api-keys.json

# Compose bind-mounts these files as they are, and the server runs as uid 10001: the certificates, the
# key file and (development only) the private keys must be readable by it.
chmod 0644 ca.crt tls.crt tls.key client.crt client.key api-keys.json
echo "development secrets in $(pwd)"
