//! The baseline's digest, published in the cluster: a homomorphic multiset
//! hash (LtHash: 1024 lanes of 16 bits, added modulo 2^16, of a BLAKE3 XOF of
//! each record) kept up to date record by record as changes are written, so
//! a save costs what it changes, not the size of the baseline; and the digest
//! of one file's state, to remember what was reported.

use std::sync::LazyLock;

use kube_fim_crds::FileAttributes;

pub(super) const TAG_FILE: u8 = b'f';

pub(super) const TAG_ESTABLISHED: u8 = b'e';

pub(super) const TAG_POLICY: u8 = b'p';

/// The multiset hash of the records (LtHash with 16-bit lanes): adding and
/// removing a record costs one BLAKE3 XOF, whatever the size of the set, and
/// the order records were written in does not matter. XOR or a single 256-bit
/// sum would let an attacker balance a forged record with chosen others.
#[derive(Clone, PartialEq, Eq)]
pub struct SetHash(Box<[u16; SetHash::LANES]>);

impl SetHash {
    const LANES: usize = 1024;

    /// The hash of the empty set.
    pub fn zero() -> Self {
        SetHash(Box::new([0; Self::LANES]))
    }

    /// On the stack (one element per record written or verified: no
    /// allocation), from a hasher whose key was derived once.
    fn element(tag: u8, key: &[u8], value: &[u8]) -> [u8; 2 * SetHash::LANES] {
        static RECORDS: LazyLock<blake3::Hasher> =
            LazyLock::new(|| blake3::Hasher::new_derive_key("kube-fim baseline record v2"));
        let mut h = RECORDS.clone();
        h.update(&[tag]);
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key);
        h.update(value);
        let mut out = [0u8; 2 * Self::LANES];
        h.finalize_xof().fill(&mut out);
        out
    }

    /// Adds the element (`tag`, `key`, `value`); `tag` separates the kinds
    /// of elements.
    pub fn add(&mut self, tag: u8, key: &str, value: &[u8]) {
        self.add_bytes(tag, key.as_bytes(), value);
    }

    pub(super) fn add_bytes(&mut self, tag: u8, key: &[u8], value: &[u8]) {
        let e = Self::element(tag, key, value);
        for (lane, b) in self.0.iter_mut().zip(e.chunks_exact(2)) {
            *lane = lane.wrapping_add(u16::from_le_bytes([b[0], b[1]]));
        }
    }

    /// Removes an element added before.
    pub fn remove(&mut self, tag: u8, key: &str, value: &[u8]) {
        let e = Self::element(tag, key.as_bytes(), value);
        for (lane, b) in self.0.iter_mut().zip(e.chunks_exact(2)) {
            *lane = lane.wrapping_sub(u16::from_le_bytes([b[0], b[1]]));
        }
    }

    /// Adds every element of `other` (the hash of the union of two sets).
    pub(super) fn combine(&mut self, other: &SetHash) {
        for (lane, o) in self.0.iter_mut().zip(other.0.iter()) {
            *lane = lane.wrapping_add(*o);
        }
    }

    pub(super) fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|l| l.to_le_bytes()).collect()
    }

    pub(super) fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 2 * Self::LANES {
            return None;
        }
        let mut s = Self::zero();
        for (lane, c) in s.0.iter_mut().zip(b.chunks_exact(2)) {
            *lane = u16::from_le_bytes([c[0], c[1]]);
        }
        Some(s)
    }

    /// BLAKE3 of the lanes, in hex (the baseline's: the digest published in
    /// the cluster).
    pub fn digest(&self) -> String {
        blake3::hash(&self.to_bytes()).to_hex().to_string()
    }
}

/// Digest of a file state, to remember what was reported.
pub fn state_digest(attrs: Option<&FileAttributes>) -> String {
    match attrs {
        None => "absent".into(),
        Some(a) => blake3::hash(&serde_json::to_vec(a).unwrap_or_default())
            .to_hex()
            .to_string(),
    }
}
