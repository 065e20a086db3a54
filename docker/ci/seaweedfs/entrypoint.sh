#!/bin/sh
# Writes the S3 identity (MinIO's root user / password) and starts one SeaweedFS
# server (master, volume, filer, S3 on :9000). The flags are the ones proven in
# containers: bind every port on 0.0.0.0 but advertise 127.0.0.1 (the servers talk
# to each other inside this container), no master peers, no graceful-stop delay.
# Arguments are ignored: compose.ci.yaml keeps the MinIO command of compose.yaml.
set -eu
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
umask 077
python3 - "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/tmp/s3.json <<'PY'
import json, sys
print(json.dumps({"identities": [{
    "name": "admin",
    "credentials": [{"accessKey": sys.argv[1], "secretKey": sys.argv[2]}],
    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
}]}))
PY
exec weed server -dir=/data -ip=127.0.0.1 -ip.bind=0.0.0.0 -master.peers=none \
  -master.port=9333 -volume.port=8080 -filer -filer.port=8888 \
  -s3 -s3.port=9000 -s3.config=/tmp/s3.json -s3.port.iceberg=0 -s3.port.lance=0 \
  -master.volumeSizeLimitMB=64 -master.telemetry=false -volume.max=100 -volume.preStopSeconds=0
