//! Puts the git revision of the source tree into `DAMSELFLY_GIT_REVISION` ("unknown" outside
//! a git checkout or without git; `DAMSELFLY_GIT_REVISION` in the build's environment wins),
//! and asks cargo to rerun when HEAD moves.

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
    // A build from a source archive can name its revision itself.
    let revision = std::env::var("DAMSELFLY_GIT_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=DAMSELFLY_GIT_REVISION={revision}");
    // HEAD (a branch switch) and the branch's ref (a commit) in this worktree's git dir and
    // the common dir; packed-refs for refs that live there.
    for dir in [
        git(&["rev-parse", "--path-format=absolute", "--git-dir"]),
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
    ]
    .into_iter()
    .flatten()
    {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/packed-refs");
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{r}");
        }
    }
    println!("cargo:rerun-if-env-changed=DAMSELFLY_GIT_REVISION");
}
