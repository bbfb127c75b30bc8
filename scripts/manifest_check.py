"""The loop both offline manifest checks share (check-istio-models.py, check-k8s-manifests.py):
render each YAML file's ${…} placeholders, check every document, then run the script's self-test
on the first document of `self_test_kind` (proof that the check refuses a broken copy)."""

import os
import pathlib

import yaml


def render(text, stand_ins):
    """Fills ${NAME} from the environment, else from `stand_ins`."""
    for name, stand_in in stand_ins.items():
        text = text.replace("${%s}" % name, os.environ.get(name) or stand_in)
    return text


def run(label, args, default_dir, stand_ins, check, self_test, self_test_kind, ok_note="", skip=None):
    """Checks the files in `args` (default: the YAML files of `default_dir`); prints one line a
    document and `<label>: N passed, M failed`; returns the exit status. `skip(doc)` returns a
    reason to leave a document out (printed as "not covered")."""
    targets = [pathlib.Path(a) for a in args] or [default_dir]
    files = []
    for t in targets:
        files.extend(sorted(t.glob("*.yaml")) if t.is_dir() else [t])
    passed, failed = 0, 0
    sample = None
    for f in files:
        text = render(f.read_text(), stand_ins)
        body = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
        if "${" in body:
            print(f"FAIL {f.name}: a placeholder is left after rendering")
            failed += 1
            continue
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            name = f"{f.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            reason = skip(doc) if skip else None
            if reason:
                print(f"not covered {name}: {reason}")
                continue
            problems = check(doc)
            if problems:
                failed += 1
                print(f"FAIL {name}")
                for p in problems:
                    print(f"  {p}")
            else:
                passed += 1
                print(f"ok   {name}{ok_note}")
            if doc.get("kind") == self_test_kind and sample is None:
                sample = doc
    if sample is None:
        print(f"FAIL no {self_test_kind} found")
        failed += 1
    else:
        for p in self_test(sample):
            print(f"FAIL {p}")
            failed += 1
    print(f"{label}: {passed} passed, {failed} failed")
    return 1 if failed else 0
