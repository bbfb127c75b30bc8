#!/usr/bin/env python3
"""Packages build/farebox.wasm as a Wasm OCI image, "compat" variant, without Docker.

The image follows the Wasm image specification's compat variant, which Istio's WasmPlugin
(oci:// URLs) and other proxy-wasm hosts pull:
  - exactly one layer, media type application/vnd.oci.image.layer.v1.tar+gzip, a tar
    holding one file, plugin.wasm;
  - an image config of media type application/vnd.oci.image.config.v1+json
    (os wasip1, architecture wasm);
  - the manifest annotation module.wasm.image/variant=compat.

Output, in --out (default build/oci):
  <name>/               an OCI image layout (oci-layout, index.json, blobs/sha256/...),
                        tagged --tag in index.json (org.opencontainers.image.ref.name)
  <name>-oci.tar        the same layout as one tar file (skopeo oci-archive:, oras)
  digests.json          the manifest digest and the module's sha256
  wasmplugin.yaml       deploy/istio/wasmplugin.yaml with ${FAREBOX_IMAGE} and
                        ${FAREBOX_IMAGE_SHA256} filled in (when --image is given)
  trafficextension.yaml deploy/istio/trafficextension.yaml, the same way
  envoyextensionpolicy.yaml  deploy/envoy-gateway/envoyextensionpolicy.yaml, the same
                        way (Envoy Gateway takes the image without a scheme)

The build is reproducible: fixed timestamps, owners and modes, so the same module always
gives the same manifest digest. Standard library only.

  python3 scripts/oci-image.py --wasm build/farebox.wasm --out build/oci \
      --tag 0.1.0 --image registry.example.com/farebox:0.1.0
"""
import argparse
import gzip
import hashlib
import io
import json
import pathlib
import shutil
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def deterministic_tar(members):
    """A ustar archive of (name, bytes, mode) with zeroed owners and timestamps."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.size = len(data) if data is not None else 0
            info.mode = mode
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build(wasm, name, tag, version):
    """Returns (blobs: {hex: bytes}, manifest_hex, index_bytes)."""
    layer_tar = deterministic_tar([("plugin.wasm", wasm, 0o644)])
    layer = gzip.compress(layer_tar, compresslevel=9, mtime=0)
    config = canonical_json(
        {
            "architecture": "wasm",
            "os": "wasip1",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256(layer_tar)]},
        }
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": "sha256:" + sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": LAYER_TYPE,
                    "digest": "sha256:" + sha256(layer),
                    "size": len(layer),
                }
            ],
            "annotations": {
                "module.wasm.image/variant": "compat",
                "org.opencontainers.image.title": name,
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.description": "farebox: HTTP 402 payment gate, proxy-wasm filter",
                "org.opencontainers.image.licenses": "Apache-2.0",
            },
        }
    )
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [
                {
                    "mediaType": MANIFEST_TYPE,
                    "digest": "sha256:" + sha256(manifest),
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }
            ],
        },
        indent=2,
    ).encode() + b"\n"
    blobs = {sha256(b): b for b in (layer, config, manifest)}
    return blobs, sha256(manifest), index


def write_layout(directory, blobs, index):
    if directory.exists():
        shutil.rmtree(directory)
    (directory / "blobs" / "sha256").mkdir(parents=True)
    (directory / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    (directory / "index.json").write_bytes(index)
    for digest, data in blobs.items():
        (directory / "blobs" / "sha256" / digest).write_bytes(data)


def layout_tarball(directory):
    members = [
        ("oci-layout", (directory / "oci-layout").read_bytes(), 0o644),
        ("index.json", (directory / "index.json").read_bytes(), 0o644),
        ("blobs", None, 0o755),
        ("blobs/sha256", None, 0o755),
    ]
    for blob in sorted((directory / "blobs" / "sha256").iterdir()):
        members.append((f"blobs/sha256/{blob.name}", blob.read_bytes(), 0o644))
    return deterministic_tar(members)


def render_manifest(template, image, manifest_hex):
    """Fills in the placeholders outside comments (the comments keep explaining them)."""
    lines = []
    for line in template.read_text().splitlines(keepends=True):
        if not line.lstrip().startswith("#"):
            line = line.replace("${FAREBOX_IMAGE_SHA256}", manifest_hex)
            line = line.replace("${FAREBOX_IMAGE}", image)
        lines.append(line)
    return "".join(lines)


def version_from_cargo():
    for line in (ROOT / "Cargo.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    return "0.0.0"


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wasm", default=str(ROOT / "build" / "farebox.wasm"))
    p.add_argument("--out", default=str(ROOT / "build" / "oci"))
    p.add_argument("--name", default="farebox")
    p.add_argument("--tag", default=None, help="tag in index.json (default: crate version)")
    p.add_argument("--image", default=None, help="registry/repository:tag for the rendered WasmPlugin")
    p.add_argument("--wasmplugin", default=str(ROOT / "deploy" / "istio" / "wasmplugin.yaml"))
    args = p.parse_args(argv)

    wasm = pathlib.Path(args.wasm).read_bytes()
    if wasm[:4] != b"\0asm":
        sys.exit(f"oci-image: {args.wasm} is not a WebAssembly module")
    version = version_from_cargo()
    tag = args.tag or version
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    blobs, manifest_hex, index = build(wasm, args.name, tag, version)
    layout = out / args.name
    write_layout(layout, blobs, index)
    tarball = out / f"{args.name}-oci.tar"
    tarball.write_bytes(layout_tarball(layout))
    digests = {
        "tag": tag,
        "manifest_digest": "sha256:" + manifest_hex,
        "istio_sha256": manifest_hex,
        "wasm_sha256": sha256(wasm),
    }
    (out / "digests.json").write_text(json.dumps(digests, indent=2) + "\n")
    print(f"OCI image layout:    {layout}  (tag {tag})")
    print(f"OCI archive:         {tarball}")
    print(f"manifest digest:     sha256:{manifest_hex}")
    print(f"Istio sha256 (oci):  {manifest_hex}")
    print(f"wasm sha256:         {digests['wasm_sha256']}  (Istio http(s)/file URLs, Envoy remote code)")
    if args.image:
        templates = [
            ("WasmPlugin", pathlib.Path(args.wasmplugin), f"oci://{args.image}"),
            ("TrafficExtension", ROOT / "deploy" / "istio" / "trafficextension.yaml", f"oci://{args.image}"),
            ("EnvoyExtensionPolicy", ROOT / "deploy" / "envoy-gateway" / "envoyextensionpolicy.yaml", args.image),
        ]
        for kind, template, url in templates:
            rendered = out / template.name
            rendered.write_text(render_manifest(template, args.image, manifest_hex))
            print(f"{kind + ':':<22}{rendered}  (image {url})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
