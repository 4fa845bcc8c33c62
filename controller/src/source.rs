//! Where the controller's manifests come from: a git repository (fetched with libgit2
//! into a bare mirror under `<state-dir>/source/`, each applied revision checked out to
//! `<state-dir>/source/<rev>`), or a local directory (revision = content hash).
//!
//! Everything here blocks (network, disk, child processes for signature checks): the
//! controller calls it from `spawn_blocking` only.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::ControllerError;

/// A parsed `--source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// `git+URL[#branch][:subdir]`.
    Git {
        /// The URL libgit2 fetches (`file://`, `https://`, `ssh://`).
        url: String,
        /// Branch; `None`: the remote's default branch (its HEAD).
        branch: Option<String>,
        /// Directory inside the repository holding the manifests.
        subdir: Option<String>,
    },
    /// A local directory.
    Dir(PathBuf),
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceSpec::Git {
                url,
                branch,
                subdir,
            } => {
                write!(f, "git+{url}")?;
                if let Some(b) = branch {
                    write!(f, "#{b}")?;
                }
                if let Some(s) = subdir {
                    write!(f, ":{s}")?;
                }
                Ok(())
            }
            SourceSpec::Dir(p) => write!(f, "{}", p.display()),
        }
    }
}

impl SourceSpec {
    /// Parses `git+URL[#branch][:subdir]` or a directory path.
    ///
    /// The URL needs a scheme (`file://`, `https://`, `ssh://user@host/path`); scp-like
    /// `user@host:path` is not accepted because its `:` would be ambiguous with
    /// `:subdir`. After the URL's authority, `#` starts the branch and the first `:`
    /// after the path (or after the branch) starts the subdirectory.
    pub fn parse(s: &str) -> Result<SourceSpec, String> {
        let Some(rest) = s.strip_prefix("git+") else {
            if s.is_empty() {
                return Err("empty --source".into());
            }
            return Ok(SourceSpec::Dir(PathBuf::from(s)));
        };
        let Some(scheme_end) = rest.find("://") else {
            return Err(format!(
                "{s}: a git source needs a URL with a scheme, e.g. git+https://host/repo.git#main:clusters/a, git+ssh://git@host/repo.git or git+file:///srv/repo.git"
            ));
        };
        let after_scheme = scheme_end + 3;
        // The authority ends at the first '/' after the scheme (it may hold a `:port`).
        let path_start = rest[after_scheme..]
            .find('/')
            .map(|i| after_scheme + i)
            .unwrap_or(rest.len());
        let (base, tail) = rest.split_at(path_start);
        let (path, branch, subdir) = match tail.find('#') {
            Some(h) => {
                let path = &tail[..h];
                let frag = &tail[h + 1..];
                match frag.split_once(':') {
                    Some((b, sub)) => (path, Some(b), Some(sub)),
                    None => (path, Some(frag), None),
                }
            }
            None => match tail.split_once(':') {
                Some((p, sub)) => (p, None, Some(sub)),
                None => (tail, None, None),
            },
        };
        let url = format!("{base}{path}");
        if path.is_empty() || path == "/" {
            return Err(format!("{s}: the git URL has no repository path"));
        }
        let branch = branch.filter(|b| !b.is_empty()).map(str::to_string);
        if let Some(b) = &branch
            && !branch_name_is_valid(b)
        {
            return Err(format!(
                "{s}: invalid branch name {b:?} (git's branch naming rules: no spaces, control characters, '~ ^ : ? * [ \\', '..', '@{{', leading '-' or '.', trailing '.lock' or '/')"
            ));
        }
        let subdir = subdir
            .map(|d| d.trim_matches('/'))
            .filter(|d| !d.is_empty())
            .map(str::to_string);
        if let Some(d) = &subdir
            && d.split('/').any(|c| c == ".." || c == ".")
        {
            return Err(format!(
                "{s}: the subdirectory must not contain '.' or '..'"
            ));
        }
        Ok(SourceSpec::Git {
            url,
            branch,
            subdir,
        })
    }
}

/// Whether `name` is a branch name git accepts (`git check-ref-format --branch`): a glob
/// character would turn the fetch refspec into a pattern, a leading `-` into an option.
pub fn branch_name_is_valid(name: &str) -> bool {
    git2::Branch::name_is_valid(name).unwrap_or(false)
}

