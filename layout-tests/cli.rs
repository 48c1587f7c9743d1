//! The command line's contract: exit codes, unsupported transports, man pages that match
//! the clap definitions, completions, and the licences of every dependency.

mod common;

use common::*;

#[test]
fn bad_arguments_exit_3_and_name_the_argument() {
    for (args, needle) in [
        (vec!["copy", "./dir", "oci:/x"], "needs a transport"),
        (
            vec!["inspect", "--platform", "linux", "oci:/x"],
            "invalid platform \"linux\"",
        ),
        (vec!["inspect", "oci:/x:bad name"], "ref name \"bad name\""),
        (vec!["frobnicate"], "unrecognized subcommand"),
    ] {
        let out = lathe(&args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(lathe(&["--help"]).status.code(), Some(0));
}

#[test]
fn an_unreachable_registry_is_named_and_nothing_is_written() {
    let tmp = scratch();
    // Port 1 on loopback: nothing listens there, and lathe tries https, then http.
    let out = lathe(&[
        "copy",
        "docker://127.0.0.1:1/x:y",
        &format!("oci:{}", tmp.path().join("o").display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("docker://127.0.0.1:1/x:y: ")
            && stderr(&out).contains("could not connect"),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.path().join("o").exists());
}

#[test]
fn bad_creds_are_a_usage_error_that_does_not_echo_them() {
    let out = lathe(&["--creds", "no-colon-secret", "inspect", "oci:/x"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("--creds must be USER:PASSWORD"));
    assert!(
        !stderr(&out).contains("no-colon-secret"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_inputs_are_named() {
    let out = lathe(&["inspect", "oci:/nonexistent/layout"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/layout is not an OCI image layout"),
        "{}",
        stderr(&out)
    );
    let out = lathe(&["inspect", "oci-archive:/nonexistent.tar"]);
    assert!(
        stderr(&out).contains("oci-archive:/nonexistent.tar"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn man_pages_match_the_cli() {
    let tmp = scratch();
    let written = lathe::cli::write_man_pages(tmp.path()).unwrap();
    let committed = repo_root().join("man");
    if std::env::var_os("LATHE_UPDATE_MAN").is_some() {
        std::fs::create_dir_all(&committed).unwrap();
        for p in &written {
            std::fs::copy(p, committed.join(p.file_name().unwrap())).unwrap();
        }
    }
    assert_eq!(
        snapshot(tmp.path()),
        snapshot(&committed),
        "man/ is stale: run `LATHE_UPDATE_MAN=1 cargo test --test cli man_pages` and commit man/"
    );
    assert!(written.iter().any(|p| p.ends_with("lathe-copy.1")));
}

#[test]
fn completions_are_generated() {
    let out = lathe_ok(&["completions", "bash"]);
    assert!(out.contains("lathe") && out.contains("inspect"), "{out}");
}

/// Every dependency (normal, build and dev) must be under a licence we accept.
#[test]
fn dependency_licences_are_accepted() {
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .unwrap();
    let host = String::from_utf8(rustc.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .unwrap();
    // The packages built for this host (the ones in lathe's binaries and tests).
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--offline",
            "--filter-platform",
            &host,
        ])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    const ACCEPTED: &[&str] = &[
        "MIT",
        "Apache-2.0",
        "Apache-2.0 WITH LLVM-exception",
        "BSD-2-Clause",
        "BSD-3-Clause",
        "ISC",
        "Zlib",
        "Unicode-3.0",
        "Unicode-DFS-2016",
        "Unlicense",
        "0BSD",
        "CC0-1.0",
        "BSL-1.0",
        "MPL-2.0",
        "CDLA-Permissive-2.0",
    ];
    let mut refused = Vec::new();
    for pkg in meta["packages"].as_array().unwrap() {
        let name = pkg["name"].as_str().unwrap();
        let Some(licence) = pkg["license"].as_str() else {
            refused.push(format!("{name}: no licence field"));
            continue;
        };
        // An SPDX expression: every OR-alternative group must have at least one accepted
        // choice; AND terms must all be accepted.
        let normalized = licence.replace('/', " OR ").replace(['(', ')'], "");
        let ok = normalized.split(" OR ").any(|alt| {
            alt.split(" AND ")
                .all(|term| ACCEPTED.contains(&term.trim()))
        });
        if !ok {
            refused.push(format!("{name}: {licence}"));
        }
    }
    assert!(
        refused.is_empty(),
        "dependencies under licences we do not accept: {refused:#?}"
    );
}
