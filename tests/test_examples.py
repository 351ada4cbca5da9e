"""The examples are fit to publish (``nox -s examples`` runs them; this suite does not).

- the Kubernetes manifests validate offline, strictly (unknown fields refused), against
  a pinned Kubernetes version, and the Job warms the cache the trainer reads;
- the notebook is valid nbformat 4 and committed without outputs;
- every example starts with its header (what it shows, what it needs, how to run it),
  examples/README.md lists every example file, and the runner runs every script and
  the notebook;
- the examples name only ``MLSTORE_*`` variables that mlstore reads.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from mlstore.config import ENV_VARS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
KUBERNETES = EXAMPLES / "kubernetes"
KUBERNETES_VERSION = "1.30"
HEADER = ("What it shows", "What it needs", "Run it against", "nox -s examples")
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if p.name != "run.py")
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def manifests() -> list[tuple[str, dict[str, Any]]]:
    import yaml  # a dependency of kubernetes-validate

    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


def one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1
    return found[0]


def job() -> dict[str, Any]:
    return one("Job")


def pods() -> list[tuple[str, dict[str, Any]]]:
    """The pod specs of the workloads: the Job's and the DaemonSet's."""
    return [(kind, one(kind)["spec"]["template"]["spec"]) for kind in ("Job", "DaemonSet")]


def cache_of(container: dict[str, Any]) -> tuple[str, str, str]:
    """A container's node cache: MLSTORE_CACHE_DIR, its budget, and the mount below it."""
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["MLSTORE_CACHE_DIR"].startswith(mounts["node-cache"] + "/")
    return env["MLSTORE_CACHE_DIR"], env["MLSTORE_DISK_BYTES"], mounts["node-cache"]


def validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# ------------------------------------------------------------------------- kubernetes


def test_there_are_manifests() -> None:
    kinds = sorted(doc["kind"] for _, doc in manifests())
    assert kinds == ["DaemonSet", "Job", "Namespace"]


@pytest.mark.parametrize("name", [name for name, _ in manifests()])
def test_manifest_is_valid_kubernetes(name: str) -> None:
    doc = dict(manifests())[name]
    validate(doc)


def test_validation_refuses_an_unknown_field() -> None:
    """The check above can fail: strict validation refuses a misspelled field."""
    import kubernetes_validate

    doc = copy.deepcopy(job())
    doc["spec"]["template"]["spec"]["initContainers"][1]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc)


def test_job_warms_the_cache_the_trainer_reads() -> None:
    pod = job()["spec"]["template"]["spec"]
    warm = next(c for c in pod["initContainers"] if c["name"] == "warm")
    trainer = pod["containers"][0]
    assert warm["command"][:2] == ["mlstore", "warm"]
    assert cache_of(warm) == cache_of(trainer)
    volume = next(v for v in pod["volumes"] if v["name"] == "node-cache")
    assert "hostPath" in volume


def test_the_daemonset_looks_after_the_cache_the_job_reads() -> None:
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    warm = next(c for c in pod["initContainers"] if c["name"] == "warm")
    (serve,) = pod["containers"]
    assert warm["command"][:2] == ["mlstore", "warm"]
    assert serve["command"][:3] == ["mlstore", "cache", "serve"]
    trainer = job()["spec"]["template"]["spec"]["containers"][0]
    assert cache_of(warm) == cache_of(serve) == cache_of(trainer)  # one cache, one budget
    paths = [
        next(v for v in p["volumes"] if v["name"] == "node-cache")["hostPath"]["path"]
        for _, p in pods()
    ]
    assert paths[0] == paths[1]
    port = serve["command"][serve["command"].index("--port") + 1]
    assert [p["containerPort"] for p in serve["ports"]] == [int(port)]
    annotations = one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == port


def test_every_mlstore_command_in_the_manifests_parses() -> None:
    """A misspelled flag would fail the pod at start: parse each with mlstore's own parser."""
    from mlstore.cli import _parser

    commands = [
        c["command"]
        for _, pod in pods()
        for c in pod.get("initContainers", []) + pod["containers"]
        if c["command"][0] == "mlstore"
    ]
    assert len(commands) == 3
    for argv in commands:
        _parser().parse_args(argv[1:])


@pytest.mark.parametrize("kind", ["Job", "DaemonSet"])
def test_pods_run_non_root_with_resources(kind: str) -> None:
    pod = dict(pods())[kind]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for container in pod["initContainers"] + pod["containers"]:
        assert container["resources"]["limits"], container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for container in pod["containers"] + [c for c in pod["initContainers"] if c["name"] == "warm"]:
        assert "runAsUser" not in container["securityContext"], container["name"]


def test_namespace_allows_host_path() -> None:
    (namespace,) = [doc for _, doc in manifests() if doc["kind"] == "Namespace"]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] in ("baseline", "privileged")
    for kind in ("Job", "DaemonSet"):
        assert one(kind)["metadata"]["namespace"] == namespace["metadata"]["name"]


# --------------------------------------------------------------------------- notebook


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(path: Path) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_nbformat(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)


# ---------------------------------------------------------------- headers and README


def header(path: Path) -> str:
    if path.suffix == ".ipynb":
        first = json.loads(path.read_text(encoding="utf-8"))["cells"][0]
        assert first["cell_type"] == "markdown"
        return "".join(first["source"])
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def test_there_are_examples() -> None:
    assert len(SCRIPTS) >= 5 and NOTEBOOKS


@pytest.mark.parametrize("path", SCRIPTS + NOTEBOOKS, ids=lambda p: p.name)
def test_example_has_its_header(path: Path) -> None:
    text = header(path)
    missing = [part for part in HEADER if part not in text]
    assert not missing, f"{path.name}'s header lacks {missing}"


def test_readme_lists_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    files = [p for p in EXAMPLES.iterdir() if p.name != "README.md" and p.name[0] not in "._"]
    missing = [p.name for p in files if f"`{p.name}" not in readme]
    assert not missing, f"examples/README.md does not list {missing}"
    k8s = (KUBERNETES / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in KUBERNETES.glob("*.yaml") if f"`{p.name}`" not in readme + k8s]
    assert not missing, f"no README names {missing}"


def test_runner_runs_every_example() -> None:
    tree = ast.parse((EXAMPLES / "run.py").read_text(encoding="utf-8"))
    (listed,) = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "EXAMPLES" for t in node.targets)
    ]
    assert sorted(listed) == sorted(p.name for p in SCRIPTS + NOTEBOOKS)


def test_examples_name_only_variables_mlstore_reads() -> None:
    text = "".join(p.read_text(encoding="utf-8") for p in EXAMPLES.rglob("*") if p.is_file())
    unknown = set(re.findall(r"\bMLSTORE_[A-Z0-9_]+\b", text)) - set(ENV_VARS)
    assert not unknown, f"the examples name variables mlstore does not read: {unknown}"