/// Credentials for fetching.
#[derive(Debug, Clone, Default)]
pub struct GitAuth {
    /// File holding `username:password` (or a bare token) for https.
    pub credentials_file: Option<PathBuf>,
    /// Private key for ssh.
    pub ssh_key: Option<PathBuf>,
}

/// A fetched head.
#[derive(Debug, Clone)]
pub struct Head {
    /// Full commit id.
    pub revision: String,
    /// Commit summary line (empty for directories).
    pub message: String,
}

/// A commit's author, summary line and time (Unix seconds).
#[derive(Debug, Clone)]
pub struct CommitInfo {
    /// `Name <email>`.
    pub author: String,
    /// Summary line.
    pub summary: String,
    /// Commit time.
    pub time: i64,
}

/// A git source: a bare mirror at `<state-dir>/source/mirror.git`.
pub struct GitSource {
    url: String,
    branch: Option<String>,
    subdir: Option<String>,
    root: PathBuf,
    auth: GitAuth,
}

impl GitSource {
    /// A source rooted at `<state-dir>/source`.
    pub fn new(
        url: String,
        branch: Option<String>,
        subdir: Option<String>,
        state_dir: &Path,
        auth: GitAuth,
    ) -> Self {
        GitSource {
            url,
            branch,
            subdir,
            root: state_dir.join("source"),
            auth,
        }
    }

    fn mirror(&self) -> Result<git2::Repository, ControllerError> {
        let path = self.root.join("mirror.git");
        let repo = if path.join("HEAD").exists() {
            git2::Repository::open_bare(&path)
        } else {
            std::fs::create_dir_all(&self.root)
                .map_err(|e| ControllerError::io(format!("create {}", self.root.display()), e))?;
            git2::Repository::init_bare(&path)
        };
        repo.map_err(|e| {
            ControllerError::Git(format!("mirror {}: {}", path.display(), e.message()))
        })
    }

