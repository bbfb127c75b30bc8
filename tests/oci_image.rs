#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! The Wasm OCI image that `make oci` builds (scripts/oci-image.py): an OCI image layout in
//! the Wasm image spec's "compat" variant, checked byte by byte here:
//! index.json -> manifest -> config + the one layer -> a tar holding plugin.wasm, whose
//! bytes are build/farebox.wasm; every digest and size matches its blob; the layout tarball
//! holds the same files; the build is reproducible; the rendered WasmPlugin,
//! TrafficExtension and EnvoyExtensionPolicy carry the manifest digest. If `skopeo` is installed, it must read the layout and the archive and
//! keep the manifest digest when copying.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{cannot_run, repo_root, sha256_hex, wasm_path, TempDir};
use serde_json::{json, Value};

const TAG: &str = "test";
const IMAGE: &str = "registry.example.com/farebox:test";

fn python() -> String {
    std::env::var("FAREBOX_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

fn build_image(out: &Path) -> String {
    let output = Command::new(python())
        .arg(repo_root().join("scripts/oci-image.py"))
        .arg("--wasm")
        .arg(wasm_path())
        .arg("--out")
        .arg(out)
        .arg("--tag")
        .arg(TAG)
        .arg("--image")
        .arg(IMAGE)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/oci-image.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "scripts/oci-image.py failed:\n{text}"
    );
    text
}

/// The regular files and directories of a tar archive (ustar), name -> bytes (None for a
/// directory).
fn untar(data: &[u8]) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut pos = 0;
    while pos + 512 <= data.len() {
        let header = &data[pos..pos + 512];
        if header.iter().all(|b| *b == 0) {
            break;
        }
        let field = |from: usize, len: usize| {
            let raw = &header[from..from + len];
            let end = raw.iter().position(|b| *b == 0).unwrap_or(len);
            String::from_utf8(raw[..end].to_vec()).expect("utf-8 tar field")
        };
        let computed: u32 = header
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(*b)
                }
            })
            .sum();
        let checksum = u32::from_str_radix(field(148, 8).trim(), 8).expect("checksum");
        assert_eq!(checksum, computed, "tar header checksum");
        let size = usize::from_str_radix(field(124, 12).trim(), 8).expect("octal size");
        let prefix = field(345, 155);
        let name = field(0, 100);
        let name = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let typeflag = header[156];
        pos += 512;
        let body = &data[pos..pos + size];
        pos += size.div_ceil(512) * 512;
        let name = name.trim_end_matches('/').to_string();
        let entry = match typeflag {
            b'0' | 0 => Some(body.to_vec()),
            b'5' => None,
            other => panic!("unexpected tar entry type {other} for {name}"),
        };
        assert!(
            out.insert(name.clone(), entry).is_none(),
            "{name} twice in the archive"
        );
    }
    out
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A descriptor's blob, checked against the descriptor's digest and size.
fn blob(layout: &Path, descriptor: &Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().expect("descriptor digest");
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("digest {digest} is not sha256"));
    let data = fs::read(layout.join("blobs/sha256").join(hex))
        .unwrap_or_else(|e| panic!("blob {digest}: {e}"));
    assert_eq!(
        sha256_hex(&data),
        hex,
        "blob content does not match its digest"
    );
    assert_eq!(
        descriptor["size"].as_u64(),
        Some(data.len() as u64),
        "size of {digest}"
    );
    data
}

struct Image {
    manifest_hex: String,
}

