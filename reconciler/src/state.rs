//! The state database (SQLite under `--state-dir`): the inventory of owned resources
//! with their last-applied spec, the operation journal (intent before a side effect,
//! done after), and events. Plus the apply lock (flock on `<state-dir>/lock`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use stead_schema::{Kind, Metadata, Origin, Resource, ResourceId, Spec};

/// State database errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// SQLite failed.
    #[error("state database {path}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// File-system error.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the apply lock.
    #[error(
        "another stead process holds the lock on {0} (an apply, destroy or controller is running); waited {1:?}"
    )]
    Locked(PathBuf, Duration),
    /// A stored row could not be decoded.
    #[error("corrupt inventory row {0}: {1}")]
    Corrupt(String, String),
}

/// WAL pages after which a commit checkpoints them into `stead.db` (SQLite's default is
/// 1,000): the WAL is no longer checkpointed at every close, and each open reads back what
/// it holds, so it is kept short.
pub const WAL_CHECKPOINT_PAGES: i64 = 256;

/// Bytes the WAL file is truncated to after a checkpoint (a large apply can grow it).
pub const WAL_SIZE_LIMIT: i64 = 4 << 20;

/// Seconds since the epoch.
pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One owned resource as last applied.
#[derive(Debug, Clone)]
pub struct InventoryEntry {
    /// Hash of spec + labels when applied.
    pub spec_hash: String,
    /// The resource as last applied (origin is empty).
    pub resource: Resource,
    /// When it was applied (seconds since the epoch).
    pub applied_at: f64,
    /// False for a resource known only from an open journal entry: a step changed the
    /// host for it but its inventory row was never written.
    pub recorded: bool,
    /// The object existed before stead and was adopted: its `deletionPolicy` defaults
    /// to `Retain` (a prune keeps it unless the manifest said `Delete`).
    pub adopted: bool,
}

/// An event for `stead get` and the controller.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Seconds since the epoch.
    pub ts: f64,
    /// Resource (`Kind/name`) or empty.
    pub resource: String,
    /// Normal or Warning.
    pub level: String,
    /// Short reason (Created, Updated, Deleted, Failed, Drift…).
    pub reason: String,
    /// Message.
    pub message: String,
}

/// The state database.
pub struct StateDb {
    conn: Connection,
    path: PathBuf,
}

/// Mode of a state dir (and of missing parents) that stead creates: traversable but not
/// listable by others, so an unprivileged container's root (a host uid of its own) can
/// reach its rootfs below it; every file in it is 0600 and every other dir 0700.
pub const STATE_DIR_MODE: u32 = 0o711;

/// Creates `state_dir` and any missing parents with [`STATE_DIR_MODE`], whatever the
/// umask. An existing directory is left as it is.
pub fn ensure_state_dir(state_dir: &Path) -> Result<(), StateError> {
    stead_host::fs::create_missing_dirs(state_dir, STATE_DIR_MODE).map_err(|e| StateError::Io {
        context: format!("cannot create state dir {}", state_dir.display()),
        source: e.source,
    })
}

/// `(kind, name)` of every owned resource, read from `<state_dir>/stead.db` opened
/// read-only (nothing is created or migrated; shell completion uses it). `Ok(empty)` when
/// there is no DB.
pub fn inventory_names_read_only(state_dir: &Path) -> Result<Vec<(String, String)>, StateError> {
    let path = state_dir.join("stead.db");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let db = |source| StateError::Db {
        path: path.clone(),
        source,
    };
    let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(db)?;
    let mut stmt = conn
        .prepare("SELECT kind, name FROM inventory ORDER BY kind, name")
        .map_err(db)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(db)?;
    rows.collect::<Result<_, _>>().map_err(db)
}