    fn callbacks(&self) -> git2::RemoteCallbacks<'static> {
        let auth = self.auth.clone();
        let mut tries = 0u32;
        let mut cb = git2::RemoteCallbacks::new();
        cb.credentials(move |_url, user_from_url, allowed| {
            tries += 1;
            if tries > 3 {
                return Err(git2::Error::from_str(
                    "authentication failed (credentials rejected)",
                ));
            }
            if allowed.contains(git2::CredentialType::SSH_KEY)
                && let Some(key) = &auth.ssh_key
            {
                return git2::Cred::ssh_key(user_from_url.unwrap_or("git"), None, key, None);
            }
            if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT)
                && let Some(file) = &auth.credentials_file
            {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    git2::Error::from_str(&format!("cannot read {}: {e}", file.display()))
                })?;
                let line = text.lines().next().unwrap_or("").trim();
                let (user, pass) = match line.split_once(':') {
                    Some((u, p)) => (u, p),
                    // A bare token: GitHub/GitLab accept any user name with it.
                    None => ("x-access-token", line),
                };
                return git2::Cred::userpass_plaintext(user, pass);
            }
            if allowed.contains(git2::CredentialType::DEFAULT) {
                return git2::Cred::default();
            }
            Err(git2::Error::from_str(
                "the remote asks for credentials: pass --git-credentials-file (https) or --git-ssh-key (ssh)",
            ))
        });
        cb
    }

    /// Fetches the branch and returns its head commit.
    pub fn fetch(&self) -> Result<Head, ControllerError> {
        let repo = self.mirror()?;
        let gerr = |what: &str, e: git2::Error| {
            ControllerError::Git(format!("{what} {}: {}", self.url, e.message()))
        };
        let mut remote = repo
            .remote_anonymous(&self.url)
            .map_err(|e| gerr("remote", e))?;
        let branch = match &self.branch {
            Some(b) => b.clone(),
            None => {
                let conn = remote
                    .connect_auth(git2::Direction::Fetch, Some(self.callbacks()), None)
                    .map_err(|e| gerr("connect", e))?;
                let def = conn
                    .default_branch()
                    .map_err(|e| gerr("default branch of", e))?;
                let name = def.as_str().unwrap_or("refs/heads/main").to_string();
                drop(conn);
                name.trim_start_matches("refs/heads/").to_string()
            }
        };
        drop(remote);
        self.fetch_branch(&branch, "refs/stead/head")
    }

    /// Fetches `branch` into the mirror's `local_ref` and returns its head commit.
    pub fn fetch_branch(&self, branch: &str, local_ref: &str) -> Result<Head, ControllerError> {
        let repo = self.mirror()?;
        let gerr = |what: &str, e: git2::Error| {
            ControllerError::Git(format!("{what} {}: {}", self.url, e.message()))
        };
        let mut remote = repo
            .remote_anonymous(&self.url)
            .map_err(|e| gerr("remote", e))?;
        let mut fo = git2::FetchOptions::new();
        fo.remote_callbacks(self.callbacks());
        fo.download_tags(git2::AutotagOption::None);
        let refspec = format!("+refs/heads/{branch}:{local_ref}");
        remote
            .fetch(&[refspec.as_str()], Some(&mut fo), None)
            .map_err(|e| gerr(&format!("fetch branch {branch} of"), e))?;
        let oid = repo
            .refname_to_id(local_ref)
            .map_err(|e| gerr(&format!("branch {branch} not found in"), e))?;
        let commit = repo.find_commit(oid).map_err(|e| gerr("read commit", e))?;
        Ok(Head {
            revision: oid.to_string(),
            message: commit.summary().ok().flatten().unwrap_or("").to_string(),
        })
    }

    /// The author, summary line and time of commit `rev`, if the mirror has it.
    pub fn commit_info(&self, rev: &str) -> Option<CommitInfo> {
        let repo = self.mirror().ok()?;
        let oid = git2::Oid::from_str(rev).ok()?;
        let c = repo.find_commit(oid).ok()?;
        let a = c.author();
        let author = match (a.name().ok(), a.email().ok()) {
            (Some(n), Some(e)) => format!("{n} <{e}>"),
            (Some(n), None) => n.to_string(),
            (None, Some(e)) => format!("<{e}>"),
            (None, None) => String::new(),
        };
        Some(CommitInfo {
            author,
            summary: c.summary().ok().flatten().unwrap_or("").to_string(),
            time: c.time().seconds(),
        })
    }

    /// Refuses `rev` unless it is `last` (the revision applied last) or a descendant of
    /// it: a force-push back to an older (even signed) commit must not roll the host back
    /// unless the operator allows rewinds.
    pub fn check_fast_forward(&self, last: &str, rev: &str) -> Result<(), String> {
        if last == rev {
            return Ok(());
        }
        let repo = self.mirror().map_err(|e| e.to_string())?;
        let parse = |r: &str| {
            git2::Oid::from_str(r).map_err(|e| format!("revision {r:?}: {}", e.message()))
        };
        let (new, old) = (parse(rev)?, parse(last)?);
        let hint = "pass --allow-rewind to accept it";
        if repo.find_commit(old).is_err() {
            return Err(format!(
                "the applied revision {} is not in this repository, so {} cannot be checked as a fast-forward; {hint}",
                short(last),
                short(rev)
            ));
        }
        match repo.graph_descendant_of(new, old) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "revision {} is not a fast-forward of the applied revision {} (force-push or rewind); {hint}",
                short(rev),
                short(last)
            )),
            Err(e) => Err(format!(
                "cannot check that {} descends from {}: {}",
                short(rev),
                short(last),
                e.message()
            )),
        }
    }

    /// Checks `rev` out to `<state-dir>/source/<rev>` (only the subdirectory; regular
    /// files only: symlinks and submodules are skipped) and returns the manifest dir.
    pub fn checkout(&self, rev: &str) -> Result<PathBuf, ControllerError> {
        let dest = self.root.join(rev);
        if dest.join(".stead-complete").exists() {
            return Ok(dest);
        }
        let repo = self.mirror()?;
        let gerr = |what: &str, e: git2::Error| {
            ControllerError::Git(format!("{what} {rev}: {}", e.message()))
        };
        let oid = git2::Oid::from_str(rev).map_err(|e| gerr("revision", e))?;
        let commit = repo.find_commit(oid).map_err(|e| gerr("commit", e))?;
        let mut tree = commit.tree().map_err(|e| gerr("tree of", e))?;
        if let Some(sub) = &self.subdir {
            let entry = tree.get_path(Path::new(sub)).map_err(|_| {
                ControllerError::Git(format!("directory {sub:?} does not exist at {rev}"))
            })?;
            let obj = entry.to_object(&repo).map_err(|e| gerr("subdir of", e))?;
            tree = obj.peel_to_tree().map_err(|_| {
                ControllerError::Git(format!("{sub:?} is not a directory at {rev}"))
            })?;
        }
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{rev}."))
            .suffix(".tmp")
            .tempdir_in(&self.root)
            .map_err(|e| {
                ControllerError::io(format!("create temp dir in {}", self.root.display()), e)
            })?
            .keep();
        let result = write_tree(&repo, &tree, &tmp).and_then(|()| {
            std::fs::write(tmp.join(".stead-complete"), rev)
                .map_err(|e| ControllerError::io("write checkout marker".into(), e))
        });
        if let Err(e) = result {
            let _ = remove_tree(&tmp);
            return Err(e);
        }
        let renamed = remove_tree(&dest).and_then(|()| {
            std::fs::rename(&tmp, &dest)
                .map_err(|e| ControllerError::io(format!("rename to {}", dest.display()), e))
        });
        if let Err(e) = renamed {
            let _ = remove_tree(&tmp);
            return Err(e);
        }
        stead_host::fs::fsync_dir(&self.root)
            .map_err(|e| ControllerError::io(e.to_string(), e.source))?;
        debug!(revision = rev, dir = %dest.display(), "checked out");
        Ok(dest)
    }

    /// Removes checkouts other than `keep`.
    pub fn clean(&self, keep: &[&str]) {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "mirror.git" || keep.iter().any(|k| *k == name) {
                continue;
            }
            if checkout_rev_of(&name).is_some() {
                match remove_tree(&e.path()) {
                    Ok(()) => debug!(dir = %e.path().display(), "removed old checkout"),
                    Err(err) => {
                        warn!(dir = %e.path().display(), error = %err, "cannot remove old checkout")
                    }
                }
            }
        }
    }

    /// Verifies the signature of `rev` against `keyring`: SSH signatures with
    /// `ssh-keygen -Y verify` and an allowed-signers file, OpenPGP ones with `gpgv`.
    pub fn verify(&self, rev: &str, keyring: &Path) -> Result<String, String> {
        let repo = self.mirror().map_err(|e| e.to_string())?;
        let oid = git2::Oid::from_str(rev).map_err(|e| e.message().to_string())?;
        let (sig, data) = repo
            .extract_signature(&oid, None)
            .map_err(|_| format!("commit {} is not signed", short(rev)))?;
        let sig = sig.as_str().unwrap_or("").to_string();
        verify_signature(&sig, &data, keyring).map_err(|e| format!("commit {}: {e}", short(rev)))
    }
}

