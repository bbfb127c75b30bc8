#!/usr/bin/env python3
"""Validates the Kubernetes manifests in deploy/balance-service with Kubernetes' own schemas.

The schemas come from the `kubernetes-validate` package (JSON Schemas generated from the
Kubernetes API's OpenAPI definitions, one set per Kubernetes version; `make k8s-check`
installs the pinned version into .venv). Its strict schemas refuse unknown fields, so a
misspelled field fails instead of being silently dropped by the API server's defaulting.
Every document is checked against the oldest and the newest Kubernetes version below.

  .venv/bin/python scripts/check-k8s-manifests.py [FILE_OR_DIR ...]

Placeholders (${FAREBOX_BALANCE_IMAGE}) are filled from the environment when set, else
with stand-ins, so both the templates and rendered copies can be checked.
"""
import copy
import os
import pathlib
import sys

import yaml

try:
    import kubernetes_validate
except ImportError as e:  # pragma: no cover
    sys.exit(f"check-k8s-manifests: {e}; run it with .venv/bin/python after `make k8s-models`")

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The oldest Kubernetes the manifests support, and the newest the package knows.
VERSIONS = ["1.30.0", "1.37.0"]
STAND_INS = {
    "FAREBOX_BALANCE_IMAGE": "registry.example.com/farebox-balance:0.1.0",
}


def render(text):
    for name, stand_in in STAND_INS.items():
        text = text.replace("${%s}" % name, os.environ.get(name) or stand_in)
    return text


def check(doc):
    """Problems with one manifest document against every version (empty if valid)."""
    problems = []
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in getattr(e, "absolute_path", []))
            problems.append(f"Kubernetes {version}: /{where}: {e.message}")
        except (kubernetes_validate.SchemaNotFoundError,
                kubernetes_validate.InvalidSchemaError) as e:
            problems.append(f"Kubernetes {version}: {e}")
    return problems


def self_test(deployment):
    """The check must catch a misspelled field, a wrong type and an unknown probe field."""
    typo = copy.deepcopy(deployment)
    typo["spec"]["replcas"] = typo["spec"].pop("replicas", 2)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    probe = copy.deepcopy(deployment)
    probe["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/x"
    return [
        f"self-test: {what} was not detected"
        for what, mutated in [("a misspelled field", typo), ("a wrong type", wrong_type),
                              ("an unknown probe field", probe)]
        if not check(mutated)
    ]


def main(args):
    targets = [pathlib.Path(a) for a in args] or [ROOT / "deploy" / "balance-service"]
    files = []
    for t in targets:
        files.extend(sorted(t.glob("*.yaml")) if t.is_dir() else [t])
    passed, failed = 0, 0
    deployment = None
    for f in files:
        text = render(f.read_text())
        body = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
        if "${" in body:
            print(f"FAIL {f.name}: a placeholder is left after rendering")
            failed += 1
            continue
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            name = f"{f.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            problems = check(doc)
            if problems:
                failed += 1
                print(f"FAIL {name}")
                for p in problems:
                    print(f"  {p}")
            else:
                passed += 1
                print(f"ok   {name} (Kubernetes {', '.join(VERSIONS)}, strict)")
            if doc.get("kind") == "Deployment" and deployment is None:
                deployment = doc
    if deployment is None:
        print("FAIL no Deployment found")
        failed += 1
    else:
        for p in self_test(deployment):
            print(f"FAIL {p}")
            failed += 1
    print(f"k8s-check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
