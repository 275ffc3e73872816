//! The store index: one file per key directory (`store.index`) that lists every key and stored
//! object of the store with what the token needs to show them (name, CKA_ID, label, purpose,
//! public point; an object's attributes), so opening a store reads one file instead of parsing
//! every key file. A key file is read when its key first signs.
//!
//! **A cache, never the truth.** The key and object files are the truth. The index is an
//! append-only log of lines, each a JSON record, a space and a check (16 hex digits of the
//! record's SHA-256, so a flipped bit anywhere is seen): a header, then `key`/`obj` records (a new
//! or changed entry) and `del` records (an entry gone), written with the store's lock held.
//!
//! **When it is checked.** While the directory's stamp (see the `keydir` module) is valid,
//! nothing but devicekey changed the directory since the index last matched it, and a load reads
//! the index alone. Otherwise a load makes a full check under the lock: it compares the names in
//! the directory listing (one readdir, no file parsed) with the names the index holds, parses and
//! adds a file the index does not list, drops a listed file that is gone, rebuilds a missing or
//! damaged index, makes the lookup hints (the `hints` module) hold every entry, and stamps (best
//! effort: on a read-only file system the result stays in memory).
//!
//! **Lookups** by CKA_LABEL or CKA_ID read no index at all while the stamp is valid: one bucket
//! of hints names the candidates, and each candidate's own file is parsed and kept if it holds
//! the value.
//!
//! **The invariant that makes names enough.** Whenever a file's contents may differ from its
//! entry, the index does not list it: a change first appends `del <name>` (when the name is
//! listed), then writes the file, then appends the new entry. A crash anywhere in between
//! leaves a name the listing has and the index lacks, so the next load parses that one file.
//! A file changed in place by something other than devicekey is not seen this way; a key file
//! whose public point no longer matches its entry fails its first signature with the reason.
//!
//! A torn last line (a writer killed mid-append) is ignored, and the next append rewrites the
//! index instead of gluing a record to it. When the log holds many more records than entries it
//! is rewritten compactly (atomically).

mod hints;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::backend::keydir::{KeyDir, KeyDirLock};
use crate::backend::{
    BackendError, Found, KeyPurpose, KeyRecord, LookupAttribute, ObjectRecord, RawAttribute,
    Result, Signer,
};
use crate::encoding;
pub use hints::is_bucket_file;
use hints::{Hint, Kind};

/// The index file in a key directory.
pub const INDEX_FILE: &str = "store.index";
const FORMAT: &str = "devicekey-store-index";
const VERSION: u32 = 1;
/// The largest index read (about 4 million keys).
const MAX_INDEX: u64 = 1 << 30;
/// The log is rewritten when it holds more than this many records besides twice its entries.
const SLACK: usize = 256;

/// What the index keeps of a key pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedKey {
    /// The store's name of the key.
    #[serde(rename = "n")]
    pub name: String,
    /// CKA_ID.
    #[serde(rename = "i", with = "hex_bytes")]
    pub id: Vec<u8>,
    /// CKA_LABEL.
    #[serde(rename = "l")]
    pub label: String,
    /// What the key may be used for.
    #[serde(rename = "p")]
    pub purpose: KeyPurpose,
    /// SEC1 uncompressed public point.
    #[serde(rename = "q", with = "hex_point")]
    pub public_point: [u8; 65],
    /// Creation time (seconds since the Unix epoch; 0 when the store keeps none).
    #[serde(rename = "c", default)]
    pub created: u64,
    /// The key's TPM public area (marshalled TPMT_PUBLIC), for keys in a TPM.
    #[serde(
        rename = "t",
        default,
        skip_serializing_if = "Option::is_none",
        with = "hex_opt"
    )]
    pub tpm_public: Option<Vec<u8>>,
}

/// What the index keeps of a stored object: all of it (objects are small and few).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedObject {
    /// The store's name of the object.
    #[serde(rename = "n")]
    pub name: String,
    /// Creation time (seconds since the Unix epoch; 0 when the store keeps none).
    #[serde(rename = "c", default)]
    pub created: u64,
    /// The object's attributes.
    #[serde(rename = "a", with = "hex_attributes")]
    pub attributes: Vec<RawAttribute>,
}

