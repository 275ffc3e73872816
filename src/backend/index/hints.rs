//! Lookup hints: which names may hold a given CKA_LABEL or CKA_ID, so that a search by either
//! reads one small file and the candidates' own files instead of the whole store.
//!
//! A hint is a line `<hash> <k|o> <name> <check>`: 16 hex digits of the SHA-256 of the attribute
//! and its value, whether the name is a key or an object, the name, and 8 hex digits of the
//! line's own SHA-256 (a flipped bit is seen). The lines live in 256 bucket files
//! (`store.hint.00` to `store.hint.ff`, by the hash's first byte; a bucket nobody needed yet is
//! absent), appended with the directory's lock held whenever a key or object is written.
//!
//! **A superset, never the truth.** A hint is never taken back when its key is relabeled or
//! deleted: a lookup reads every candidate's file and keeps those that hold the value now. What
//! must hold is the other direction, every name that holds a value has its hint, and that is
//! what the directory's stamp vouches for (see the `keydir` module): a full check writes the
//! hints of every entry before it stamps, and a writer's change keeps the stamp only when its
//! hints were written.

use std::collections::{BTreeMap, HashSet};

use crate::backend::keydir::{KeyDir, KeyDirLock};
use crate::backend::{BackendError, LookupAttribute, Result};
use crate::encoding;

use super::{IndexedKey, IndexedObject};

/// The largest bucket read (a bucket holds about 1/256 of twice the entries).
const MAX_BUCKET: u64 = 64 * 1024 * 1024;

/// Whether a hint names a key or a stored object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A key pair (`IndexedKey`).
    Key,
    /// A stored object (`IndexedObject`).
    Object,
}

/// One hint: `name` may hold the value whose hash is `hash`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hint {
    hash: u64,
    kind: Kind,
    name: String,
}

/// The hash of an attribute's value, as hints keep it.
pub fn hash(attribute: LookupAttribute, value: &[u8]) -> u64 {
    use sha2::Digest;
    let tag: &[u8] = match attribute {
        LookupAttribute::Label => b"devicekey-hint label\0",
        LookupAttribute::Id => b"devicekey-hint id\0",
    };
    let digest = sha2::Sha256::new()
        .chain_update(tag)
        .chain_update(value)
        .finalize();
    u64::from_be_bytes(digest[..8].try_into().unwrap_or_default())
}

/// The bucket file of a hash.
fn bucket_file(hash: u64) -> String {
    format!("store.hint.{:02x}", hash >> 56)
}

/// True for the names of bucket files.
pub fn is_bucket_file(file: &str) -> bool {
    file.strip_prefix("store.hint.")
        .is_some_and(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()))
}

fn check_of(text: &[u8]) -> String {
    use sha2::Digest;
    encoding::hex(&sha2::Sha256::digest(text)[..4])
}

impl Hint {
    fn new(attribute: LookupAttribute, value: &[u8], kind: Kind, name: &str) -> Self {
        Self {
            hash: hash(attribute, value),
            kind,
            name: name.to_string(),
        }
    }

    /// The hints of a key: its label and its CKA_ID.
    pub fn of_key(key: &IndexedKey) -> [Hint; 2] {
        [
            Self::new(
                LookupAttribute::Label,
                key.label.as_bytes(),
                Kind::Key,
                &key.name,
            ),
            Self::new(LookupAttribute::Id, &key.id, Kind::Key, &key.name),
        ]
    }

    /// The hints of an object: its CKA_LABEL and CKA_ID, those it has.
    pub fn of_object(object: &IndexedObject) -> Vec<Hint> {
        object
            .attributes
            .iter()
            .filter_map(|(t, v)| {
                let attribute = LookupAttribute::of_type(*t)?;
                Some(Self::new(attribute, v, Kind::Object, &object.name))
            })
            .collect()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let kind = match self.kind {
            Kind::Key => 'k',
            Kind::Object => 'o',
        };
        let text = format!("{:016x} {kind} {}", self.hash, self.name);
        out.extend_from_slice(text.as_bytes());
        out.push(b' ');
        out.extend_from_slice(check_of(text.as_bytes()).as_bytes());
        out.push(b'\n');
    }

    /// Parses a whole line (newline excluded); `None` when it is damaged.
    fn parse(line: &[u8]) -> Option<Hint> {
        let at = line.iter().rposition(|b| *b == b' ')?;
        let (text, check) = (&line[..at], &line[at + 1..]);
        if check != check_of(text).as_bytes() {
            return None;
        }
        let text = std::str::from_utf8(text).ok()?;
        let mut parts = text.splitn(3, ' ');
        let hash = u64::from_str_radix(parts.next()?, 16).ok()?;
        let kind = match parts.next()? {
            "k" => Kind::Key,
            "o" => Kind::Object,
            _ => return None,
        };
        let name = parts.next()?.to_string();
        Some(Hint { hash, kind, name })
    }
}