/// Writes `tree` below `dir`: directories and regular files only (symlinks and
/// submodules are not materialised). Every entry name is checked first, so a tree with
/// one bad name is refused as a whole, naming the entry.
/// The revision a checkout directory (`<rev>`) or an interrupted checkout's temp
/// directory (`.<rev>.XXXXXX.tmp`) in the source dir belongs to; `None` for other names.
fn checkout_rev_of(name: &str) -> Option<&str> {
    let rev = match name.strip_prefix('.') {
        Some(rest) => rest.strip_suffix(".tmp")?.split('.').next()?,
        None => name,
    };
    (rev.len() >= 40 && rev.chars().all(|c| c.is_ascii_hexdigit())).then_some(rev)
}

/// Removes a checkout tree stead made (never following a symlink, never crossing a
/// mount); absent is success.
fn remove_tree(path: &Path) -> Result<(), ControllerError> {
    stead_host::remove_tree_beneath(path)
        .map(|_| ())
        .map_err(|e| {
            ControllerError::io(
                format!("remove {}", path.display()),
                std::io::Error::other(e),
            )
        })
}

fn write_tree(
    repo: &git2::Repository,
    tree: &git2::Tree<'_>,
    dir: &Path,
) -> Result<(), ControllerError> {
    check_tree_names(tree)?;
    let mut failure: Option<ControllerError> = None;
    tree.walk(git2::TreeWalkMode::PreOrder, |parent, entry| {
        let Ok(name) = entry.name() else {
            failure = Some(ControllerError::Git(format!(
                "{parent}: entry name is not UTF-8"
            )));
            return git2::TreeWalkResult::Abort;
        };
        let rel = Path::new(parent).join(name);
        let path = dir.join(&rel);
        match entry.kind() {
            Some(git2::ObjectType::Tree) => {
                if let Err(e) = std::fs::create_dir_all(&path) {
                    failure = Some(ControllerError::io(format!("mkdir {}", path.display()), e));
                    return git2::TreeWalkResult::Abort;
                }
                git2::TreeWalkResult::Ok
            }
            Some(git2::ObjectType::Blob) if entry.filemode() & 0o170000 == 0o100000 => {
                match repo.find_blob(entry.id()) {
                    Ok(blob) => match std::fs::write(&path, blob.content()) {
                        Ok(()) => git2::TreeWalkResult::Ok,
                        Err(e) => {
                            failure =
                                Some(ControllerError::io(format!("write {}", path.display()), e));
                            git2::TreeWalkResult::Abort
                        }
                    },
                    Err(e) => {
                        failure = Some(ControllerError::Git(format!(
                            "blob {}: {}",
                            rel.display(),
                            e.message()
                        )));
                        git2::TreeWalkResult::Abort
                    }
                }
            }
            _ => git2::TreeWalkResult::Skip,
        }
    })
    .map_err(|e| ControllerError::Git(format!("walk: {}", e.message())))?;
    failure.map_or(Ok(()), Err)
}