impl IndexedKey {
    /// The entry of a key kept in a file (no TPM public area).
    pub fn new(
        name: &str,
        id: &[u8],
        label: &str,
        purpose: KeyPurpose,
        public_point: [u8; 65],
        created: u64,
    ) -> Self {
        Self {
            name: name.to_string(),
            id: id.to_vec(),
            label: label.to_string(),
            purpose,
            public_point,
            created,
            tpm_public: None,
        }
    }

    /// The persistent key this entry lists, signing with `signer`.
    pub fn to_record(&self, signer: Arc<dyn Signer>) -> KeyRecord {
        KeyRecord {
            name: self.name.clone(),
            id: self.id.clone(),
            label: self.label.clone(),
            public_point: self.public_point,
            purpose: self.purpose,
            persistent: true,
            signer,
        }
    }
}

impl IndexedKey {
    /// True when the key's label (or CKA_ID) is `value`.
    pub fn holds(&self, attribute: LookupAttribute, value: &[u8]) -> bool {
        match attribute {
            LookupAttribute::Label => self.label.as_bytes() == value,
            LookupAttribute::Id => self.id == value,
        }
    }
}

impl IndexedObject {
    /// True when the object's CKA_LABEL (or CKA_ID) is `value`.
    pub fn holds(&self, attribute: LookupAttribute, value: &[u8]) -> bool {
        self.attributes
            .iter()
            .any(|(t, v)| LookupAttribute::of_type(*t) == Some(attribute) && v == value)
    }

    /// The object as the token gets it.
    pub fn to_record(&self) -> ObjectRecord {
        ObjectRecord {
            name: self.name.clone(),
            attributes: self.attributes.clone(),
        }
    }

    /// An object entry.
    pub fn new(name: &str, created: u64, attributes: &[RawAttribute]) -> Self {
        Self {
            name: name.to_string(),
            created,
            attributes: attributes.to_vec(),
        }
    }
}

/// One line of the log after the header.
#[derive(Serialize, Deserialize)]
enum Record {
    #[serde(rename = "key")]
    Key(IndexedKey),
    #[serde(rename = "obj")]
    Object(IndexedObject),
    #[serde(rename = "del")]
    Removed(String),
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: Cow<'static, str>,
    version: u32,
}

/// One entry of the index.
#[derive(Clone, Debug)]
enum Entry {
    Key(IndexedKey),
    Object(IndexedObject),
}

impl Entry {
    fn record(&self) -> Record {
        match self {
            Entry::Key(k) => Record::Key(k.clone()),
            Entry::Object(o) => Record::Object(o.clone()),
        }
    }

    fn hints(&self) -> Vec<Hint> {
        match self {
            Entry::Key(k) => Hint::of_key(k).to_vec(),
            Entry::Object(o) => Hint::of_object(o),
        }
    }

    fn name(&self) -> &str {
        match self {
            Entry::Key(k) => &k.name,
            Entry::Object(o) => &o.name,
        }
    }

    fn sort_key(&self) -> (u64, &str) {
        match self {
            Entry::Key(k) => (k.created, &k.name),
            Entry::Object(o) => (o.created, &o.name),
        }
    }
}

/// How a store's files map to index entries. The index never opens a file itself except its
/// own: it asks the store to parse one when the listing shows a file the index lacks.
pub trait IndexedFiles {
    /// The key name of a directory entry, when it is a key file that commits a key.
    fn key_name<'a>(&self, file: &'a str) -> Option<&'a str>;
    /// The object name of a directory entry, when it is an object file.
    fn object_name<'a>(&self, file: &'a str) -> Option<&'a str>;
    /// Parses a key file; `None` when it is absent or damaged (the store logs why).
    fn parse_key(&self, name: &str) -> Result<Option<IndexedKey>>;
    /// Parses an object file; `None` when it is absent or damaged (the store logs why).
    fn parse_object(&self, name: &str) -> Result<Option<IndexedObject>>;
    /// How old a temporary file must be before a full check removes it (`None`: any, because
    /// every writer of the store holds the lock while its temporary file exists).
    fn stale_temp_age(&self) -> Option<Duration> {
        None
    }
}

/// Every key and object of a store, oldest first (ties by name).
#[derive(Clone, Debug, Default)]
pub struct Contents {
    /// The keys.
    pub keys: Vec<IndexedKey>,
    /// The objects.
    pub objects: Vec<IndexedObject>,
}

