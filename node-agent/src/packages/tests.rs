//! Package verification against real databases: a node root made of the
//! machine's own dpkg records (status stanzas, md5sums, the packaged files)
//! and an rpm database made by `rpm --initdb` and `rpm -i --justdb` of a
//! package `rpmbuild` builds here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kube_fim_crds::{
    ChangeCategory, FileAttributes, FileChangeSpec, FileType, PackageManager, PackageVerdict,
};

use super::*;
use crate::fixtures::{self, metric};

/// A node root with the machine's dpkg records of `packages` and their files.
fn dpkg_root(packages: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let db = root.join("var/lib/dpkg/info");
    std::fs::create_dir_all(&db).unwrap();
    let status = std::fs::read_to_string("/var/lib/dpkg/status")
        .expect("this test reads the machine's own dpkg database (a Debian machine: make deps)");
    let mut stanzas = Vec::new();
    for p in packages {
        let stanza = status
            .split("\n\n")
            .find(|s| s.starts_with(&format!("Package: {p}\n")))
            .unwrap_or_else(|| panic!("package {p} is not installed on this machine"));
        stanzas.push(stanza.to_string());
        let info = Path::new("/var/lib/dpkg/info");
        let sums = std::fs::read_dir(info)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|n| {
                n == &format!("{p}.md5sums")
                    || n.starts_with(&format!("{p}:")) && n.ends_with(".md5sums")
            })
            .unwrap_or_else(|| panic!("no md5sums for {p}"));
        std::fs::copy(info.join(&sums), db.join(&sums)).unwrap();
        let text = std::fs::read(info.join(&sums)).unwrap();
        for (_, path) in dpkg::parse_md5sums(&text).flatten() {
            let path = PathBuf::from(OsStr::from_bytes(&path));
            let to = root.join(path.strip_prefix("/").unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&path, &to).unwrap();
        }
    }
    std::fs::write(
        root.join("var/lib/dpkg/status"),
        stanzas.join("\n\n") + "\n\n",
    )
    .unwrap();
    dir
}

/// A Modified change of `path` under `root` as the engine reports it.
fn modified(root: &Path, path: &str) -> FileChangeSpec {
    let content = std::fs::read(root.join(path.trim_start_matches('/'))).unwrap();
    FileChangeSpec {
        category: ChangeCategory::Modified,
        after: Some(FileAttributes {
            file_type: Some(FileType::File),
            hash: Some(blake3::hash(&content).to_hex().to_string()),
            ..FileAttributes::default()
        }),
        ..fixtures::change(path)
    }
}

fn verify(p: &mut Packages, changes: &mut [FileChangeSpec]) -> Telemetry {
    let t = Telemetry::new("n1").unwrap();
    p.verify(changes, &t);
    t
}

fn version_of(name: &str) -> String {
    let status = std::fs::read_to_string("/var/lib/dpkg/status").unwrap();
    dpkg::parse_status(&status)
        .into_iter()
        .find(|p| p.name == name)
        .unwrap()
        .version
}

/// Same size, same mtime, other bytes: what a careful trojan looks like.
fn trojan(file: &Path) {
    let meta = std::fs::metadata(file).unwrap();
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(file, &bytes).unwrap();
    let mtime = meta.modified().unwrap();
    std::fs::File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(std::fs::metadata(file).unwrap().len(), meta.len());
}