/// Refuses a tree holding an entry (at any depth) whose name is not a plain file name.
fn check_tree_names(tree: &git2::Tree<'_>) -> Result<(), ControllerError> {
    let mut bad: Option<String> = None;
    let walked = tree.walk(
        git2::TreeWalkMode::PreOrder,
        |parent, entry| match check_entry_name(entry.name_bytes()) {
            Ok(_) => git2::TreeWalkResult::Ok,
            Err(why) => {
                let shown = String::from_utf8_lossy(entry.name_bytes()).into_owned();
                bad = Some(format!("tree entry {shown:?} in {parent:?} {why}"));
                git2::TreeWalkResult::Abort
            }
        },
    );
    match (bad, walked) {
        (Some(b), _) => Err(ControllerError::Git(format!("{b}: revision refused"))),
        (None, Err(e)) => Err(ControllerError::Git(format!("walk: {}", e.message()))),
        (None, Ok(())) => Ok(()),
    }
}

/// A tree entry's name as a single path component, or why it is not one: not UTF-8,
/// empty, holding `/`, NUL or `..`, or `.`.
pub fn check_entry_name(name: &[u8]) -> Result<&str, &'static str> {
    let name = std::str::from_utf8(name).map_err(|_| "is not UTF-8")?;
    if name.is_empty() || name == "." {
        return Err("is empty or '.'");
    }
    if name.contains('/') {
        return Err("contains '/'");
    }
    if name.contains('\0') {
        return Err("contains NUL");
    }
    if name.contains("..") {
        return Err("contains '..'");
    }
    Ok(name)
}