/// The index as read from its file.
struct Parsed {
    entries: HashMap<String, Entry>,
    /// Records in the file (header excluded).
    records: usize,
    /// False when the file is absent, has a bad header or a bad line before the last.
    usable: bool,
}

/// How many key files were parsed by this process (for tests and benchmarks: opening an indexed
/// store parses none).
static KEY_FILES_PARSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The number of key files parsed by this process so far (every store, every reason).
pub fn key_files_parsed() -> u64 {
    KEY_FILES_PARSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts one key file parse; the stores call it wherever they parse a key file.
pub fn count_key_file_parse(name: &str) {
    KEY_FILES_PARSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    log::trace!("parsing key file {name}");
}

/// The index of one key directory, with the last contents read (reused while the directory's
/// change marker stays the same, so `load_keys` and `load_objects` read the index once).
#[derive(Default)]
pub struct StoreIndex {
    last: Mutex<Option<(u128, Arc<Contents>)>>,
}

/// The check of a line's JSON: the first 8 bytes of its SHA-256, as 16 hex digits.
fn check_of(json: &[u8]) -> String {
    use sha2::Digest;
    encoding::hex(&sha2::Sha256::digest(json)[..8])
}

/// Writes one line: the record's JSON, a space, its check, a newline.
fn encode_line(record: &impl Serialize, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    serde_json::to_writer(&mut *out, record)
        .map_err(|e| BackendError::Io(format!("cannot encode an index record: {e}")))?;
    let check = check_of(&out[start..]);
    out.push(b' ');
    out.extend_from_slice(check.as_bytes());
    out.push(b'\n');
    Ok(())
}

/// The JSON of a whole line (newline included) whose check holds; `None` for a damaged line.
fn checked(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\n")?;
    let at = line.iter().rposition(|b| *b == b' ')?;
    let (json, check) = (&line[..at], &line[at + 1..]);
    (check == check_of(json).as_bytes()).then_some(json)
}

fn header() -> Header {
    Header {
        format: Cow::Borrowed(FORMAT),
        version: VERSION,
    }
}

fn parse(bytes: Option<&[u8]>) -> Parsed {
    let mut parsed = Parsed {
        entries: HashMap::new(),
        records: 0,
        usable: false,
    };
    let Some(bytes) = bytes else {
        return parsed;
    };
    // A key's line is about 300 bytes: size the table once instead of growing it.
    parsed.entries.reserve((bytes.len() / 256).min(1 << 20));
    let mut lines = bytes.split_inclusive(|b| *b == b'\n');
    let header = lines
        .next()
        .and_then(checked)
        .map(serde_json::from_slice::<Header>);
    match header {
        Some(Ok(h)) if h.format == FORMAT && h.version == VERSION => {}
        _ => return parsed,
    }
    for line in lines {
        let complete = line.ends_with(b"\n");
        let record = checked(line)
            .ok_or(())
            .and_then(|json| serde_json::from_slice::<Record>(json).map_err(drop));
        match record {
            Ok(Record::Key(k)) => {
                parsed.entries.insert(k.name.clone(), Entry::Key(k));
            }
            Ok(Record::Object(o)) => {
                parsed.entries.insert(o.name.clone(), Entry::Object(o));
            }
            Ok(Record::Removed(name)) => {
                parsed.entries.remove(&name);
            }
            // A torn last line: a writer was killed mid-append.
            Err(_) if !complete => break,
            // Damaged: nothing in it is trusted, the index is rebuilt from the files.
            Err(_) => {
                parsed.entries.clear();
                parsed.records = 0;
                return parsed;
            }
        }
        parsed.records += 1;
    }
    parsed.usable = true;
    parsed
}

impl Parsed {
    /// True when the log holds many more records than entries.
    fn needs_compaction(&self) -> bool {
        self.records > 2 * self.entries.len() + SLACK
    }
}

/// Reads and parses the index; a file that cannot be read counts as absent (it is rebuilt).
fn read(dir: &KeyDir) -> Parsed {
    match dir.read_limited(INDEX_FILE, MAX_INDEX) {
        Ok(bytes) => parse(bytes.as_ref().map(|b| b.as_slice())),
        Err(e) => {
            log::warn!("ignoring the index of {}: {e}", dir.path().display());
            parse(None)
        }
    }
}

/// The names of the key and object files the directory listing shows.
fn listed(dir: &KeyDir, files: &dyn IndexedFiles) -> Result<(HashSet<String>, HashSet<String>)> {
    let files_listed = dir.list()?;
    let mut keys = HashSet::with_capacity(files_listed.len());
    let mut objects = HashSet::new();
    for file in files_listed {
        if let Some(n) = files.key_name(&file) {
            keys.insert(n.to_string());
        } else if let Some(n) = files.object_name(&file) {
            objects.insert(n.to_string());
        }
    }
    Ok((keys, objects))
}

/// What the listing and the index disagree on.
struct Diff {
    unknown_keys: Vec<String>,
    unknown_objects: Vec<String>,
    gone: Vec<String>,
}

impl Diff {
    fn of(parsed: &Parsed, keys: &HashSet<String>, objects: &HashSet<String>) -> Diff {
        let has = |name: &String, want_key: bool| {
            matches!(
                (parsed.entries.get(name), want_key),
                (Some(Entry::Key(_)), true) | (Some(Entry::Object(_)), false)
            )
        };
        let mut unknown_keys: Vec<_> = keys.iter().filter(|n| !has(n, true)).cloned().collect();
        let mut unknown_objects: Vec<_> =
            objects.iter().filter(|n| !has(n, false)).cloned().collect();
        let mut gone: Vec<_> = parsed
            .entries
            .iter()
            .filter(|(n, e)| match e {
                Entry::Key(_) => !keys.contains(*n),
                Entry::Object(_) => !objects.contains(*n),
            })
            .map(|(n, _)| n.clone())
            .collect();
        unknown_keys.sort();
        unknown_objects.sort();
        gone.sort();
        Diff {
            unknown_keys,
            unknown_objects,
            gone,
        }
    }

    fn is_empty(&self) -> bool {
        self.unknown_keys.is_empty() && self.unknown_objects.is_empty() && self.gone.is_empty()
    }
}

fn contents(entries: HashMap<String, Entry>) -> Contents {
    let mut all: Vec<Entry> = entries.into_values().collect();
    all.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    let mut out = Contents::default();
    for e in all {
        match e {
            Entry::Key(k) => out.keys.push(k),
            Entry::Object(o) => out.objects.push(o),
        }
    }
    out
}

impl StoreIndex {
    /// Every key and object of the store in `dir`, from the index. While the directory's stamp
    /// is valid that is the index alone; otherwise a full check compares the index with the
    /// directory listing, repairs it from the files where they disagree, and stamps.
    pub fn load(&self, dir: &KeyDir, files: &dyn IndexedFiles) -> Result<Arc<Contents>> {
        self.load_with(dir, files, false)
    }

    /// [`Self::load`]; with `fresh`, not from what this process read last (whose marker may not
    /// have moved when a cache file was damaged in place).
    fn load_with(
        &self,
        dir: &KeyDir,
        files: &dyn IndexedFiles,
        fresh: bool,
    ) -> Result<Arc<Contents>> {
        let marker = dir.change_marker();
        if let (false, Ok(last)) = (fresh, self.last.lock()) {
            if let (Some(m), Some((at, c))) = (marker, last.as_ref()) {
                if *at == m {
                    return Ok(Arc::clone(c));
                }
            }
        }
        let trusted = dir
            .stamp_valid()
            .then(|| read(dir))
            .filter(|p| p.usable && !p.needs_compaction());
        let parsed = match trusted {
            Some(p) => p,
            None => self.check(dir, files)?,
        };
        let out = Arc::new(contents(parsed.entries));
        if let (Some(m), Ok(mut last)) = (marker, self.last.lock()) {
            *last = Some((m, Arc::clone(&out)));
        }
        Ok(out)
    }

    /// The stored objects, as [`Self::load`] lists them.
    pub fn load_objects(
        &self,
        dir: &KeyDir,
        files: &dyn IndexedFiles,
    ) -> Result<Vec<ObjectRecord>> {
        let contents = self.load(dir, files)?;
        Ok(contents
            .objects
            .iter()
            .map(IndexedObject::to_record)
            .collect())
    }

    /// The keys and objects whose CKA_LABEL (or CKA_ID) is `value`. While the stamp is valid,
    /// from the hints and the candidates' own files (the index is not read); otherwise from a
    /// full check, which also stamps for the next lookup.
    pub fn lookup(
        &self,
        dir: &KeyDir,
        files: &dyn IndexedFiles,
        attribute: LookupAttribute,
        value: &[u8],
    ) -> Result<(Vec<IndexedKey>, Vec<IndexedObject>)> {
        let candidates = match dir.stamp_valid() {
            true => hints::candidates(dir, attribute, value)?,
            false => None,
        };
        let Some(candidates) = candidates else {
            // A damaged bucket under a valid stamp: clear the stamp so the check below rebuilds
            // the hints now.
            let damaged = dir.stamp_valid();
            if damaged {
                log::warn!(
                    "the lookup hints of {} are damaged; rebuilding them",
                    dir.path().display()
                );
                dir.lock()?.taint();
            }
            let all = self.load_with(dir, files, damaged)?;
            let keys = all.keys.iter().filter(|k| k.holds(attribute, value));
            let objects = all.objects.iter().filter(|o| o.holds(attribute, value));
            return Ok((keys.cloned().collect(), objects.cloned().collect()));
        };
        let (mut keys, mut objects) = (Vec::new(), Vec::new());
        for (kind, name) in candidates {
            match kind {
                Kind::Key => keys.extend(files.parse_key(&name)?),
                Kind::Object => objects.extend(files.parse_object(&name)?),
            }
        }
        keys.retain(|k| k.holds(attribute, value));
        objects.retain(|o| o.holds(attribute, value));
        keys.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        objects.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        Ok((keys, objects))
    }

    /// [`Self::lookup`] as the token gets it: each key with its kept signer (or a new one from
    /// `make`).
    pub fn found(
        &self,
        dir: &KeyDir,
        files: &dyn IndexedFiles,
        signers: &SignerCache,
        make: impl Fn(&IndexedKey) -> Arc<dyn Signer>,
        (attribute, value): (LookupAttribute, &[u8]),
    ) -> Result<Found> {
        let (keys, objects) = self.lookup(dir, files, attribute, value)?;
        Ok(Found {
            keys: keys
                .iter()
                .map(|k| k.to_record(signers.get_or_make(&k.name, &k.public_point, || make(k))))
                .collect(),
            objects: objects.iter().map(IndexedObject::to_record).collect(),
        })
    }

    /// Builds the index when the directory has none (a new store, or one made before the
    /// index), so that the keys created from now on are recorded as they are made.
    pub fn create_if_missing(&self, dir: &KeyDir, files: &dyn IndexedFiles) -> Result<()> {
        if !dir.exists(INDEX_FILE)? {
            self.load(dir, files)?;
        }
        Ok(())
    }

    /// The full check, under the lock: reads the listing and the index (unless another process
    /// just stamped), parses the files the index lacks, writes the index back, makes the hints
    /// hold every entry, and vouches for the result so the lock's release stamps it. Without the
    /// lock (a read-only file system...) the listing and the files still give the right answer,
    /// and nothing is written.
    fn check(&self, dir: &KeyDir, files: &dyn IndexedFiles) -> Result<Parsed> {
        let lock = match dir.lock() {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!(
                    "cannot lock {} to check its index: {e}",
                    dir.path().display()
                );
                None
            }
        };
        if lock.is_some() && dir.stamp_valid() {
            let parsed = read(dir);
            if parsed.usable && !parsed.needs_compaction() {
                return Ok(parsed);
            }
        }
        if lock.is_some() {
            dir.remove_stale_temp_files(files.stale_temp_age());
        }
        if let (Some(lock), Some(mtime)) = (&lock, dir.mtime_ns()) {
            lock.vouch(mtime);
        }
        let (keys, objects) = listed(dir, files)?;
        let mut parsed = read(dir);
        let diff = Diff::of(&parsed, &keys, &objects);
        let mut added = Vec::new();
        for name in &diff.gone {
            parsed.entries.remove(name);
        }
        let keys_read = diff
            .unknown_keys
            .iter()
            .map(|n| Ok::<_, BackendError>((n, files.parse_key(n)?.map(Entry::Key))));
        let objects_read = diff
            .unknown_objects
            .iter()
            .map(|n| Ok::<_, BackendError>((n, files.parse_object(n)?.map(Entry::Object))));
        for read in keys_read.chain(objects_read) {
            let (name, entry): (&String, Option<Entry>) = read?;
            match entry {
                Some(e) => {
                    added.push(e.record());
                    parsed.entries.insert(name.clone(), e);
                }
                None => {
                    parsed.entries.remove(name);
                }
            }
        }
        if !diff.is_empty() {
            log::info!(
                "index of {}: {} new or changed file(s) parsed, {} gone{}",
                dir.path().display(),
                diff.unknown_keys.len() + diff.unknown_objects.len(),
                diff.gone.len(),
                if parsed.usable {
                    ""
                } else {
                    " (index rebuilt)"
                }
            );
        }
        let Some(lock) = lock else {
            return Ok(parsed);
        };
        let written = if !parsed.usable || parsed.needs_compaction() {
            rewrite(dir, &lock, &parsed.entries)
        } else if added.is_empty() && diff.gone.is_empty() {
            Ok(())
        } else {
            let gone = diff.gone.iter().map(|n| Record::Removed(n.clone()));
            let records: Vec<Record> = gone.chain(added).collect();
            append(dir, &lock, &records)
        };
        let all_hints: Vec<Hint> = parsed.entries.values().flat_map(Entry::hints).collect();
        let hinted = written.and_then(|()| hints::rebuild(dir, &lock, &all_hints));
        match hinted {
            Ok(n) if n > 0 => log::info!(
                "lookup hints of {}: {n} bucket(s) rewritten",
                dir.path().display()
            ),
            Ok(_) => {}
            Err(e) => {
                lock.taint();
                log::warn!(
                    "cannot write the index or hints of {} (the keys are listed anyway): {e}",
                    dir.path().display()
                );
            }
        }
        Ok(parsed)
    }

    /// Records a new or changed key. Call with the lock held, after its file is written.
    pub fn put_key(&self, dir: &KeyDir, lock: &KeyDirLock, key: IndexedKey) {
        put(dir, lock, Entry::Key(key));
    }

    /// Records a new or changed object. Call with the lock held, after its file is written.
    pub fn put_object(&self, dir: &KeyDir, lock: &KeyDirLock, object: IndexedObject) {
        put(dir, lock, Entry::Object(object));
    }

    /// Records that `name` is about to change: call with the lock held, before rewriting its
    /// file (so a crash in between leaves a name the index lacks), then [`Self::put_key`] or
    /// [`Self::put_object`] it. Until then the index lacks a name whose file is there, which
    /// only a full check finds, so the change stays open on the lock and no stamp vouches for
    /// the index meanwhile. Fails only when the index could neither be updated nor removed:
    /// then the caller must not change the file, or the index would list stale contents.
    pub fn forget(&self, dir: &KeyDir, lock: &KeyDirLock, name: &str) -> Result<()> {
        lock.open_change(name);
        let r = append(dir, lock, &[Record::Removed(name.to_string())]);
        r.or_else(|e| invalidate(dir, lock, &e))
    }

    /// Records that `name` is gone: call with the lock held, after removing its file. A
    /// failure is only logged: the file is gone, so a full check drops the name anyway.
    pub fn removed(&self, dir: &KeyDir, lock: &KeyDirLock, name: &str) {
        record(dir, lock, &Record::Removed(name.to_string()));
    }
}

