#!/bin/sh
# Byte-compiles /opt/venv on every core once the dependencies are in (pip installs them
# with --no-compile: it compiles on one core, about twice as slow for torch and
# transformers). The images run with PYTHONDONTWRITEBYTECODE=1 from a root-owned
# venv, so without this every process would compile its imports again. Like pip, it
# tolerates the odd file that is not valid Python (templates, test data); CI checks
# that the packages themselves are compiled.
/opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib >/dev/null 2>&1 || true
