"""Print the requirements of pyproject.toml (base dependencies plus the named extras),
so the images install dependencies in a layer that does not change with the code.

    python3 requirements.py pyproject.toml [EXTRA ...]
"""

import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project["dependencies"])
for extra in sys.argv[2:]:
    reqs += project["optional-dependencies"][extra]
print("\n".join(reqs))