/// Records an entry: its hints first, then its index record. A failure clears the stamp, so the
/// next lookup makes a full check instead of trusting what could not be written.
fn put(dir: &KeyDir, lock: &KeyDirLock, entry: Entry) {
    if let Err(e) = hints::add(dir, lock, &entry.hints()) {
        log::warn!(
            "cannot write the lookup hints of {}: {e}",
            dir.path().display()
        );
        lock.taint();
    }
    record(dir, lock, &entry.record());
    lock.close_change(entry.name());
}

/// A test hook for the crash tests: when `DEVICEKEY_TEST_CRASH_AT` names `point` (debug builds
/// only), the process aborts there, e.g. between a key file's write and its index record.
pub fn crash_point(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var_os("DEVICEKEY_TEST_CRASH_AT").is_some_and(|v| v == point) {
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

/// A kept signer and the public point it signs for.
type KeptSigner = ([u8; 65], Arc<dyn Signer>);

/// Signers of listed keys, kept across reloads by name and public point, so a key whose file
/// was read for its first signature is not read again after another process's change.
#[derive(Default)]
pub struct SignerCache {
    signers: Mutex<HashMap<String, KeptSigner>>,
}

impl SignerCache {
    /// The kept signer of `name` when it has this public point, else a new one from `make`.
    pub fn get_or_make(
        &self,
        name: &str,
        public_point: &[u8; 65],
        make: impl FnOnce() -> Arc<dyn Signer>,
    ) -> Arc<dyn Signer> {
        let Ok(mut signers) = self.signers.lock() else {
            return make();
        };
        match signers.get(name) {
            Some((point, signer)) if point == public_point => Arc::clone(signer),
            _ => {
                let signer = make();
                signers.insert(name.to_string(), (*public_point, Arc::clone(&signer)));
                signer
            }
        }
    }

    /// The records of `keys`, each with its kept signer (or a new one from `make`); signers of
    /// keys no longer listed (deleted by another process) are dropped.
    pub fn records(
        &self,
        keys: &[IndexedKey],
        make: impl Fn(&IndexedKey) -> Arc<dyn Signer>,
    ) -> Vec<KeyRecord> {
        let Ok(mut signers) = self.signers.lock() else {
            return keys.iter().map(|k| k.to_record(make(k))).collect();
        };
        let missing = keys.len().saturating_sub(signers.len());
        signers.reserve(missing);
        let records = keys
            .iter()
            .map(|k| {
                let signer = match signers.get(&k.name) {
                    Some((point, signer)) if *point == k.public_point => Arc::clone(signer),
                    _ => {
                        let signer = make(k);
                        signers.insert(k.name.clone(), (k.public_point, Arc::clone(&signer)));
                        signer
                    }
                };
                k.to_record(signer)
            })
            .collect();
        if signers.len() > keys.len() {
            let listed: HashSet<&str> = keys.iter().map(|k| k.name.as_str()).collect();
            signers.retain(|name, _| listed.contains(name.as_str()));
        }
        records
    }

    /// Drops the signer of a deleted key.
    pub fn forget(&self, name: &str) {
        if let Ok(mut signers) = self.signers.lock() {
            signers.remove(name);
        }
    }
}

/// Appends one record; on failure the index is removed (the next load rebuilds it).
fn record(dir: &KeyDir, lock: &KeyDirLock, record: &Record) {
    if let Err(e) = append(dir, lock, std::slice::from_ref(record)) {
        if let Err(e) = invalidate(dir, lock, &e) {
            log::warn!("{e}");
        }
    }
}

/// Removes the index after a failed write, so that no stale index survives, and clears the
/// stamp so the next load makes a full check.
fn invalidate(dir: &KeyDir, lock: &KeyDirLock, why: &BackendError) -> Result<()> {
    lock.taint();
    log::warn!(
        "cannot update the index of {} ({why}); removing it, the next load rebuilds it",
        dir.path().display()
    );
    match dir.remove(INDEX_FILE) {
        Ok(()) | Err(BackendError::NotFound(_)) => Ok(()),
        Err(e) => Err(BackendError::Io(format!(
            "cannot update or remove the index of {}: {e}",
            dir.path().display()
        ))),
    }
}

/// Appends records to an existing index. An absent index is left absent (the next load builds
/// it whole); a torn last line is never appended to (the append fails, so the index goes).
fn append(dir: &KeyDir, _lock: &KeyDirLock, records: &[Record]) -> Result<()> {
    let mut bytes = Vec::with_capacity(256 * records.len());
    for r in records {
        encode_line(r, &mut bytes)?;
    }
    dir.append_line(INDEX_FILE, &bytes)
}

/// Writes the whole index atomically.
fn rewrite(dir: &KeyDir, _lock: &KeyDirLock, entries: &HashMap<String, Entry>) -> Result<()> {
    let mut bytes = Vec::with_capacity(64 + 320 * entries.len());
    encode_line(&header(), &mut bytes)?;
    let mut all: Vec<&Entry> = entries.values().collect();
    all.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    for e in all {
        encode_line(&e.record(), &mut bytes)?;
    }
    dir.write_atomic(INDEX_FILE, &bytes)
}

fn hex_str<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u8>, D::Error> {
    let text = Cow::<str>::deserialize(d)?;
    encoding::hex_decode(&text).ok_or_else(|| serde::de::Error::custom("invalid hex"))
}

mod hex_bytes {
    use super::*;
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&encoding::hex(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u8>, D::Error> {
        hex_str(d)
    }
}

mod hex_point {
    use super::*;
    pub fn serialize<S: Serializer>(v: &[u8; 65], s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&encoding::hex(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<[u8; 65], D::Error> {
        let text = Cow::<str>::deserialize(d)?;
        let mut point = [0u8; 65];
        match encoding::hex_decode_into(text.as_bytes(), &mut point) {
            true if point[0] == 4 => Ok(point),
            _ => Err(serde::de::Error::custom("not a 65-byte SEC1 point")),
        }
    }
}

mod hex_opt {
    use super::*;
    pub fn serialize<S: Serializer>(
        v: &Option<Vec<u8>>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&encoding::hex(v)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Option<Vec<u8>>, D::Error> {
        hex_str(d).map(Some)
    }
}

mod hex_attributes {
    use super::*;
    pub fn serialize<S: Serializer>(
        v: &[RawAttribute],
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(t, v)| (*t, encoding::hex(v))))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Vec<RawAttribute>, D::Error> {
        let pairs = Vec::<(u64, Cow<str>)>::deserialize(d)?;
        pairs
            .into_iter()
            .map(|(t, v)| {
                encoding::hex_decode(&v)
                    .map(|v| (t, v))
                    .ok_or_else(|| serde::de::Error::custom("invalid hex"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, created: u64) -> IndexedKey {
        IndexedKey {
            name: name.to_string(),
            id: vec![1, 2],
            label: "l \"quoted\" and spaced".into(),
            purpose: KeyPurpose::Proof,
            public_point: [4; 65],
            created,
            tpm_public: None,
        }
    }

    fn log_of(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_line(&header(), &mut out).unwrap();
        for r in records {
            encode_line(r, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn records_replay_oldest_first_and_a_torn_tail_is_ignored() {
        let log = log_of(&[
            Record::Key(key("b", 2)),
            Record::Key(key("a", 2)),
            Record::Key(key("c", 1)),
            Record::Object(IndexedObject::new("o", 0, &[(1, vec![9])])),
            Record::Removed("c".into()),
            Record::Key(key("d", 3)),
        ]);
        let parsed = parse(Some(&log));
        assert!(parsed.usable);
        assert_eq!(parsed.records, 6);
        let c = contents(parsed.entries);
        let names: Vec<_> = c.keys.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "d"], "oldest first, ties by name");
        assert_eq!(c.keys[0], key("a", 2));
        assert_eq!(c.objects[0].attributes, vec![(1, vec![9])]);
        // The last record torn anywhere: dropped, the rest kept.
        for cut in 1..40 {
            let parsed = parse(Some(&log[..log.len() - cut]));
            assert!(parsed.usable, "cut {cut}");
            let names: Vec<_> = contents(parsed.entries)
                .keys
                .iter()
                .map(|k| k.name.clone())
                .collect();
            assert_eq!(names, ["a", "b"], "cut {cut}");
        }
    }

    #[test]
    fn any_changed_byte_makes_the_index_unusable() {
        let log = log_of(&[Record::Key(key("a", 1)), Record::Key(key("b", 1))]);
        let second_line = log.iter().position(|b| *b == b'\n').unwrap() + 1;
        let last_line = log.len()
            - 1
            - log[..log.len() - 1]
                .iter()
                .rev()
                .position(|b| *b == b'\n')
                .unwrap();
        // Every byte but those of the last line (a damaged last line is a torn append).
        for at in (0..last_line).filter(|i| log[*i] != b'\n') {
            let mut bad = log.clone();
            bad[at] ^= 0x01;
            let parsed = parse(Some(&bad));
            assert!(
                !parsed.usable && parsed.entries.is_empty(),
                "byte {at} (line starting at {second_line})"
            );
        }
    }
}