/// The hints of a bucket file; `Err` when a line before the last is damaged (a torn last
/// line, from a writer killed mid-append, is left out).
fn parse_bucket(bytes: &[u8]) -> std::result::Result<Vec<Hint>, ()> {
    let mut out = Vec::with_capacity(bytes.len() / 60);
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        let Some(whole) = line.strip_suffix(b"\n") else {
            break;
        };
        out.push(Hint::parse(whole).ok_or(())?);
    }
    Ok(out)
}

/// Reads a bucket: its hints, `Some(empty)` when the bucket is absent, `None` when it is
/// damaged or refused (the caller rebuilds the hints). A torn last line is damage too: a lookup
/// trusts a bucket only while the stamp is valid, and an append of devicekey's is never torn
/// then (a lock holder clears the stamp before its first change and writes it again only when
/// the change is done), so a torn tail under a valid stamp was cut by something else.
fn read_bucket(dir: &KeyDir, file: &str) -> Result<Option<Vec<Hint>>> {
    match dir.read_limited(file, MAX_BUCKET)? {
        Some(bytes) if !bytes.is_empty() && !bytes.ends_with(b"\n") => Ok(None),
        Some(bytes) => Ok(parse_bucket(&bytes).ok()),
        // Absent, or refused by the key directory (a symlink, a wrong mode...).
        None if dir.exists(file)? => Ok(None),
        None => Ok(Some(Vec::new())),
    }
}

/// The names that may hold `value`; `None` when the bucket is damaged.
pub fn candidates(
    dir: &KeyDir,
    attribute: LookupAttribute,
    value: &[u8],
) -> Result<Option<Vec<(Kind, String)>>> {
    let h = hash(attribute, value);
    let Some(hints) = read_bucket(dir, &bucket_file(h))? else {
        return Ok(None);
    };
    let mut seen = HashSet::new();
    Ok(Some(
        hints
            .into_iter()
            .filter(|hint| hint.hash == h && seen.insert((hint.kind, hint.name.clone())))
            .map(|hint| (hint.kind, hint.name))
            .collect(),
    ))
}

/// The hints grouped by bucket file.
fn by_bucket<'a>(hints: impl IntoIterator<Item = &'a Hint>) -> BTreeMap<String, Vec<&'a Hint>> {
    let mut out: BTreeMap<String, Vec<&Hint>> = BTreeMap::new();
    for h in hints {
        out.entry(bucket_file(h.hash)).or_default().push(h);
    }
    out
}

fn encode_all<'a>(hints: impl IntoIterator<Item = &'a Hint>) -> Vec<u8> {
    let mut out = Vec::new();
    for h in hints {
        h.encode(&mut out);
    }
    out
}

/// Adds hints (call with the lock held, before the lock is released with the change they
/// describe). A hint the bucket already holds is not added again (a relabel keeps its CKA_ID's
/// hint; a label used again keeps its old one), so buckets grow with the values ever held, not
/// with the number of changes. A bucket with a torn last line is rewritten whole; a damaged one
/// is an error (the caller clears the stamp, and the next full check rebuilds it).
pub fn add(dir: &KeyDir, _lock: &KeyDirLock, hints: &[Hint]) -> Result<()> {
    for (file, hints) in by_bucket(hints) {
        let Some(bytes) = dir.read_limited(&file, MAX_BUCKET)? else {
            if dir.exists(&file)? {
                return Err(BackendError::Io(format!("{file} is refused")));
            }
            dir.write_atomic(&file, &encode_all(hints.iter().copied()))?;
            continue;
        };
        let held =
            parse_bucket(&bytes).map_err(|()| BackendError::Io(format!("{file} is damaged")))?;
        let known: HashSet<&Hint> = held.iter().collect();
        let mut new: Vec<&Hint> = hints.into_iter().filter(|h| !known.contains(h)).collect();
        new.dedup();
        if new.is_empty() {
            continue;
        }
        if bytes.ends_with(b"\n") {
            dir.append_line(&file, &encode_all(new.iter().copied()))?;
        } else {
            dir.write_atomic(&file, &encode_all(held.iter().chain(new.iter().copied())))?;
        }
    }
    Ok(())
}