impl StateDb {
    /// Opens (and creates) `<state_dir>/stead.db`.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        ensure_state_dir(state_dir)?;
        let path = state_dir.join("stead.db");
        let db = |source| StateError::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(db)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
        // Every commit is durable in the WAL (synchronous=FULL). A checkpoint only copies
        // committed pages into stead.db, so closing without one loses nothing: the next
        // open (or a crash recovery) reads them back from the WAL. A short-lived CLI used
        // to checkpoint and delete the WAL at every exit (2 fsyncs) and create it again
        // at the next write (header and directory fsyncs); now the WAL stays and the
        // auto-checkpoint below bounds it (and what the next open reads back).
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .map_err(db)?;
        // Per connection: durable commits, the WAL's bounds.
        conn.execute_batch(&format!(
            "PRAGMA synchronous=FULL;
             PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES};
             PRAGMA journal_size_limit={WAL_SIZE_LIMIT};"
        ))
        .map_err(db)?;
        // The schema is created (or brought up to date) only when the file's
        // `user_version` says so, not re-parsed at every open; later migrations bump
        // the version.
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db)?;
        if version != SCHEMA_VERSION {
            create_schema(&conn).map_err(db)?;
        }
        Ok(StateDb { conn, path })
    }

    fn err(&self, source: rusqlite::Error) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// Every row of `sql`, each mapped by `f`.
    fn rows<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StateError> {
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        let rows = stmt.query_map(params, f).map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Runs `f` in one transaction: all of its writes land together or none does (one
    /// fsync instead of one per statement).
    pub fn atomically(
        &self,
        f: &dyn Fn(&StateDb) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        f(self)?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Every owned resource.
    pub fn inventory(&self) -> Result<BTreeMap<ResourceId, InventoryEntry>, StateError> {
        let rows = self.rows(
            "SELECT kind, name, spec_hash, spec, metadata, applied_at FROM inventory",
            [],
            |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, f64>(5)?,
                ))
            },
        )?;
        let adopted = self.adopted()?;
        let mut out = BTreeMap::new();
        for (kind, name, spec_hash, spec, metadata, applied_at) in rows {
            let resource = decode_resource(&kind, name, &spec, &metadata)?;
            out.insert(
                resource.id.clone(),
                InventoryEntry {
                    spec_hash,
                    adopted: adopted.contains(&resource.id),
                    resource,
                    applied_at,
                    recorded: true,
                },
            );
        }
        Ok(out)
    }

    /// The ids whose objects were adopted (existed before stead took them over).
    pub fn adopted(&self) -> Result<BTreeSet<ResourceId>, StateError> {
        let rows = self.rows("SELECT kind, name FROM adopted", [], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(kind, name)| {
                let kind = kind.parse::<Kind>().ok()?;
                Some(ResourceId::new(kind, name))
            })
            .collect())
    }

    /// Remembers that the object of `id` was adopted. Written with the adoption's
    /// intent, so an adoption interrupted before its inventory row still counts.
    pub fn mark_adopted(&self, id: &ResourceId) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO adopted (kind, name, ts) VALUES (?1, ?2, ?3)",
                params![id.kind.as_str(), id.name, now_secs()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records `r` as applied.
    pub fn upsert(&self, r: &Resource) -> Result<(), StateError> {
        let spec = serde_json::to_string(&r.spec).unwrap_or_default();
        let metadata = serde_json::to_string(&r.metadata).unwrap_or_default();
        self.conn
            .execute(
                "INSERT INTO inventory (kind, name, spec_hash, spec, metadata, applied_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(kind, name) DO UPDATE SET spec_hash=?3, spec=?4, metadata=?5, applied_at=?6",
                params![r.id.kind.as_str(), r.id.name, r.spec_hash(), spec, metadata, now_secs()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Forgets `id` (and that it was adopted).
    pub fn remove(&self, id: &ResourceId) -> Result<(), StateError> {
        for table in ["inventory", "adopted"] {
            self.conn
                .execute(
                    &format!("DELETE FROM {table} WHERE kind=?1 AND name=?2"),
                    params![id.kind.as_str(), id.name],
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Writes an intent before a side effect on `r`, with `r` itself (spec and
    /// metadata), so that an object made by a step whose inventory write never happened
    /// can still be found and pruned by the next plan. Durable when it returns
    /// (`synchronous=FULL`): the caller must not touch the host if it fails.
    pub fn journal_intent(&self, r: &Resource, action: &str) -> Result<i64, StateError> {
        let resource = serde_json::json!({"spec": &r.spec, "metadata": &r.metadata}).to_string();
        self.conn
            .execute(
                "INSERT INTO journal (ts, kind, name, action, state, resource)
                 VALUES (?1, ?2, ?3, ?4, 'open', ?5)",
                params![now_secs(), r.id.kind.as_str(), r.id.name, action, resource],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// The resources of open journal entries that carry one (the newest entry per id).
    /// Entries written before resources were journaled, or that fail to decode, are
    /// left out: their ids are still in [`Self::journal_open`].
    pub fn journal_open_resources(&self) -> Result<BTreeMap<ResourceId, Resource>, StateError> {
        let rows = self.rows(
            "SELECT kind, name, resource FROM journal
             WHERE state='open' AND resource IS NOT NULL ORDER BY id",
            [],
            three_strings,
        )?;
        let mut out = BTreeMap::new();
        for (kind, name, resource) in rows {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&resource) else {
                continue;
            };
            let (spec, metadata) = (v["spec"].to_string(), v["metadata"].to_string());
            if let Ok(r) = decode_resource(&kind, name, &spec, &metadata) {
                out.insert(r.id.clone(), r);
            }
        }
        Ok(out)
    }

    /// Writes an intent before a side effect; returns the entry id.
    pub fn journal_begin(&self, id: &ResourceId, action: &str) -> Result<i64, StateError> {
        self.conn
            .execute(
                "INSERT INTO journal (ts, kind, name, action, state) VALUES (?1, ?2, ?3, ?4, 'open')",
                params![now_secs(), id.kind.as_str(), id.name, action],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Closes every open entry of `id` (the step finished, or a later run repaired it).
    pub fn journal_close(&self, id: &ResourceId, error: Option<&str>) -> Result<(), StateError> {
        let state = if error.is_some() { "failed" } else { "done" };
        self.conn
            .execute(
                "UPDATE journal SET state=?1, error=?2 WHERE kind=?3 AND name=?4 AND state='open'",
                params![state, error, id.kind.as_str(), id.name],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records `error` on the open entries of `id`, leaving them open (the step failed
    /// after its intent; what it did on the host is repaired by the next plan).
    pub fn journal_note_error(&self, id: &ResourceId, error: &str) -> Result<(), StateError> {
        self.conn
            .execute(
                "UPDATE journal SET error=?1 WHERE kind=?2 AND name=?3 AND state='open'",
                params![error, id.kind.as_str(), id.name],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The `(state, error)` of the newest journal entry of `id`.
    pub fn journal_last(
        &self,
        id: &ResourceId,
    ) -> Result<Option<(String, Option<String>)>, StateError> {
        self.conn
            .query_row(
                "SELECT state, error FROM journal WHERE kind=?1 AND name=?2 ORDER BY id DESC LIMIT 1",
                params![id.kind.as_str(), id.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Resources with an open journal entry: a previous run was interrupted while
    /// changing them. Objects found on the host for these ids are stead's own.
    pub fn journal_open(&self) -> Result<BTreeMap<ResourceId, String>, StateError> {
        let rows = self.rows(
            "SELECT kind, name, action FROM journal WHERE state='open' ORDER BY id",
            [],
            three_strings,
        )?;
        let mut out = BTreeMap::new();
        for (k, n, a) in rows {
            if let Ok(kind) = k.parse::<Kind>() {
                out.insert(ResourceId::new(kind, n), a);
            }
        }
        Ok(out)
    }

    /// Appends an event (the newest 10,000 are kept).
    pub fn event(
        &self,
        resource: &str,
        level: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO events (ts, resource, level, reason, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![now_secs(), resource, level, reason, message],
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - 10000",
                [],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The newest `limit` events, optionally of one resource, oldest first.
    pub fn events(&self, resource: Option<&str>, limit: usize) -> Result<Vec<Event>, StateError> {
        let mut out = self.rows(
            "SELECT ts, resource, level, reason, message FROM events
             WHERE (?1 IS NULL OR resource = ?1) ORDER BY id DESC LIMIT ?2",
            params![resource, limit as i64],
            |r| {
                Ok(Event {
                    ts: r.get(0)?,
                    resource: r.get(1)?,
                    level: r.get(2)?,
                    reason: r.get(3)?,
                    message: r.get(4)?,
                })
            },
        )?;
        out.reverse();
        Ok(out)
    }

    /// Reads a small key/value setting.
    pub fn get_kv(&self, key: &str) -> Result<Option<String>, StateError> {
        self.conn
            .query_row("SELECT value FROM kv WHERE key=?1", params![key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Writes a small key/value setting.
    pub fn set_kv(&self, key: &str, value: &str) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value=?2",
                params![key, value],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// Adds the `resource` column to a journal made by an older stead.
/// The first three columns of a row, as text.
fn three_strings(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The state DB's schema version, kept in `PRAGMA user_version`: the tables of
/// [`SCHEMA`] with the journal's `resource` column. 0 is a file created before the
/// version was recorded (or a new one).
const SCHEMA_VERSION: i64 = 1;

/// The state DB's tables (each created only when missing).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS inventory (
        kind TEXT NOT NULL, name TEXT NOT NULL,
        spec_hash TEXT NOT NULL, spec TEXT NOT NULL, metadata TEXT NOT NULL,
        applied_at REAL NOT NULL,
        PRIMARY KEY (kind, name));
    CREATE TABLE IF NOT EXISTS journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
        action TEXT NOT NULL, state TEXT NOT NULL, error TEXT);
    CREATE INDEX IF NOT EXISTS journal_open ON journal(state);
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL, resource TEXT NOT NULL, level TEXT NOT NULL,
        reason TEXT NOT NULL, message TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS adopted (
        kind TEXT NOT NULL, name TEXT NOT NULL, ts REAL NOT NULL,
        PRIMARY KEY (kind, name));";

/// Creates the tables of a new state DB, or brings an older one up to
/// [`SCHEMA_VERSION`], in one write transaction: of two processes opening a new DB at
/// once, the second finds the work done. A DB of a newer stead (a higher version) is
/// left as it is.
fn create_schema(conn: &Connection) -> Result<(), rusqlite::Error> {
    // Outside the transaction (the journal mode cannot change inside one); it is
    // recorded in the file, so later opens need not set it.
    set_wal(conn)?;
    // Rolled back when dropped uncommitted (an error below).
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < SCHEMA_VERSION {
        tx.execute_batch(SCHEMA)?;
        add_journal_resource_column(&tx)?;
        tx.execute_batch(&format!("PRAGMA user_version={SCHEMA_VERSION};"))?;
    }
    tx.commit()
}

/// Switches the DB to WAL. SQLite answers a switch that meets another connection's lock
/// with SQLITE_BUSY at once, without the busy handler (seen with four first opens at once:
/// 19 of 300 runs failed), so the switch is retried here for up to the busy timeout.
fn set_wal(conn: &Connection) -> Result<(), rusqlite::Error> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)) {
            Ok(_) => return Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

fn add_journal_resource_column(conn: &Connection) -> Result<(), rusqlite::Error> {
    let has: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('journal') WHERE name='resource'")?
        .exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE journal ADD COLUMN resource TEXT")?;
    }
    Ok(())
}

/// Decodes a stored resource (kind, name, spec JSON, metadata JSON).
fn decode_resource(
    kind: &str,
    name: String,
    spec: &str,
    metadata: &str,
) -> Result<Resource, StateError> {
    let key = format!("{kind}/{name}");
    let corrupt = |e: String| StateError::Corrupt(key.clone(), e);
    let kind: Kind = kind
        .parse()
        .map_err(|e: stead_schema::ValueError| corrupt(e.0))?;
    let spec: serde_json::Value = serde_json::from_str(spec).map_err(|e| corrupt(e.to_string()))?;
    let spec = Spec::from_value(kind, spec).map_err(|e| corrupt(e.to_string()))?;
    let metadata: Metadata = serde_json::from_str(metadata).map_err(|e| corrupt(e.to_string()))?;
    Ok(Resource {
        id: ResourceId::new(kind, name),
        metadata,
        spec,
        origin: Origin::default(),
    })
}

/// Ids with open journal entries (helper for planning).
pub fn pending_ids(db: &StateDb) -> Result<BTreeSet<ResourceId>, StateError> {
    Ok(db.journal_open()?.into_keys().collect())
}

/// The exclusive apply lock on `<state_dir>/lock`, released on drop (or process death).
pub struct ApplyLock {
    /// The open lock file: its `flock` is released when it is closed.
    _lock: File,
}

impl ApplyLock {
    /// Takes the lock, waiting up to `wait` (zero: fail at once).
    pub fn acquire(state_dir: &Path, wait: Duration) -> Result<Self, StateError> {
        ensure_state_dir(state_dir)?;
        let path = state_dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StateError::Io {
                context: format!("cannot open {}", path.display()),
                source: e,
            })?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(ApplyLock { _lock: file }),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if start.elapsed() >= wait {
                        return Err(StateError::Locked(path, start.elapsed()));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(StateError::Io {
                        context: format!("cannot lock {}", path.display()),
                        source: e,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_of_an_older_db_gains_the_resource_column() {
        let dir = tempfile::tempdir().unwrap();
        let old = Connection::open(dir.path().join("stead.db")).unwrap();
        old.execute_batch(
            "CREATE TABLE journal (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
             kind TEXT NOT NULL, name TEXT NOT NULL, action TEXT NOT NULL, state TEXT NOT NULL,
             error TEXT);
             INSERT INTO journal (ts, kind, name, action, state) VALUES (1, 'Network', 'a', 'create', 'open');",
        )
        .unwrap();
        drop(old);
        let db = StateDb::open(dir.path()).unwrap();
        let id = ResourceId::new(Kind::Network, "a");
        assert!(db.journal_open().unwrap().contains_key(&id));
        assert!(db.journal_open_resources().unwrap().is_empty());
        assert_eq!(user_version(&db), SCHEMA_VERSION);
        let sync: i64 = db
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            sync, 2,
            "synchronous=FULL: a journal entry is durable when written"
        );
    }

    fn user_version(db: &StateDb) -> i64 {
        db.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    /// A new DB gets the schema, WAL mode and the schema version; an open of a DB at
    /// that version runs no DDL (a table dropped behind its back stays missing); one at
    /// version 0 (an older stead's) gets the tables again.
    #[test]
    fn the_schema_is_created_once_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(user_version(&db), SCHEMA_VERSION);
        let mode: String = db
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        db.conn.execute_batch("DROP TABLE adopted;").unwrap();
        drop(db);
        let db = StateDb::open(dir.path()).unwrap();
        let has = |db: &StateDb| {
            db.conn
                .prepare("SELECT 1 FROM sqlite_master WHERE name='adopted'")
                .unwrap()
                .exists([])
                .unwrap()
        };
        assert!(!has(&db), "no DDL at the current version");
        db.conn.execute_batch("PRAGMA user_version=0;").unwrap();
        drop(db);
        let db = StateDb::open(dir.path()).unwrap();
        assert!(has(&db), "an older DB is brought up to date");
        assert_eq!(user_version(&db), SCHEMA_VERSION);
    }

    /// Processes opening a new state DB at once all get it with its schema.
    #[test]
    fn concurrent_first_opens_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            let opens: Vec<_> = (0..4)
                .map(|_| s.spawn(|| StateDb::open(dir.path()).map(|db| user_version(&db))))
                .collect();
            for o in opens {
                assert_eq!(o.join().unwrap().unwrap(), SCHEMA_VERSION);
            }
        });
    }

    #[test]
    fn close_leaves_commits_in_the_wal_and_a_fresh_open_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("stead.db-wal");
        {
            let db = StateDb::open(dir.path()).unwrap();
            db.set_kv("k", "v").unwrap();
        }
        // No checkpoint and no delete at close: the commit is still in the WAL.
        let len = std::fs::metadata(&wal).expect("WAL kept after close").len();
        assert!(len > 0, "WAL holds the commit");
        // As after a crash: only stead.db and its WAL, no shared-memory index.
        let copy = tempfile::tempdir().unwrap();
        for f in ["stead.db", "stead.db-wal"] {
            std::fs::copy(dir.path().join(f), copy.path().join(f)).unwrap();
        }
        let db = StateDb::open(copy.path()).unwrap();
        assert_eq!(db.get_kv("k").unwrap().as_deref(), Some("v"));
        // Many commits: the auto-checkpoint keeps the WAL (and what an open reads) short.
        let db = StateDb::open(dir.path()).unwrap();
        for i in 0..2000 {
            db.set_kv(&format!("k{i}"), "v").unwrap();
        }
        drop(db);
        let frame = 4096 + 24;
        let bound = 32 + (WAL_CHECKPOINT_PAGES as u64 + 16) * frame;
        let len = std::fs::metadata(&wal).unwrap().len();
        assert!(len <= bound, "WAL {len} bytes > {bound}");
        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(db.get_kv("k1999").unwrap().as_deref(), Some("v"));
        assert_eq!(db.get_kv("k").unwrap().as_deref(), Some("v"));
    }

    #[test]
    fn atomically_writes_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let id = ResourceId::new(Kind::Network, "a");
        let r = db.atomically(&|d| {
            d.set_kv("k", "v")?;
            d.journal_close(&id, None)?;
            Err(StateError::Corrupt("x".into(), "injected".into()))
        });
        assert!(r.is_err());
        assert_eq!(db.get_kv("k").unwrap(), None, "rolled back");
        db.atomically(&|d| d.set_kv("k", "v")).unwrap();
        assert_eq!(db.get_kv("k").unwrap().as_deref(), Some("v"));
    }

    #[test]
    fn state_dir_and_missing_parents_are_traversable_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tempdir");
        // nextest runs each test in its own process, so the umask change stays here.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let dir = t.path().join("a/state");
        let r = ensure_state_dir(&dir);
        nix::sys::stat::umask(old);
        r.expect("create");
        for p in [t.path().join("a"), dir] {
            let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, STATE_DIR_MODE, "{}", p.display());
        }
    }

    fn volume() -> Resource {
        let yaml = "---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: data, labels: {tier: db}}
spec: {pool: local, size: 1Mi, deletionPolicy: Delete}
";
        let d = crate::testkit::desired(yaml);
        d.resources.into_values().next().unwrap()
    }

    #[test]
    fn inventory_keeps_what_was_applied() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let r = volume();
        db.upsert(&r).unwrap();
        // Reopened: the rows are on disk.
        drop(db);
        let db = StateDb::open(dir.path()).unwrap();
        let inv = db.inventory().unwrap();
        let e = &inv[&r.id];
        assert_eq!(e.resource.spec, r.spec);
        assert_eq!(e.resource.metadata, r.metadata);
        assert_eq!(e.spec_hash, r.spec_hash());
        assert!(e.recorded);
        assert!(e.applied_at > 0.0);
        db.remove(&r.id).unwrap();
        assert!(db.inventory().unwrap().is_empty());
    }

    #[test]
    fn a_journal_entry_is_open_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let r = volume();
        db.journal_intent(&r, "create").unwrap();
        assert_eq!(
            db.journal_open().unwrap(),
            [(r.id.clone(), "create".to_string())].into()
        );
        assert_eq!(pending_ids(&db).unwrap(), [r.id.clone()].into());
        let journaled = db.journal_open_resources().unwrap();
        assert_eq!(journaled[&r.id].spec, r.spec);
        assert_eq!(journaled[&r.id].metadata, r.metadata);

        // A noted error keeps it open; closing marks it done.
        db.journal_note_error(&r.id, "boom").unwrap();
        assert_eq!(
            db.journal_last(&r.id).unwrap(),
            Some(("open".to_string(), Some("boom".to_string())))
        );
        db.journal_close(&r.id, None).unwrap();
        assert_eq!(
            db.journal_last(&r.id).unwrap(),
            Some(("done".to_string(), None))
        );
        assert!(db.journal_open().unwrap().is_empty());
        assert!(db.journal_open_resources().unwrap().is_empty());

        // Closing with an error marks it failed.
        db.journal_begin(&r.id, "delete").unwrap();
        db.journal_close(&r.id, Some("conflict")).unwrap();
        assert_eq!(
            db.journal_last(&r.id).unwrap(),
            Some(("failed".to_string(), Some("conflict".to_string())))
        );
    }

    #[test]
    fn the_apply_lock_is_exclusive_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let held = ApplyLock::acquire(dir.path(), Duration::ZERO).unwrap();
        match ApplyLock::acquire(dir.path(), Duration::from_millis(150)) {
            Err(StateError::Locked(path, waited)) => {
                assert_eq!(path, dir.path().join("lock"));
                assert!(waited >= Duration::from_millis(150), "{waited:?}");
            }
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("a second holder got the lock"),
        }
        drop(held);
        ApplyLock::acquire(dir.path(), Duration::ZERO).unwrap();
    }
}
