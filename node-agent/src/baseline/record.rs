//! The binary encoding of a baseline record (store version 3): a record is
//! written at every first baseline and read at every check, so it is made
//! of flags, varints and raw digests rather than JSON (version 2 stored
//! 230 bytes of JSON per file, with dates as text; this is about 100).
//!
//! Decoding is strict: unknown flags, a value out of range, text that is not
//! UTF-8 or bytes left over make a record unreadable, never a guess.
//!
//! Fields added later take a flag of their own, absent from the records
//! written before them: a state without the field is encoded as it was (its
//! bytes, and so the baseline's digest, unchanged), and the records of older
//! stores read as they are (the last flag, `UNREADABLE`, came so).

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{FileAttributes, FileType, Mount};

use super::Tracked;

/// Why a record could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError(&'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "undecodable record: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

// Flags of a record.
const APPROVED: u8 = 1;
const REPORTED: u8 = 1 << 1;
const EPOCH: u8 = 1 << 2;

// Flags of the attributes: one per field present, in the order written.
const TYPE: u16 = 1;
const HASH: u16 = 1 << 1;
const SIZE: u16 = 1 << 2;
const MODE: u16 = 1 << 3;
const UID: u16 = 1 << 4;
const GID: u16 = 1 << 5;
const XATTRS: u16 = 1 << 6;
const MTIME: u16 = 1 << 7;
const CTIME: u16 = 1 << 8;
const INODE: u16 = 1 << 9;
const LINKS: u16 = 1 << 10;
const LINK_TARGET: u16 = 1 << 11;
const MOUNT: u16 = 1 << 12;
/// `hash` / `xattrs` is stored as its 32 bytes (it is 64 lowercase hex
/// digits, as the agent writes them), not as text.
const HASH_RAW: u16 = 1 << 13;
const XATTRS_RAW: u16 = 1 << 14;
/// Why the state could not be read whole ([`FileAttributes::unreadable`]).
/// (Every flag of the 16 bits has a meaning now.)
const UNREADABLE: u16 = 1 << 15;

const TYPES: [FileType; 7] = [
    FileType::File,
    FileType::Directory,
    FileType::Symlink,
    FileType::Fifo,
    FileType::Socket,
    FileType::BlockDevice,
    FileType::CharDevice,
];

/// Appends the encoding of `t` to `out`.
pub fn encode(t: &Tracked, out: &mut Vec<u8>) {
    let mut flags = 0;
    if t.approved.is_some() {
        flags |= APPROVED;
    }
    if t.reported.is_some() {
        flags |= REPORTED;
    }
    if t.epoch != 0 {
        flags |= EPOCH;
    }
    out.push(flags);
    if let Some(a) = &t.approved {
        attributes(a, out);
    }
    if let Some(r) = &t.reported {
        text(r, out);
    }
    if t.epoch != 0 {
        varint(t.epoch, out);
    }
}

/// The encoding of `t`.
pub fn to_vec(t: &Tracked) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode(t, &mut out);
    out
}

/// Decodes a whole record.
pub fn decode(bytes: &[u8]) -> Result<Tracked, DecodeError> {
    let mut r = Reader(bytes);
    let flags = r.byte()?;
    if flags & !(APPROVED | REPORTED | EPOCH) != 0 {
        return Err(DecodeError("unknown record flags"));
    }
    let approved = if flags & APPROVED != 0 {
        Some(r.attributes()?)
    } else {
        None
    };
    let reported = if flags & REPORTED != 0 {
        Some(r.text()?)
    } else {
        None
    };
    let epoch = if flags & EPOCH != 0 { r.varint()? } else { 0 };
    if !r.0.is_empty() {
        return Err(DecodeError("bytes after the record"));
    }
    Ok(Tracked {
        approved,
        reported,
        epoch,
    })
}