/// Makes the buckets hold every hint of `all` (call with the lock held, in a full check): a
/// bucket that lacks one, is damaged, or holds mostly stale hints is rewritten with exactly its
/// share of `all`; a bucket with no share is removed.
pub fn rebuild(dir: &KeyDir, _lock: &KeyDirLock, all: &[Hint]) -> Result<usize> {
    let mut wanted = by_bucket(all);
    let mut rewritten = 0;
    for b in 0..=255u64 {
        let file = bucket_file(b << 56);
        let mut want: Vec<&Hint> = wanted.remove(&file).unwrap_or_default();
        want.sort();
        want.dedup();
        let have = read_bucket(dir, &file)?;
        if want.is_empty() {
            if !have.as_ref().is_some_and(Vec::is_empty) {
                match dir.remove(&file) {
                    Ok(()) | Err(BackendError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            continue;
        }
        let fine = have.is_some_and(|have| {
            let held: HashSet<&Hint> = have.iter().collect();
            want.iter().all(|h| held.contains(h)) && have.len() <= 2 * want.len() + 64
        });
        if !fine {
            dir.write_atomic(&file, &encode_all(want.iter().copied()))?;
            rewritten += 1;
        }
    }
    Ok(rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_any_flipped_bit_is_seen() {
        let hint = Hint::new(LookupAttribute::Label, b"a label", Kind::Key, "key-01");
        let mut line = Vec::new();
        hint.encode(&mut line);
        assert_eq!(parse_bucket(&line), Ok(vec![hint.clone()]));
        for at in 0..line.len() - 1 {
            let mut bad = line.clone();
            bad[at] ^= 0x01;
            assert!(
                Hint::parse(&bad[..bad.len() - 1]).is_none(),
                "byte {at} flipped"
            );
        }
        // A torn last line is left out, a damaged line before it makes the bucket unusable.
        let mut two = line.clone();
        two.extend_from_slice(&line[..20]);
        assert_eq!(parse_bucket(&two), Ok(vec![hint.clone()]));
        let mut bad = line.clone();
        bad[3] ^= 0x01;
        bad.extend_from_slice(&line);
        assert_eq!(parse_bucket(&bad), Err(()));
    }

    #[test]
    fn a_hint_is_added_once_a_torn_tail_is_mended_and_a_damaged_bucket_refused() {
        let (_tmp, path) = crate::test_support::scratch("keys");
        let dir = KeyDir::open(&path).unwrap();
        let lock = dir.lock().unwrap();
        let hint = Hint::new(LookupAttribute::Label, b"ssh", Kind::Key, "n1");
        let file = bucket_file(hint.hash);
        let bucket = || dir.read(&file).unwrap().unwrap().to_vec();
        add(&dir, &lock, std::slice::from_ref(&hint)).unwrap();
        add(&dir, &lock, &[hint.clone(), hint.clone()]).unwrap();
        assert_eq!(
            parse_bucket(&bucket()),
            Ok(vec![hint.clone()]),
            "added once"
        );
        let found = candidates(&dir, LookupAttribute::Label, b"ssh").unwrap();
        assert_eq!(found, Some(vec![(Kind::Key, "n1".to_string())]));
        // A writer killed mid-append: the next add rewrites the bucket without the torn line.
        let mut torn = bucket();
        torn.extend_from_slice(b"0123 k n");
        dir.write_atomic(&file, &torn).unwrap();
        let other = Hint {
            name: "n2".into(),
            ..hint.clone()
        };
        add(&dir, &lock, std::slice::from_ref(&other)).unwrap();
        assert_eq!(
            parse_bucket(&bucket()),
            Ok(vec![hint.clone(), other.clone()])
        );
        // A damaged line: refused, never rewritten with only the new hint.
        let mut bad = bucket();
        bad[2] ^= 0x01;
        dir.write_atomic(&file, &bad).unwrap();
        let third = Hint {
            name: "n3".into(),
            ..hint
        };
        assert!(add(&dir, &lock, &[third]).is_err());
        assert_eq!(bucket(), bad);
        assert_eq!(
            candidates(&dir, LookupAttribute::Label, b"ssh").unwrap(),
            None
        );
    }

    #[test]
    fn labels_and_ids_hash_apart() {
        assert_ne!(
            hash(LookupAttribute::Label, b"x"),
            hash(LookupAttribute::Id, b"x")
        );
        assert!(is_bucket_file(&bucket_file(hash(
            LookupAttribute::Id,
            b"x"
        ))));
        assert!(!is_bucket_file("store.index"));
    }
}
