//! Node roots with a real package database: the machine's own dpkg records
//! (status stanzas and md5sums) of a few installed packages, and their files.

use std::path::{Path, PathBuf};

/// The machine's dpkg status stanza of `package`.
fn stanza(package: &str) -> String {
    let status = std::fs::read_to_string("/var/lib/dpkg/status")
        .expect("the package tests read the machine's own dpkg database (a Debian machine)");
    status
        .split("\n\n")
        .find(|s| s.starts_with(&format!("Package: {package}\n")))
        .unwrap_or_else(|| panic!("package {package} is not installed on this machine"))
        .to_string()
}

/// The installed version of `package` on this machine.
pub fn version(package: &str) -> String {
    stanza(package)
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .expect("a Version field")
        .to_string()
}

/// The md5sums file of `package` under `info`.
pub fn md5sums_in(info: &Path, package: &str) -> PathBuf {
    std::fs::read_dir(info)
        .expect("dpkg info")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            let n = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            n == format!("{package}.md5sums")
                || (n.starts_with(&format!("{package}:")) && n.ends_with(".md5sums"))
        })
        .unwrap_or_else(|| panic!("no md5sums of {package}"))
}

/// Copies the machine's dpkg records of `packages` and every file their
/// md5sums list into the node root `root` (at the paths dpkg recorded).
pub fn install_dpkg(root: &Path, packages: &[&str]) {
    let info = root.join("var/lib/dpkg/info");
    std::fs::create_dir_all(&info).expect("mkdir");
    let mut stanzas = Vec::new();
    for p in packages {
        stanzas.push(stanza(p));
        let sums = md5sums_in(Path::new("/var/lib/dpkg/info"), p);
        let to = info.join(sums.file_name().expect("name"));
        std::fs::copy(&sums, &to).expect("copy md5sums");
        for line in std::fs::read_to_string(&sums).expect("md5sums").lines() {
            let Some((_, rel)) = line.split_once("  ") else {
                continue;
            };
            let to = root.join(rel);
            std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            std::fs::copy(Path::new("/").join(rel), &to).expect("copy a packaged file");
        }
    }
    std::fs::write(
        root.join("var/lib/dpkg/status"),
        stanzas.join("\n\n") + "\n\n",
    )
    .expect("write status");
}

/// Runs a tool the rpm tests need, failing clearly when it is missing.
fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "{:?} cannot run ({e}): the rpm tests need Debian's rpm package (make deps)",
            cmd.get_program()
        )
    });
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Content of `/usr/bin/kfim-tool` in the package [`install_rpm`] builds.
pub const RPM_TOOL: &str = "#!/bin/sh\necho kfim\n";

/// Builds the rpm `kfim-tool` 1.2-3 (epoch 1; `/usr/bin/kfim-tool`, SHA-256
/// file digests) with `rpmbuild`, and makes the node root's rpm database
/// (`/var/lib/rpm/rpmdb.sqlite`) with `rpm --initdb` and `rpm -i --justdb`;
/// the file itself is written into the root as the package has it.
pub fn install_rpm(root: &Path) {
    let build = tempfile::tempdir().expect("temp dir");
    let top = build.path();
    for d in ["SPECS", "SOURCES", "BUILD", "RPMS", "SRPMS", "BUILDROOT"] {
        std::fs::create_dir_all(top.join(d)).expect("mkdir");
    }
    let spec = top.join("SPECS/kfim-tool.spec");
    std::fs::write(
        &spec,
        "Name: kfim-tool\nVersion: 1.2\nRelease: 3\nEpoch: 1\nSummary: t\nLicense: MIT\nBuildArch: noarch\n\
         %description\nt\n%install\nmkdir -p %{buildroot}/usr/bin\n\
         printf '#!/bin/sh\\necho kfim\\n' > %{buildroot}/usr/bin/kfim-tool\n\
         %files\n/usr/bin/kfim-tool\n",
    )
    .expect("spec");
    run(std::process::Command::new("rpmbuild")
        .arg("-bb")
        .arg("--define")
        .arg(format!("_topdir {}", top.display()))
        .arg("--define")
        .arg("_binary_filedigest_algorithm 8")
        .arg("--define")
        .arg("__os_install_post %{nil}")
        .arg(&spec));
    let dbpath = root.join("var/lib/rpm");
    std::fs::create_dir_all(&dbpath).expect("mkdir");
    let rpm = |args: &[&str]| {
        run(std::process::Command::new("rpm")
            .arg("--dbpath")
            .arg(&dbpath)
            .args(["--define", "_db_backend sqlite"])
            .args(args));
    };
    rpm(&["--initdb"]);
    let package = top.join("RPMS/noarch/kfim-tool-1.2-3.noarch.rpm");
    rpm(&[
        "-i",
        "--justdb",
        "--nodeps",
        "--nosignature",
        package.to_str().expect("utf-8 path"),
    ]);
    let tool = root.join("usr/bin/kfim-tool");
    std::fs::create_dir_all(tool.parent().expect("parent")).expect("mkdir");
    std::fs::write(&tool, RPM_TOOL).expect("write");
}

fn md5_of(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("f");
    std::fs::write(&file, bytes).expect("upgrade");
    let out = std::process::Command::new("md5sum")
        .arg(&file)
        .output()
        .expect("upgrade");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("upgrade")
        .to_string()
}

/// Upgrades `package` in the node root as dpkg does: the new version's
/// md5sums and status first, then each new file written beside its old one
/// and renamed over it. Its files under `bin/`, as host paths.
pub fn upgrade(root: &Path, package: &str, to: &str) -> Vec<String> {
    let info = root.join("var/lib/dpkg/info");
    let sums = md5sums_in(&info, package);
    let mut files = Vec::new();
    let mut text = String::new();
    for line in std::fs::read_to_string(&sums).expect("upgrade").lines() {
        let (_, rel) = line.split_once("  ").expect("upgrade");
        let mut content = std::fs::read(root.join(rel)).expect("upgrade");
        content.extend_from_slice(format!("\n# {package} {to}\n").as_bytes());
        text.push_str(&format!("{}  {rel}\n", md5_of(&content)));
        if rel.starts_with("bin/") {
            files.push((rel.to_string(), content));
        }
    }
    let tmp = sums.with_extension("dpkg-new");
    std::fs::write(&tmp, text).expect("upgrade");
    std::fs::rename(&tmp, &sums).expect("upgrade");
    let status = root.join("var/lib/dpkg/status");
    let s = std::fs::read_to_string(&status).expect("upgrade");
    let stanza_start = s.find(&format!("Package: {package}\n")).expect("upgrade");
    let at = stanza_start + s[stanza_start..].find("Version: ").expect("upgrade");
    let end = at + s[at..].find('\n').expect("upgrade");
    let s = format!("{}Version: {to}{}", &s[..at], &s[end..]);
    std::fs::write(&status, s).expect("upgrade");
    for (rel, content) in &files {
        let new = root.join(format!("{rel}.dpkg-new"));
        std::fs::write(&new, content).expect("upgrade");
        std::fs::rename(&new, root.join(rel)).expect("upgrade");
    }
    let mut paths: Vec<String> = files.into_iter().map(|(r, _)| format!("/{r}")).collect();
    paths.sort();
    paths
}