fn attributes(a: &FileAttributes, out: &mut Vec<u8>) {
    let raw = |d: &Option<String>| d.as_deref().and_then(digest_bytes);
    let (hash, xattrs) = (raw(&a.hash), raw(&a.xattrs));
    let mut flags = 0;
    for (present, flag) in [
        (a.file_type.is_some(), TYPE),
        (a.hash.is_some(), HASH),
        (a.size.is_some(), SIZE),
        (a.mode.is_some(), MODE),
        (a.uid.is_some(), UID),
        (a.gid.is_some(), GID),
        (a.xattrs.is_some(), XATTRS),
        (a.mtime.is_some(), MTIME),
        (a.ctime.is_some(), CTIME),
        (a.inode.is_some(), INODE),
        (a.links.is_some(), LINKS),
        (a.link_target.is_some(), LINK_TARGET),
        (a.mount.is_some(), MOUNT),
        (hash.is_some(), HASH_RAW),
        (xattrs.is_some(), XATTRS_RAW),
        (a.unreadable.is_some(), UNREADABLE),
    ] {
        if present {
            flags |= flag;
        }
    }
    out.extend_from_slice(&flags.to_le_bytes());
    if let Some(t) = a.file_type {
        out.push(TYPES.iter().position(|x| *x == t).unwrap_or(0) as u8);
    }
    digest(a.hash.as_deref(), hash, out);
    if let Some(v) = a.size {
        varint(v, out);
    }
    if let Some(m) = &a.mode {
        text(m, out);
    }
    if let Some(v) = a.uid {
        varint(v.into(), out);
    }
    if let Some(v) = a.gid {
        varint(v.into(), out);
    }
    digest(a.xattrs.as_deref(), xattrs, out);
    for t in [&a.mtime, &a.ctime].into_iter().flatten() {
        let ts = t.0;
        varint(zigzag(ts.as_second()), out);
        // Before 1970 both are negative.
        varint(zigzag(ts.subsec_nanosecond().into()), out);
    }
    if let Some(v) = a.inode {
        varint(v, out);
    }
    if let Some(v) = a.links {
        varint(v, out);
    }
    if let Some(t) = &a.link_target {
        text(t, out);
    }
    if let Some(m) = &a.mount {
        for t in [&m.mount_point, &m.fs_type, &m.source, &m.root] {
            text(t, out);
        }
    }
    if let Some(why) = &a.unreadable {
        text(why, out);
    }
}

/// The 32 bytes of a digest written as 64 lowercase hex digits.
fn digest_bytes(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    blake3::Hash::from_hex(hex).ok().map(|h| *h.as_bytes())
}

fn digest(text_form: Option<&str>, raw: Option<[u8; 32]>, out: &mut Vec<u8>) {
    match (raw, text_form) {
        (Some(b), _) => out.extend_from_slice(&b),
        (None, Some(t)) => text(t, out),
        (None, None) => {}
    }
}