/// Checks the layout in `out/farebox` and returns the manifest digest.
fn check_layout(out: &Path, wasm: &[u8]) -> Image {
    let layout = out.join("farebox");
    assert_eq!(
        read_json(&layout.join("oci-layout")),
        json!({"imageLayoutVersion": "1.0.0"})
    );
    let index = read_json(&layout.join("index.json"));
    assert_eq!(index["schemaVersion"], 2);
    let manifests = index["manifests"].as_array().expect("index.manifests");
    assert_eq!(manifests.len(), 1, "one image in the layout");
    let desc = &manifests[0];
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        desc["annotations"]["org.opencontainers.image.ref.name"],
        TAG
    );
    let manifest_bytes = blob(&layout, desc);
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["annotations"]["module.wasm.image/variant"], "compat",
        "compat variant annotation (Wasm image spec)"
    );

    let config_desc = &manifest["config"];
    assert_eq!(
        config_desc["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config: Value = serde_json::from_slice(&blob(&layout, config_desc)).unwrap();
    assert_eq!(config["os"], "wasip1");
    assert_eq!(config["architecture"], "wasm");

    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "compat variant: exactly one layer");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let gz = blob(&layout, &layers[0]);
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut tar)
        .expect("the layer is gzip");
    assert_eq!(
        config["rootfs"],
        json!({"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&tar))]}),
        "config.rootfs.diff_ids is the digest of the uncompressed layer"
    );
    let files = untar(&tar);
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        vec!["plugin.wasm"],
        "the layer holds plugin.wasm only"
    );
    assert!(
        files["plugin.wasm"].as_deref() == Some(wasm),
        "plugin.wasm differs from build/farebox.wasm"
    );

    // Nothing else in blobs/.
    let mut blobs: Vec<String> = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    blobs.sort();
    let mut want: Vec<String> = [desc, config_desc, &layers[0]]
        .iter()
        .map(|d| d["digest"].as_str().unwrap()[7..].to_string())
        .collect();
    want.sort();
    assert_eq!(blobs, want, "blobs/sha256 holds exactly the image's blobs");

    Image {
        manifest_hex: desc["digest"].as_str().unwrap()[7..].to_string(),
    }
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn oci_image_layout_holds_the_module() {
    let wasm = fs::read(wasm_path()).unwrap();
    let tmp = TempDir::new("oci");
    let out = tmp.join("oci");
    let printed = build_image(&out);
    let image = check_layout(&out, &wasm);
    assert!(
        printed.contains(&format!(
            "manifest digest:     sha256:{}",
            image.manifest_hex
        )),
        "the script prints the manifest digest:\n{printed}"
    );

    // The archive is the same layout in one file.
    let archive = untar(&fs::read(out.join("farebox-oci.tar")).unwrap());
    let layout = out.join("farebox");
    let mut layout_files = Vec::new();
    for name in ["oci-layout", "index.json"] {
        layout_files.push(name.to_string());
    }
    for e in fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        layout_files.push(format!(
            "blobs/sha256/{}",
            e.unwrap().file_name().to_string_lossy()
        ));
    }
    for name in &layout_files {
        assert_eq!(
            archive.get(name).and_then(|b| b.clone()),
            Some(fs::read(layout.join(name)).unwrap()),
            "{name} in farebox-oci.tar"
        );
    }
    let archived_files = archive.values().filter(|v| v.is_some()).count();
    assert_eq!(
        archived_files,
        layout_files.len(),
        "no extra files in the archive"
    );

    // What Istio and Envoy need, written down.
    let digests = read_json(&out.join("digests.json"));
    assert_eq!(digests["istio_sha256"], image.manifest_hex);
    assert_eq!(
        digests["manifest_digest"],
        format!("sha256:{}", image.manifest_hex)
    );
    assert_eq!(digests["wasm_sha256"], sha256_hex(&wasm));
    let rendered = fs::read_to_string(out.join("wasmplugin.yaml")).unwrap();
    let plugin: Value = serde_yaml::from_str(&rendered).expect("rendered WasmPlugin is YAML");
    assert_eq!(plugin["spec"]["url"], format!("oci://{IMAGE}"));
    assert_eq!(
        plugin["spec"]["sha256"], image.manifest_hex,
        "for oci:// URLs Istio compares the image manifest digest"
    );
    let rendered = fs::read_to_string(out.join("trafficextension.yaml")).unwrap();
    let ext: Value = serde_yaml::from_str(&rendered).expect("rendered TrafficExtension is YAML");
    assert_eq!(ext["kind"], "TrafficExtension");
    assert_eq!(ext["spec"]["wasm"]["url"], format!("oci://{IMAGE}"));
    assert_eq!(ext["spec"]["wasm"]["sha256"], image.manifest_hex);
    let rendered = fs::read_to_string(out.join("envoyextensionpolicy.yaml")).unwrap();
    let eep: Value =
        serde_yaml::from_str(&rendered).expect("rendered EnvoyExtensionPolicy is YAML");
    assert_eq!(eep["kind"], "EnvoyExtensionPolicy");
    let code = &eep["spec"]["wasm"][0]["code"];
    assert_eq!(
        code["image"]["url"], IMAGE,
        "Envoy Gateway takes the image without a scheme"
    );
    assert_eq!(
        code["image"]["sha256"], image.manifest_hex,
        "Envoy Gateway's Wasm cache compares the image manifest digest"
    );

    // Reproducible: the same module gives the same image.
    let again = tmp.join("again");
    build_image(&again);
    assert_eq!(check_layout(&again, &wasm).manifest_hex, image.manifest_hex);
    assert_eq!(
        fs::read(again.join("farebox-oci.tar")).unwrap(),
        fs::read(out.join("farebox-oci.tar")).unwrap()
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn skopeo_reads_the_layout_and_keeps_the_digest() {
    let version = Command::new("skopeo").arg("--version").output();
    if !version.is_ok_and(|o| o.status.success()) {
        cannot_run(
            "skopeo_reads_the_layout_and_keeps_the_digest",
            "skopeo is not installed (Debian package `skopeo`)",
        );
        return;
    }
    let wasm = fs::read(wasm_path()).unwrap();
    let tmp = TempDir::new("oci-skopeo");
    let out = tmp.join("oci");
    build_image(&out);
    let image = check_layout(&out, &wasm);
    let layout_ref = format!("oci:{}:{TAG}", out.join("farebox").display());
    let archive_ref = format!(
        "oci-archive:{}:{TAG}",
        out.join("farebox-oci.tar").display()
    );
    let skopeo = |args: &[&str]| {
        let o = Command::new("skopeo")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run skopeo");
        assert!(
            o.status.success(),
            "skopeo {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let raw = skopeo(&["inspect", "--raw", &layout_ref]);
    assert_eq!(sha256_hex(&raw), image.manifest_hex);
    for (i, source) in [&layout_ref, &archive_ref].into_iter().enumerate() {
        let dest = tmp.join(&format!("copy{i}"));
        let dest_ref = format!("oci:{}:copied", dest.display());
        skopeo(&["copy", "--quiet", source, &dest_ref]);
        let index = read_json(&dest.join("index.json"));
        assert_eq!(
            index["manifests"][0]["digest"],
            format!("sha256:{}", image.manifest_hex),
            "skopeo copy from {source} changed the manifest digest"
        );
    }
}