/// Verifies a detached signature `sig` over `data` with the keys in `keyring`. Returns
/// who signed.
pub fn verify_signature(sig: &str, data: &[u8], keyring: &Path) -> Result<String, String> {
    // A private (0700) temp dir, removed on drop.
    let dir = tempfile::Builder::new()
        .prefix("stead-verify-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let sig_path = dir.path().join("commit.sig");
    std::fs::write(&sig_path, sig).map_err(|e| e.to_string())?;
    if sig.starts_with("-----BEGIN SSH SIGNATURE-----") {
        // Find who may have made it, then verify as that principal (what git does).
        let out = Command::new("ssh-keygen")
            .args(["-Y", "find-principals", "-f"])
            .arg(keyring)
            .arg("-s")
            .arg(&sig_path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ssh-keygen: {e}"))?;
        let principals = String::from_utf8_lossy(&out.stdout).into_owned();
        let Some(principal) = principals.lines().map(str::trim).find(|l| !l.is_empty()) else {
            return Err("signed by a key that is not in the allowed signers file".into());
        };
        let mut child = Command::new("ssh-keygen")
            .args(["-Y", "verify", "-n", "git", "-f"])
            .arg(keyring)
            .args(["-I", principal, "-s"])
            .arg(&sig_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run ssh-keygen: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(data).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(principal.to_string())
        } else {
            Err(format!(
                "bad SSH signature: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    } else if sig.starts_with("-----BEGIN PGP SIGNATURE-----") {
        let data_path = dir.path().join("commit.data");
        std::fs::write(&data_path, data).map_err(|e| e.to_string())?;
        let out = Command::new("gpgv")
            .arg("--keyring")
            .arg(keyring)
            .arg(&sig_path)
            .arg(&data_path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run gpgv (apt install gpgv): {e}"))?;
        if out.status.success() {
            Ok("openpgp".into())
        } else {
            Err(format!(
                "bad OpenPGP signature: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    } else {
        Err("unknown signature format (expected SSH or OpenPGP)".into())
    }
}

/// The first 12 characters of a revision.
pub fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

/// A content hash of every `*.yaml`/`*.yml` file under `dir` (paths and bytes), the
/// revision of a directory source.
pub fn dir_revision(dir: &Path) -> Result<String, ControllerError> {
    let mut files = Vec::new();
    collect_yaml(dir, &mut files)?;
    files.sort();
    let mut h = Sha256::new();
    for f in &files {
        let rel = f.strip_prefix(dir).unwrap_or(f);
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0u8]);
        let bytes = std::fs::read(f)
            .map_err(|e| ControllerError::io(format!("read {}", f.display()), e))?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(hex::encode(h.finalize()))
}

/// The manifest files below `dir`, by the same rule as the loader
/// ([`stead_schema::files`]): a change the loader would read changes the revision.
fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ControllerError> {
    let found = stead_schema::files::walk_manifest_dir(dir)
        .map_err(|e| ControllerError::io(format!("read {}", e.path.display()), e.source))?;
    out.extend(found.files);
    Ok(())
}

/// Logs what a source is.
pub fn describe(spec: &SourceSpec) {
    info!(source = %spec, "following source");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(url: &str, branch: Option<&str>, subdir: Option<&str>) -> SourceSpec {
        SourceSpec::Git {
            url: url.into(),
            branch: branch.map(Into::into),
            subdir: subdir.map(Into::into),
        }
    }

    #[test]
    fn checkout_dirs_and_their_temp_dirs_are_recognised() {
        let rev = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(checkout_rev_of(rev), Some(rev));
        assert_eq!(checkout_rev_of(&format!(".{rev}.Ab12Cd.tmp")), Some(rev));
        assert_eq!(checkout_rev_of(&format!("{rev}.tmp")), None);
        for other in ["mirror.git", ".stead-complete", ".abc.x.tmp", "0123"] {
            assert_eq!(checkout_rev_of(other), None, "{other}");
        }
    }

    #[test]
    fn parses_sources() {
        assert_eq!(
            SourceSpec::parse("git+file:///srv/repo.git").unwrap(),
            git("file:///srv/repo.git", None, None)
        );
        assert_eq!(
            SourceSpec::parse("git+https://example.com/o/r.git#main:clusters/a/").unwrap(),
            git(
                "https://example.com/o/r.git",
                Some("main"),
                Some("clusters/a")
            )
        );
        assert_eq!(
            SourceSpec::parse("git+ssh://git@host:2222/o/r.git:hosts/h1").unwrap(),
            git("ssh://git@host:2222/o/r.git", None, Some("hosts/h1"))
        );
        assert_eq!(
            SourceSpec::parse("git+file:///r#release/1.0").unwrap(),
            git("file:///r", Some("release/1.0"), None)
        );
        assert_eq!(
            SourceSpec::parse("/etc/stead/manifests").unwrap(),
            SourceSpec::Dir("/etc/stead/manifests".into())
        );
        assert!(SourceSpec::parse("git+git@github.com:o/r.git").is_err());
        assert!(SourceSpec::parse("git+https://host").is_err());
        assert!(SourceSpec::parse("git+file:///r:../etc").is_err());
        assert!(SourceSpec::parse("git+file:///r#-x").is_err());
        let s = git("https://h/r.git", Some("main"), Some("a/b"));
        assert_eq!(SourceSpec::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn refuses_bad_branch_names() {
        for bad in [
            "-x",
            "a..b",
            "a b",
            "tab\there",
            "ctl\u{1}x",
            "del\u{7f}x",
            "glob*",
            "what?",
            "class[a]",
            "tilde~1",
            "caret^",
            "back\\slash",
            "at@{1}",
            "main.lock",
            "dir/x.lock",
            "trailing/",
            "trailing.",
            "/leading",
            ".hidden",
            "a//b",
            "HEAD",
        ] {
            assert!(!branch_name_is_valid(bad), "{bad:?} accepted");
            let err = SourceSpec::parse(&format!("git+file:///r#{bad}"))
                .expect_err(&format!("{bad:?} parsed"));
            assert!(err.contains("invalid branch name"), "{bad:?}: {err}");
        }
        for good in ["main", "release/1.0", "feature-x_y", "v1.2.3", "a@b"] {
            assert!(branch_name_is_valid(good), "{good:?} refused");
        }
        // In a `--source` the ':' starts the subdirectory, so only the helper sees it.
        assert!(!branch_name_is_valid("colon:x"));
        let err = SourceSpec::parse("git+file:///r#ma*in").unwrap_err();
        assert!(err.contains("\"ma*in\""), "{err}");
    }

    /// A repository at `dir` with a commit helper: `commit(parent, tree)`.
    struct TestRepo {
        repo: git2::Repository,
        dir: tempfile::TempDir,
    }

    impl TestRepo {
        fn new() -> TestRepo {
            let dir = tempfile::tempdir().unwrap();
            let repo = git2::Repository::init_bare(dir.path().join("r.git")).unwrap();
            TestRepo { repo, dir }
        }

        fn url(&self) -> String {
            format!("file://{}", self.dir.path().join("r.git").display())
        }

        /// A raw tree object holding `(mode, name, id)` entries, unchecked.
        fn raw_tree(&self, entries: &[(&str, &[u8], git2::Oid)]) -> git2::Oid {
            let mut raw = Vec::new();
            for (mode, name, id) in entries {
                raw.extend_from_slice(mode.as_bytes());
                raw.push(b' ');
                raw.extend_from_slice(name);
                raw.push(0);
                raw.extend_from_slice(id.as_bytes());
            }
            self.repo
                .odb()
                .unwrap()
                .write(git2::ObjectType::Tree, &raw)
                .unwrap()
        }

        fn file_tree(&self, name: &[u8], text: &str) -> git2::Oid {
            let blob = self.repo.blob(text.as_bytes()).unwrap();
            self.raw_tree(&[("100644", name, blob)])
        }

        /// Commits `tree` on `main` (forced: the branch may move anywhere).
        fn commit(&self, tree: git2::Oid, parent: Option<git2::Oid>) -> git2::Oid {
            let sig = git2::Signature::now("t", "t@example.com").unwrap();
            let tree = self.repo.find_tree(tree).unwrap();
            let parents: Vec<git2::Commit<'_>> = parent
                .map(|p| self.repo.find_commit(p).unwrap())
                .into_iter()
                .collect();
            let refs: Vec<&git2::Commit<'_>> = parents.iter().collect();
            let id = self
                .repo
                .commit(None, &sig, &sig, "c", &tree, &refs)
                .unwrap();
            self.repo
                .reference("refs/heads/main", id, true, "test")
                .unwrap();
            id
        }

        fn source(&self, state: &Path) -> GitSource {
            GitSource::new(
                self.url(),
                Some("main".into()),
                None,
                state,
                GitAuth::default(),
            )
        }
    }

    #[test]
    fn only_fast_forwards_of_the_applied_revision_pass() {
        let r = TestRepo::new();
        let state = tempfile::tempdir().unwrap();
        let src = r.source(state.path());
        let c1 = r.commit(r.file_tree(b"a.yaml", "1"), None);
        let c2 = r.commit(r.file_tree(b"a.yaml", "2"), Some(c1));
        assert_eq!(src.fetch().unwrap().revision, c2.to_string());
        let (s1, s2) = (c1.to_string(), c2.to_string());
        src.check_fast_forward(&s1, &s2).unwrap();
        src.check_fast_forward(&s2, &s2).unwrap();
        let err = src.check_fast_forward(&s2, &s1).unwrap_err();
        assert!(
            err.contains("not a fast-forward") && err.contains("--allow-rewind"),
            "{err}"
        );
        // A sibling (force-pushed rewrite) is not a fast-forward either.
        let other = r.commit(r.file_tree(b"a.yaml", "3"), Some(c1));
        assert_eq!(src.fetch().unwrap().revision, other.to_string());
        assert!(src.check_fast_forward(&s2, &other.to_string()).is_err());
        // An applied revision the mirror does not know is refused too.
        let unknown = "0123456789abcdef0123456789abcdef01234567";
        let err = src.check_fast_forward(unknown, &s2).unwrap_err();
        assert!(err.contains("not in this repository"), "{err}");
    }

    #[test]
    fn trees_with_bad_entry_names_are_refused() {
        let r = TestRepo::new();
        let ok = r.file_tree(b"ok.yaml", "x: 1\n");
        let bad: [&[u8]; 6] = [
            b"..",
            b"../evil.yaml",
            b"a/b.yaml",
            b"\xff.yaml",
            b".",
            b"x..y",
        ];
        for name in bad {
            let state = tempfile::tempdir().unwrap();
            let src = r.source(state.path());
            // The bad entry is one level down, next to a good file.
            let inner = r.file_tree(name, "x: 1\n");
            let blob = r.repo.blob(b"x: 1\n").unwrap();
            let top = r.raw_tree(&[("100644", b"a.yaml", blob), ("40000", b"sub", inner)]);
            let c = r.commit(top, None);
            assert_eq!(src.fetch().unwrap().revision, c.to_string());
            let err = src.checkout(&c.to_string()).unwrap_err().to_string();
            let shown = String::from_utf8_lossy(name).into_owned();
            assert!(
                err.contains(&format!("{shown:?}")) && err.contains("refused"),
                "{shown:?}: {err}"
            );
            // Nothing of it is left behind.
            let left: Vec<_> = std::fs::read_dir(state.path().join("source"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(
                left,
                vec![std::ffi::OsString::from("mirror.git")],
                "{shown:?}"
            );
        }
        let state = tempfile::tempdir().unwrap();
        let src = r.source(state.path());
        let c = r.commit(ok, None);
        src.fetch().unwrap();
        let dir = src.checkout(&c.to_string()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("ok.yaml")).unwrap(),
            "x: 1\n"
        );
    }

    #[test]
    fn entry_names() {
        assert_eq!(check_entry_name(b"a.yaml"), Ok("a.yaml"));
        assert_eq!(check_entry_name(b".hidden"), Ok(".hidden"));
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"a..",
            b"a/b",
            b"/",
            b"a\0b",
            b"\xc3\x28",
        ] {
            assert!(check_entry_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dir_revision_changes_with_content_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.yaml"), "x: 1\n").unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        let r1 = dir_revision(d.path()).unwrap();
        std::fs::write(d.path().join("notes.txt"), "still ignored").unwrap();
        assert_eq!(dir_revision(d.path()).unwrap(), r1);
        std::fs::write(d.path().join("a.yaml"), "x: 2\n").unwrap();
        assert_ne!(dir_revision(d.path()).unwrap(), r1);
    }

    #[test]
    fn revision_walk_sees_the_loaders_file_set() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for dir in [".hidden", "sub", "sub/.cache"] {
            std::fs::create_dir(r.join(dir)).unwrap();
        }
        for f in [
            ".hidden/x.yaml",
            ".top.yaml",
            "sub/.y.yml",
            "sub/.cache/z.yaml",
            "sub/m.yml",
            "a.yaml",
            "notes.txt",
        ] {
            std::fs::write(r.join(f), "x: 1\n").unwrap();
        }
        let mut ours = Vec::new();
        collect_yaml(r, &mut ours).unwrap();
        let loaders = stead_schema::load::collect_files(&[r.to_path_buf()]).unwrap();
        assert_eq!(ours, loaders);
        assert_eq!(ours, [r.join("a.yaml"), r.join("sub/m.yml")]);
        // A change the loader does not read does not change the revision.
        let rev = dir_revision(r).unwrap();
        std::fs::write(r.join(".hidden/x.yaml"), "x: 2\n").unwrap();
        std::fs::write(r.join(".top.yaml"), "x: 2\n").unwrap();
        assert_eq!(dir_revision(r).unwrap(), rev);
    }
}