fn text(t: &str, out: &mut Vec<u8>) {
    varint(t.len() as u64, out);
    out.extend_from_slice(t.as_bytes());
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// The bytes of a record not read yet.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError("number out of range"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError("number out of range"))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        u32::try_from(self.varint()?).map_err(|_| DecodeError("number out of range"))
    }

    fn text(&mut self) -> Result<String, DecodeError> {
        let len = usize::try_from(self.varint()?).map_err(|_| DecodeError("truncated"))?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError("text that is not UTF-8"))
    }

    fn digest(&mut self, raw: bool) -> Result<String, DecodeError> {
        if raw {
            let b: [u8; 32] = self
                .take(32)?
                .try_into()
                .map_err(|_| DecodeError("truncated"))?;
            Ok(blake3::Hash::from_bytes(b).to_hex().to_string())
        } else {
            self.text()
        }
    }

    fn time(&mut self) -> Result<MicroTime, DecodeError> {
        let secs = unzigzag(self.varint()?);
        let nanos = i32::try_from(unzigzag(self.varint()?))
            .map_err(|_| DecodeError("time out of range"))?;
        Timestamp::new(secs, nanos)
            .map(MicroTime)
            .map_err(|_| DecodeError("time out of range"))
    }

    fn attributes(&mut self) -> Result<FileAttributes, DecodeError> {
        let flags = u16::from_le_bytes(
            self.take(2)?
                .try_into()
                .map_err(|_| DecodeError("truncated"))?,
        );
        if flags & HASH_RAW != 0 && flags & HASH == 0
            || flags & XATTRS_RAW != 0 && flags & XATTRS == 0
        {
            return Err(DecodeError("a raw digest of an absent attribute"));
        }
        let has = |f: u16| flags & f != 0;
        let mut a = FileAttributes::default();
        if has(TYPE) {
            let i = usize::from(self.byte()?);
            a.file_type = Some(*TYPES.get(i).ok_or(DecodeError("unknown file type"))?);
        }
        if has(HASH) {
            a.hash = Some(self.digest(has(HASH_RAW))?);
        }
        if has(SIZE) {
            a.size = Some(self.varint()?);
        }
        if has(MODE) {
            a.mode = Some(self.text()?);
        }
        if has(UID) {
            a.uid = Some(self.u32()?);
        }
        if has(GID) {
            a.gid = Some(self.u32()?);
        }
        if has(XATTRS) {
            a.xattrs = Some(self.digest(has(XATTRS_RAW))?);
        }
        if has(MTIME) {
            a.mtime = Some(self.time()?);
        }
        if has(CTIME) {
            a.ctime = Some(self.time()?);
        }
        if has(INODE) {
            a.inode = Some(self.varint()?);
        }
        if has(LINKS) {
            a.links = Some(self.varint()?);
        }
        if has(LINK_TARGET) {
            a.link_target = Some(self.text()?);
        }
        if has(MOUNT) {
            a.mount = Some(Mount {
                mount_point: self.text()?,
                fs_type: self.text()?,
                source: self.text()?,
                root: self.text()?,
            });
        }
        if has(UNREADABLE) {
            a.unreadable = Some(self.text()?);
        }
        Ok(a)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full() -> FileAttributes {
        FileAttributes {
            file_type: Some(FileType::File),
            hash: Some(blake3::hash(b"x").to_hex().to_string()),
            size: Some(1),
            mode: Some("0644".into()),
            uid: Some(0),
            gid: Some(u32::MAX),
            xattrs: Some(blake3::hash(b"y").to_hex().to_string()),
            mtime: Some(MicroTime(
                Timestamp::new(1_700_000_000, 123_456_000).unwrap(),
            )),
            ctime: Some(MicroTime(Timestamp::new(-5, 1_000).unwrap())),
            inode: Some(u64::MAX),
            links: Some(2),
            link_target: Some("../a b".into()),
            mount: Some(Mount {
                mount_point: "/".into(),
                fs_type: "ext4".into(),
                source: "/dev/vda1".into(),
                root: "/".into(),
            }),
            unreadable: None,
            sha256: None,
            sha256_missing: None,
        }
    }

    #[test]
    fn a_full_record_is_a_third_of_its_json() {
        let t = Tracked {
            approved: Some(full()),
            reported: Some("v2-abc".into()),
            epoch: 3,
        };
        let bytes = to_vec(&t);
        assert_eq!(decode(&bytes).unwrap(), t);
        let json = serde_json::to_vec(&t).unwrap();
        assert!(
            bytes.len() * 2 < json.len(),
            "{} vs {}",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn a_state_read_whole_is_encoded_as_before_unreadable_fields_and_all() {
        let t = Tracked {
            approved: Some(full()),
            reported: None,
            epoch: 0,
        };
        // The encoding of version 3 before the field: every other flag.
        let bytes = to_vec(&t);
        assert_eq!(&bytes[1..3], &((1u16 << 15) - 1).to_le_bytes());
        let unreadable = Tracked {
            approved: Some(FileAttributes {
                hash: None,
                xattrs: None,
                unreadable: Some("EACCES: permission denied".into()),
                ..full()
            }),
            ..t
        };
        let bytes = to_vec(&unreadable);
        assert_eq!(decode(&bytes).unwrap(), unreadable);
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncated at {n}");
        }
    }

    #[test]
    fn digests_that_are_not_lowercase_hex_keep_their_text() {
        for odd in ["ABC", &"A".repeat(64), "", &"0".repeat(63)] {
            let t = Tracked {
                approved: Some(FileAttributes {
                    hash: Some(odd.to_string()),
                    xattrs: Some(odd.to_string()),
                    ..FileAttributes::default()
                }),
                ..Tracked::default()
            };
            assert_eq!(decode(&to_vec(&t)).unwrap(), t);
        }
    }

    #[test]
    fn damaged_records_are_refused() {
        let good = to_vec(&Tracked {
            approved: Some(full()),
            reported: None,
            epoch: 1,
        });
        // Every truncation, and one byte too many.
        for n in 0..good.len() {
            assert!(decode(&good[..n]).is_err(), "truncated at {n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(DecodeError("bytes after the record")));
        assert!(decode(&[0x80]).is_err(), "unknown record flag");
        assert!(
            decode(&[APPROVED, 0, 0x80]).is_err(),
            "an attribute flag without its value"
        );
        assert!(decode(&[APPROVED, 1, 0, 7]).is_err(), "unknown file type");
        assert!(
            decode(&[
                EPOCH, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f
            ])
            .is_err()
        );
        assert!(decode(&[REPORTED, 2, 0xff, 0xfe]).is_err(), "not UTF-8");
    }

    fn attributes_strategy() -> impl Strategy<Value = FileAttributes> {
        let digest = prop_oneof![
            any::<[u8; 32]>().prop_map(|b| blake3::Hash::from_bytes(b).to_hex().to_string()),
            ".{0,70}",
        ];
        let time = (-62_000_000_000i64..250_000_000_000, 0i32..1_000_000)
            .prop_map(|(s, us)| MicroTime(Timestamp::new(s, us * 1000).unwrap()));
        (
            (
                proptest::option::of(0usize..TYPES.len()),
                proptest::option::of(digest.clone()),
                proptest::option::of(any::<u64>()),
                proptest::option::of("[0-7]{4}"),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(digest),
            ),
            (
                proptest::option::of(time.clone()),
                proptest::option::of(time),
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u64>()),
                proptest::option::of(".{0,40}"),
                proptest::option::of((".{0,10}", ".{0,10}", ".{0,10}", ".{0,10}")),
                proptest::option::of(".{0,40}"),
            ),
        )
            .prop_map(
                |(
                    (file_type, hash, size, mode, uid, gid, xattrs),
                    (mtime, ctime, inode, links, link_target, mount, unreadable),
                )| FileAttributes {
                    file_type: file_type.map(|i| TYPES[i]),
                    hash,
                    size,
                    mode,
                    uid,
                    gid,
                    xattrs,
                    mtime,
                    ctime,
                    inode,
                    links,
                    link_target,
                    mount: mount.map(|(mount_point, fs_type, source, root)| Mount {
                        mount_point,
                        fs_type,
                        source,
                        root,
                    }),
                    unreadable,
                    // Never in a baseline record (a change's only).
                    sha256: None,
                    sha256_missing: None,
                },
            )
    }

    proptest! {
        #[test]
        fn every_record_decodes_to_itself_and_agrees_with_its_json(
            approved in proptest::option::of(attributes_strategy()),
            reported in proptest::option::of(".{0,70}"),
            epoch in any::<u64>(),
        ) {
            let t = Tracked { approved, reported, epoch };
            let bytes = to_vec(&t);
            prop_assert_eq!(decode(&bytes).unwrap(), t.clone());
            // The same record as version 2 read it (times to the microsecond).
            let json: Tracked = serde_json::from_slice(&serde_json::to_vec(&t).unwrap()).unwrap();
            prop_assert_eq!(json, t);
        }
    }
}
