"""The project's requirements for one image, one per line, from pyproject.toml alone:

    python images/deps.py operator > /tmp/requirements.txt   # or: trainer

The images install these before copying the sources (images/Dockerfile), so a change to the code
rebuilds the layer with the package only, not the one with torch (5 GB). Needs Python >= 3.11
(tomllib) and nothing else; run from the repository root (or the image's /src).
"""

import sys
import tomllib


def requirements(extra: str, path: str = "pyproject.toml") -> list[str]:
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    return project["dependencies"] + project["optional-dependencies"][extra]


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
