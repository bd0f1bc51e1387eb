//! Build script: stamps the binary with the git commit it was built from (when built inside a git checkout with
//! git on the PATH; "unknown" otherwise) and the cargo features it was built with, for `dejavu --version` and the
//! tool version every artifact header records.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    // Rebuild the stamp when HEAD moves (a commit, a checkout); a worktree keeps HEAD in its own git dir and the
    // branch refs in the common one.
    for dir in [git(&["rev-parse", "--git-dir"]), git(&["rev-parse", "--git-common-dir"])].into_iter().flatten() {
        for f in ["HEAD", "packed-refs", "refs/heads"] {
            let p = std::path::Path::new(&dir).join(f);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
            let p = std::path::Path::new(&common).join(&branch);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    println!("cargo:rerun-if-changed=src/build.rs");
    let features: Vec<&str> = [("cuda", "CARGO_FEATURE_CUDA"), ("wgpu", "CARGO_FEATURE_WGPU")]
        .into_iter()
        .filter(|(_, var)| std::env::var_os(var).is_some())
        .map(|(name, _)| name)
        .collect();
    let features = if features.is_empty() { "none (CPU only)".to_string() } else { features.join(", ") };
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rustc-env=DEJAVU_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=DEJAVU_FEATURES={features}");
    println!("cargo:rustc-env=DEJAVU_LONG_VERSION={version} (commit {commit}; features: {features})");
}
