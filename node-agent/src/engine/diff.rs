//! The pure comparison of two states of a file: which attributes differ, the
//! attributes a state has, the projection of a state on the attributes an
//! entry compares, and the attributes only later versions measure.

use kube_fim_crds::{Attribute, FileAttributes};

pub(super) fn is_dir(attrs: Option<&FileAttributes>) -> bool {
    attrs
        .and_then(|a| a.file_type)
        .is_some_and(|t| t == kube_fim_crds::FileType::Directory)
}

/// The attributes in `attrs` that differ between `old` and `new`.
pub fn differing(
    old: &FileAttributes,
    new: &FileAttributes,
    attrs: &[Attribute],
) -> Vec<Attribute> {
    let mut out = Vec::new();
    for a in Attribute::ALL {
        if !attrs.contains(&a) {
            continue;
        }
        let same = match a {
            // Content not read is never the same content, even as other
            // content not read.
            Attribute::Hash => {
                old.hash == new.hash && old.unreadable.is_none() == new.unreadable.is_none()
            }
            Attribute::Size => old.size == new.size,
            Attribute::Type => old.file_type == new.file_type,
            Attribute::Mode => old.mode == new.mode,
            Attribute::Uid => old.uid == new.uid,
            Attribute::Gid => old.gid == new.gid,
            Attribute::Xattrs => old.xattrs == new.xattrs,
            Attribute::Mtime => old.mtime == new.mtime,
            Attribute::Ctime => old.ctime == new.ctime,
            Attribute::Inode => old.inode == new.inode,
            // Absent from a state stored before link counts were: not
            // compared until that state is approved again.
            Attribute::Links => old.links.is_none() || old.links == new.links,
            Attribute::LinkTarget => old.link_target == new.link_target,
            // As for links: a state stored without it is not compared on it.
            Attribute::Mount => old.mount.is_none() || old.mount == new.mount,
        };
        if !same {
            out.push(a);
        }
    }
    out
}

/// `current` without the attributes measured only by later versions (link
/// count, mount) that `approved` lacks; `None` if it has them all. An absent
/// link count or mount means "not measured" (never "none"), so such a state
/// is compared on them only once approved again.
pub(super) fn without_late_attributes(
    approved: &FileAttributes,
    current: &FileAttributes,
) -> Option<FileAttributes> {
    let mut out = current.clone();
    if approved.links.is_none() {
        out.links = None;
    }
    if approved.mount.is_none() {
        out.mount = None;
    }
    (out != *current).then_some(out)
}

/// What a directory's record compares (its mtime moves with every file in it).
pub(super) const DIR_ATTRS: [Attribute; 6] = [
    Attribute::Type,
    Attribute::Mode,
    Attribute::Uid,
    Attribute::Gid,
    Attribute::Xattrs,
    Attribute::Mount,
];

/// Only the attributes an entry compares, so its report shows only those.
pub(super) fn project(a: &FileAttributes, attrs: &[Attribute]) -> FileAttributes {
    let has = |x| attrs.contains(&x);
    FileAttributes {
        file_type: a.file_type.filter(|_| has(Attribute::Type)),
        hash: a.hash.clone().filter(|_| has(Attribute::Hash)),
        size: a.size.filter(|_| has(Attribute::Size)),
        mode: a.mode.clone().filter(|_| has(Attribute::Mode)),
        uid: a.uid.filter(|_| has(Attribute::Uid)),
        gid: a.gid.filter(|_| has(Attribute::Gid)),
        xattrs: a.xattrs.clone().filter(|_| has(Attribute::Xattrs)),
        mtime: a.mtime.clone().filter(|_| has(Attribute::Mtime)),
        ctime: a.ctime.clone().filter(|_| has(Attribute::Ctime)),
        inode: a.inode.filter(|_| has(Attribute::Inode)),
        links: a.links.filter(|_| has(Attribute::Links)),
        link_target: a.link_target.clone().filter(|_| has(Attribute::LinkTarget)),
        mount: a.mount.clone().filter(|_| has(Attribute::Mount)),
        // Why what is absent is absent, whatever the entry compares.
        unreadable: a.unreadable.clone(),
        // The reporter's, not the scan's ([`crate::report::fingerprint`]).
        sha256: None,
        sha256_missing: None,
    }
}
