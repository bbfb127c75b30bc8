//! Sets `cfg(farebox_e2e)` when the end-to-end tests can be meant to run: `make test` sets
//! `ENVOY` and `FAREBOX_WASM`, and under `CI=true` they always run (and fail if something
//! is missing). Without it, a plain `cargo test` reports them as ignored with the reason
//! ("run `make test`") instead of failing each for want of Envoy and the wasm filter.
fn main() {
    println!("cargo:rustc-check-cfg=cfg(farebox_e2e)");
    for var in ["ENVOY", "FAREBOX_WASM", "CI"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if ci || set("ENVOY") || set("FAREBOX_WASM") {
        println!("cargo:rustc-cfg=farebox_e2e");
    }
}
