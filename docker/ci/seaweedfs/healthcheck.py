#!/usr/bin/env python3
"""Healthy when S3 answers /healthz AND the master lists a volume server: before
that, the first write can stall for seconds."""

import sys
import urllib.request


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.read().decode()


try:
    get("http://127.0.0.1:9000/healthz")
    ok = "DataNode" in get("http://127.0.0.1:9333/dir/status")
except Exception as e:
    print(e)
    sys.exit(1)
sys.exit(0 if ok else 1)