#[test]
fn a_packaged_file_is_verified_and_a_trojan_with_its_size_and_mtime_is_a_mismatch() {
    let dir = dpkg_root(&["hostname", "sed"]);
    let root = dir.path();
    std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    std::fs::write(root.join("usr/local/bin/mine"), "#!/bin/sh\n").unwrap();
    let mut p = Packages::new(root);

    let mut changes = vec![
        modified(root, "/bin/hostname"),
        modified(root, "/usr/local/bin/mine"),
    ];
    verify(&mut p, &mut changes);
    let check = changes[0]
        .package
        .clone()
        .expect("hostname's file is verified");
    assert_eq!(check.manager, PackageManager::Dpkg);
    assert_eq!(check.name, "hostname");
    assert_eq!(check.version, version_of("hostname"));
    assert_eq!(check.verdict, PackageVerdict::Verified);
    assert_eq!(check.version_before, None);
    assert_eq!(changes[1].package, None, "no package owns it");

    trojan(&root.join("bin/hostname"));
    let mut changes = vec![modified(root, "/bin/hostname")];
    let t = verify(&mut p, &mut changes);
    let check = changes[0].package.clone().expect("still hostname's path");
    assert_eq!(check.verdict, PackageVerdict::Mismatch);
    assert_eq!(check.name, "hostname");
    assert_eq!(
        metric(
            &t,
            r#"kube_fim_agent_package_checks_total{manager="dpkg",policy="p",verdict="Mismatch",node="n1"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn content_that_moved_on_since_it_was_hashed_gets_no_verdict() {
    // The change reports a trojan's hash; the package's content is back by
    // the time it is read again: the reported content was never verified.
    let dir = dpkg_root(&["hostname"]);
    let root = dir.path();
    let file = root.join("bin/hostname");
    let original = std::fs::read(&file).unwrap();
    trojan(&file);
    let mut changes = vec![modified(root, "/bin/hostname")];
    std::fs::write(&file, &original).unwrap();
    verify(&mut Packages::new(root), &mut changes);
    assert_eq!(changes[0].package, None);
}

#[test]
fn an_upgrade_names_the_version_before_it() {
    let dir = dpkg_root(&["hostname"]);
    let root = dir.path();
    let mut p = Packages::new(root);
    let mut changes = vec![modified(root, "/bin/hostname")];
    verify(&mut p, &mut changes);
    let old = version_of("hostname");
    assert_eq!(changes[0].package.as_ref().unwrap().version, old);

    // "Version 99": new content, its MD5 in the md5sums, a new status.
    let file = root.join("bin/hostname");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(b"\nnew build\n");
    std::fs::write(&file, &bytes).unwrap();
    let sums = std::fs::read_dir(root.join("var/lib/dpkg/info"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".md5sums"))
        .unwrap();
    let text = std::fs::read_to_string(&sums).unwrap();
    let md5 = format!("{:x}", md5::Md5::digest(&bytes));
    let text: String = text
        .lines()
        .map(|l| {
            if l.ends_with("bin/hostname") && !l.contains("share") {
                format!("{md5}  bin/hostname\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&sums, text).unwrap();
    let status = root.join("var/lib/dpkg/status");
    let s = std::fs::read_to_string(&status)
        .unwrap()
        .replace(&format!("Version: {old}\n"), "Version: 99\n");
    std::fs::write(&status, s).unwrap();

    let mut changes = vec![modified(root, "/bin/hostname")];
    verify(&mut p, &mut changes);
    let check = changes[0].package.clone().unwrap();
    assert_eq!(check.verdict, PackageVerdict::Verified);
    assert_eq!(check.version, "99");
    assert_eq!(check.version_before, Some(old));
}

#[test]
fn an_edited_conffile_is_an_ordinary_change_and_an_unedited_one_is_verified() {
    let dir = dpkg_root(&["login"]);
    let root = dir.path();
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    let login = dpkg::parse_status(&status).pop().unwrap();
    let (conffile, _) = login
        .conffiles
        .iter()
        .find(|(path, md5)| {
            std::fs::read(path).is_ok_and(|b| format!("{:x}", md5::Md5::digest(&b)) == *md5)
        })
        .expect("login has a conffile the machine left as packaged");
    let to = root.join(conffile.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(conffile, &to).unwrap();
    let mut p = Packages::new(root);
    let mut changes = vec![modified(root, conffile)];
    verify(&mut p, &mut changes);
    assert_eq!(
        changes[0].package.as_ref().map(|c| c.verdict),
        Some(PackageVerdict::Verified)
    );
    std::fs::write(&to, "# the admin's own\n").unwrap();
    let mut changes = vec![modified(root, conffile)];
    verify(&mut p, &mut changes);
    assert_eq!(changes[0].package, None, "the admin's to edit");
}

#[test]
fn merged_usr_and_diversions_find_the_file_where_it_lives() {
    // debianutils records bin/run-parts; on a merged-/usr node it lives in
    // /usr/bin, and a change is reported there.
    let dir = dpkg_root(&["debianutils"]);
    let root = dir.path();
    for e in std::fs::read_dir(root.join("bin")).unwrap() {
        let e = e.unwrap();
        std::fs::rename(e.path(), root.join("usr/bin").join(e.file_name())).unwrap();
    }
    std::fs::remove_dir(root.join("bin")).unwrap();
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    // Another package diverted /usr/bin/savelog to /usr/bin/savelog.distrib
    // and put its own file in its place.
    std::fs::rename(
        root.join("usr/bin/savelog"),
        root.join("usr/bin/savelog.distrib"),
    )
    .unwrap();
    std::fs::write(root.join("usr/bin/savelog"), "#!/bin/sh\necho mine\n").unwrap();
    std::fs::write(
        root.join("var/lib/dpkg/diversions"),
        "/usr/bin/savelog\n/usr/bin/savelog.distrib\nsomeone\n",
    )
    .unwrap();
    let mut p = Packages::new(root);
    let mut changes = vec![
        modified(root, "/usr/bin/run-parts"),
        modified(root, "/usr/bin/savelog.distrib"),
        modified(root, "/usr/bin/savelog"),
    ];
    verify(&mut p, &mut changes);
    let verdicts: Vec<_> = changes
        .iter()
        .map(|c| c.package.as_ref().map(|p| (p.name.as_str(), p.verdict)))
        .collect();
    assert_eq!(
        verdicts,
        [
            Some(("debianutils", PackageVerdict::Verified)),
            Some(("debianutils", PackageVerdict::Verified)),
            None,
        ]
    );
}

#[test]
fn a_corrupt_database_is_reported_once_and_verification_resumes_when_it_changes() {
    let dir = dpkg_root(&["hostname"]);
    let root = dir.path();
    let sums = std::fs::read_dir(root.join("var/lib/dpkg/info"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".md5sums"))
        .unwrap();
    let good = std::fs::read(&sums).unwrap();
    std::fs::write(&sums, b"\xff\xfe not a digest  bin/hostname\n").unwrap();
    let mut p = Packages::new(root);
    let t = Telemetry::new("n1").unwrap();
    for _ in 0..3 {
        let mut changes = vec![modified(root, "/bin/hostname")];
        p.verify(&mut changes, &t);
        assert_eq!(changes[0].package, None, "unverified, never a guess");
    }
    assert_eq!(
        metric(
            &t,
            r#"kube_fim_agent_package_database_errors_total{manager="dpkg",node="n1"}"#
        ),
        Some(1.0),
        "reported once"
    );
    // Rewritten as dpkg does it (a new file renamed over the old).
    let tmp = sums.with_extension("new");
    std::fs::write(&tmp, good).unwrap();
    std::fs::rename(&tmp, &sums).unwrap();
    let mut changes = vec![modified(root, "/bin/hostname")];
    p.verify(&mut changes, &t);
    assert_eq!(
        changes[0].package.as_ref().map(|c| c.verdict),
        Some(PackageVerdict::Verified)
    );
}

#[test]
fn a_database_symlinked_out_of_the_root_is_not_followed() {
    // Root on the node points the status file at a file outside the host
    // root: the agent reads nothing outside it.
    let dir = dpkg_root(&["hostname"]);
    let root = dir.path();
    let status = root.join("var/lib/dpkg/status");
    std::fs::remove_file(&status).unwrap();
    std::os::unix::fs::symlink("/var/lib/dpkg/status", &status).unwrap();
    let mut changes = vec![modified(root, "/bin/hostname")];
    let t = verify(&mut Packages::new(root), &mut changes);
    assert_eq!(changes[0].package, None);
    assert_eq!(
        metric(
            &t,
            r#"kube_fim_agent_package_database_errors_total{manager="dpkg",node="n1"}"#
        ),
        Some(1.0)
    );
}

/// Runs a tool the rpm tests need, failing clearly when it is missing.
fn run(cmd: &mut Command) {
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

/// A node root whose rpm database has one package built here: `kfim-tool`
/// 1.2-3 (epoch 1) with /usr/bin/kfim-tool and %config /etc/kfim.conf.
fn rpm_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let top = dir.path().join("build");
    for d in ["SPECS", "SOURCES", "BUILD", "RPMS", "SRPMS", "BUILDROOT"] {
        std::fs::create_dir_all(top.join(d)).unwrap();
    }
    let spec = top.join("SPECS/kfim-tool.spec");
    std::fs::write(
        &spec,
        "Name: kfim-tool\nVersion: 1.2\nRelease: 3\nEpoch: 1\nSummary: t\nLicense: MIT\nBuildArch: noarch\n\
         %description\nt\n%install\nmkdir -p %{buildroot}/usr/bin %{buildroot}/etc\n\
         printf '#!/bin/sh\\necho kfim\\n' > %{buildroot}/usr/bin/kfim-tool\n\
         printf 'level=1\\n' > %{buildroot}/etc/kfim.conf\n\
         %files\n/usr/bin/kfim-tool\n%config /etc/kfim.conf\n",
    )
    .unwrap();
    run(Command::new("rpmbuild")
        .arg("-bb")
        .arg("--define")
        .arg(format!("_topdir {}", top.display()))
        .arg("--define")
        .arg("_binary_filedigest_algorithm 8")
        .arg("--define")
        .arg("__os_install_post %{nil}")
        .arg(&spec));
    let rpm = top.join("RPMS/noarch/kfim-tool-1.2-3.noarch.rpm");
    let dbpath = root.join("var/lib/rpm");
    std::fs::create_dir_all(&dbpath).unwrap();
    run(Command::new("rpm")
        .arg("--dbpath")
        .arg(&dbpath)
        .arg("--define")
        .arg("_db_backend sqlite")
        .arg("--initdb"));
    run(Command::new("rpm")
        .arg("--dbpath")
        .arg(&dbpath)
        .arg("--define")
        .arg("_db_backend sqlite")
        .args(["-i", "--justdb", "--nodeps", "--nosignature"])
        .arg(&rpm));
    assert!(
        dbpath.join("rpmdb.sqlite").is_file(),
        "rpm made no rpmdb.sqlite"
    );
    for (path, content) in [
        ("usr/bin/kfim-tool", "#!/bin/sh\necho kfim\n"),
        ("etc/kfim.conf", "level=1\n"),
    ] {
        std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
        std::fs::write(root.join(path), content).unwrap();
    }
    dir
}

#[test]
fn an_rpm_database_verifies_its_files_and_flags_a_replaced_one() {
    let dir = rpm_root();
    let root = dir.path();
    let mut p = Packages::new(root);
    let mut changes = vec![
        modified(root, "/usr/bin/kfim-tool"),
        modified(root, "/etc/kfim.conf"),
    ];
    verify(&mut p, &mut changes);
    let check = changes[0].package.clone().expect("kfim-tool owns it");
    assert_eq!(check.manager, PackageManager::Rpm);
    assert_eq!(check.name, "kfim-tool");
    assert_eq!(check.version, "1:1.2-3");
    assert_eq!(check.verdict, PackageVerdict::Verified);
    assert_eq!(
        changes[1].package.as_ref().map(|c| c.verdict),
        Some(PackageVerdict::Verified)
    );

    trojan(&root.join("usr/bin/kfim-tool"));
    std::fs::write(root.join("etc/kfim.conf"), "level=2\n").unwrap();
    let mut changes = vec![
        modified(root, "/usr/bin/kfim-tool"),
        modified(root, "/etc/kfim.conf"),
    ];
    verify(&mut p, &mut changes);
    assert_eq!(
        changes[0].package.as_ref().map(|c| c.verdict),
        Some(PackageVerdict::Mismatch)
    );
    assert_eq!(changes[1].package, None, "%config: the admin's to edit");
}

#[test]
fn the_rpm_database_is_never_written() {
    let dir = rpm_root();
    let root = dir.path();
    let db = root.join("var/lib/rpm");
    let before: Vec<_> = std::fs::read_dir(&db)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    let mut changes = vec![modified(root, "/usr/bin/kfim-tool")];
    verify(&mut Packages::new(root), &mut changes);
    assert!(changes[0].package.is_some());
    let after: Vec<_> = std::fs::read_dir(&db)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    assert!(before == after, "the node's rpm database changed");
}

#[test]
fn every_truncation_of_a_real_rpm_header_is_an_error_never_a_panic() {
    let dir = rpm_root();
    let db = rusqlite::Connection::open(dir.path().join("var/lib/rpm/rpmdb.sqlite")).unwrap();
    let blob: Vec<u8> = db
        .query_row("SELECT blob FROM Packages LIMIT 1", [], |r| r.get(0))
        .unwrap();
    let header = rpm::parse_header(&blob).unwrap();
    assert_eq!(header.name, "kfim-tool");
    assert_eq!(header.algo, 8, "SHA-256 digests");
    for n in 0..blob.len() {
        let _ = rpm::parse_header(&blob[..n]);
    }
    // Offsets and counts turned to garbage.
    for at in (8..blob.len().min(8 + 16 * 40)).step_by(4) {
        let mut bad = blob.clone();
        bad[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let _ = rpm::parse_header(&bad);
    }
}

#[test]
fn a_file_dpkg_put_in_place_before_its_digest_is_no_mismatch() {
    // dpkg renames a package's new files into place before it installs the
    // new md5sums (seen on this machine: 11 ms apart), with its journal
    // (`updates/`) holding the transaction's status entries meanwhile.
    let dir = dpkg_root(&["hostname"]);
    let root = dir.path();
    let mut p = Packages::new(root);
    let mut changes = vec![modified(root, "/bin/hostname")];
    verify(&mut p, &mut changes);
    let old = version_of("hostname");

    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    let unpacked = status
        .replace(&format!("Version: {old}\n"), "Version: 99\n")
        .replace(
            "Status: install ok installed",
            "Status: install ok unpacked",
        );
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(root.join("var/lib/dpkg/updates/0000"), unpacked.trim_end()).unwrap();
    let file = root.join("bin/hostname");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(b"\nnew build\n");
    std::fs::write(&file, &bytes).unwrap();
    let mut changes = vec![modified(root, "/bin/hostname")];
    verify(&mut p, &mut changes);
    assert_eq!(
        changes[0].package, None,
        "not a Mismatch while dpkg is at work"
    );

    // The new md5sums in: Verified, with the journal's version.
    let sums = std::fs::read_dir(root.join("var/lib/dpkg/info"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".md5sums"))
        .unwrap();
    let md5 = format!("{:x}", md5::Md5::digest(&bytes));
    let text: String = std::fs::read_to_string(&sums)
        .unwrap()
        .lines()
        .map(|l| match l.split_once("  ") {
            Some((_, "bin/hostname")) => format!("{md5}  bin/hostname\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    let tmp = sums.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &sums).unwrap();
    let mut changes = vec![modified(root, "/bin/hostname")];
    verify(&mut p, &mut changes);
    let check = changes[0].package.clone().unwrap();
    assert_eq!(check.verdict, PackageVerdict::Verified);
    assert_eq!(check.version, "99");
    assert_eq!(check.version_before, Some(old));

    // The transaction over, someone else's bytes are a Mismatch again.
    std::fs::remove_file(root.join("var/lib/dpkg/updates/0000")).unwrap();
    trojan(&file);
    let mut changes = vec![modified(root, "/bin/hostname")];
    verify(&mut p, &mut changes);
    assert_eq!(
        changes[0].package.as_ref().map(|c| c.verdict),
        Some(PackageVerdict::Mismatch)
    );
}

#[test]
fn only_the_monitored_paths_are_indexed() {
    let dir = dpkg_root(&["hostname", "sed"]);
    let root = dir.path();
    let host = HostRoot::open(root).unwrap();
    let all = dpkg::index(&host, &Scope::default()).unwrap();
    let bin = dpkg::index(&host, &Scope::new([b"/usr/bin".to_vec()])).unwrap();
    let paths = |i: &Index| {
        let mut v: Vec<String> = i
            .files
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        v.sort();
        v
    };
    assert!(paths(&all).iter().any(|p| p.starts_with("/usr/share/")));
    // /bin/hostname is kept for its merged-/usr alias /usr/bin/hostname.
    assert!(
        paths(&bin).contains(&"/bin/hostname".to_string()),
        "{:?}",
        paths(&bin)
    );
    assert!(
        paths(&bin)
            .iter()
            .all(|p| p.starts_with("/usr/bin/") || p.starts_with("/bin/"))
    );

    let mut p = Packages::new(root);
    p.set_scope(Scope::new([b"/etc".to_vec()]));
    let mut changes = vec![modified(root, "/bin/hostname")];
    verify(&mut p, &mut changes);
    assert_eq!(changes[0].package, None, "outside every monitored entry");
    p.set_scope(Scope::new([b"/bin".to_vec()]));
    let mut changes = vec![modified(root, "/bin/hostname")];
    verify(&mut p, &mut changes);
    assert!(
        changes[0].package.is_some(),
        "indexed again for the new entries"
    );
}
