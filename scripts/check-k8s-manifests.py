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
import pathlib
import sys

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import manifest_check  # noqa: E402

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
    return manifest_check.run(
        "k8s-check", args, ROOT / "deploy" / "balance-service", STAND_INS, check, self_test, "Deployment",
        ok_note=" (Kubernetes " + ", ".join(VERSIONS) + ", strict)",
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
