//! tftpd-hpa 7.x's filename processing after remapping, pure: the steps of
//! its man page's "FILENAME PROCESSING", in its order: `--normalize`, then
//! path validation (`--validate`), then the directory. ringtftpd always
//! resolves names under the directory with openat2 (`RESOLVE_IN_ROOT`), as
//! tftpd-hpa's `--jail` does, so validation runs only when asked, as under
//! `--jail`; `--path-prefix` becomes part of the root itself, as tftpd-hpa
//! does under `--jail` or `--secure` ("prefix is prepended to the root").
//!
//! Without `-s`/`-j`, tftpd-hpa clients name files by their absolute path
//! (`/tftpboot/pxelinux.0` for the directory `/tftpboot`); such a name is
//! served from inside the directory, so that setups move over unchanged,
//! while a name relative to the directory is served too (ringtftpd's
//! default, and `-s`'s).
//!
//! Several directories (tftpd-hpa's `in.tftpd [options] directory...`,
//! without `-s`/`-j`): a name must then be absolute and inside one of them,
//! tried in order, as tftpd-hpa requires (7.x's canonical comparison, by
//! whole components: `/srv/tftpx/a` is not inside `/srv/tftp`, though 5.2's
//! plain string comparison let it through). The answer is the directory's
//! index with the rest of the name, which the open resolves under that
//! directory alone ([`crate::policy::Grant::root`]).
#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::fmt::Debug;
use std::sync::Arc;

use crate::policy::{Decision, Grant, Incoming, Policy, Settings, decide_renamed};
use crate::refusal::Refusal;

/// `--normalize[=MODE]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalize {
    /// As asked (the default).
    #[default]
    None,
    /// A leading `/` added if there is none.
    Root,
    /// As `Root`, and `//`, `.` and `..` (with the component before it)
    /// taken out, lexically.
    Path,
}

/// What is done to a name between the remap rules and the open.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PathRules {
    pub normalize: Normalize,
    /// `--validate`: absolute, no `.` or `..` component, no control
    /// character; repeated and trailing slashes dropped.
    pub validate: bool,
    /// Without `-s`/`-j`: the directory as clients name it (canonical,
    /// without its trailing slash), whose prefix a name may carry.
    pub directory: Option<Vec<u8>>,
    /// The second and later directories, in the same form: with any, a name
    /// must be absolute and inside one of them all (`directory` first).
    pub more_directories: Vec<Vec<u8>>,
}

impl PathRules {
    /// Whether any step can change or refuse a name.
    pub fn is_active(&self) -> bool {
        *self != PathRules::default()
    }

    /// The name to open under the root, or why it is refused.
    pub fn apply<'a>(&self, name: &'a [u8]) -> Result<Cow<'a, [u8]>, Refusal> {
        self.apply_rooted(name).map(|(_, name)| name)
    }

    /// As [`PathRules::apply`], with the index of the directory to open
    /// the name under (0 unless there are several).
    pub fn apply_rooted<'a>(&self, name: &'a [u8]) -> Result<(usize, Cow<'a, [u8]>), Refusal> {
        let mut name = match self.normalize {
            Normalize::None => Cow::Borrowed(name),
            Normalize::Root if name.starts_with(b"/") => Cow::Borrowed(name),
            Normalize::Root => Cow::Owned([b"/", name].concat()),
            Normalize::Path => Cow::Owned(normalize_path(name)),
        };
        if self.validate {
            name = Cow::Owned(validate(&name)?);
        }
        if !self.more_directories.is_empty() {
            // tftpd-hpa's check without -s: absolute, inside one of them.
            if !name.starts_with(b"/") {
                return Err(Refusal::Denied("only absolute filenames allowed"));
            }
            // Index i is directory i of the command line (0: `directory`).
            let first = std::iter::once(self.directory.as_deref());
            let every = first.chain(self.more_directories.iter().map(|d| Some(&d[..])));
            for (index, directory) in every.enumerate() {
                let Some(directory) = directory else {
                    continue;
                };
                match inside(&name, directory) {
                    // As tftpd-hpa, which opens it and fails to read it.
                    Some([]) => return Err(Refusal::Unservable("is a directory")),
                    Some(rest) => return Ok((index, Cow::Owned(rest.to_vec()))),
                    None => {}
                }
            }
            return Err(Refusal::Denied("forbidden directory"));
        }
        if let Some(directory) = &self.directory {
            match inside(&name, directory) {
                Some([]) => return Err(Refusal::Unservable("is a directory")),
                Some(rest) => name = Cow::Owned(rest.to_vec()),
                None if self.validate => return Err(Refusal::Denied("forbidden directory")),
                None => {}
            }
        }
        Ok((0, name))
    }
}

/// `--normalize=path`: `/` first, then each component but empty ones and
/// `.`, a `..` taking back the one before it (none at the top).
fn normalize_path(name: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    let mut out = Vec::with_capacity(name.len() + 1);
    for part in &parts {
        out.push(b'/');
        out.extend_from_slice(part);
    }
    if out.is_empty() || name.ends_with(b"/") && !parts.is_empty() {
        out.push(b'/');
    }
    out
}

/// tftpd-hpa's PATH VALIDATION, steps 1 to 4.
fn validate(name: &[u8]) -> Result<Vec<u8>, Refusal> {
    if !name.starts_with(b"/") {
        return Err(Refusal::Denied("only absolute filenames allowed"));
    }
    if name.iter().any(|&b| b < 0x20) {
        return Err(Refusal::Denied("control character in filename"));
    }
    let mut out = Vec::with_capacity(name.len());
    for part in name.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
        if part == b"." || part == b".." {
            return Err(Refusal::Denied("'.' or '..' in filename"));
        }
        out.push(b'/');
        out.extend_from_slice(part);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Ok(out)
}

/// The rest of `name` below `directory`, if it lies there (`name` given
/// with repeated slashes or not).
fn inside<'a>(name: &'a [u8], directory: &[u8]) -> Option<&'a [u8]> {
    let rest = name.strip_prefix(directory)?;
    if rest.is_empty() {
        return Some(rest);
    }
    rest.starts_with(b"/").then(|| &rest[1..])
}

/// The directory as a tftpd-hpa client names it: absolute, without `.`
/// components, repeated or trailing slashes; None if it is not absolute.
pub fn canonical_directory(directory: &[u8]) -> Option<Vec<u8>> {
    let canonical = validate(directory).ok()?;
    Some(if canonical == b"/" {
        Vec::new()
    } else {
        canonical
    })
}

/// Applies [`PathRules`] to each request, then lets `inner` decide on the
/// resulting name.
pub struct PathPolicy {
    pub rules: PathRules,
    pub inner: Arc<dyn Policy>,
}

impl Debug for PathPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathPolicy")
            .field("rules", &self.rules)
            .field("inner", &self.inner)
            .finish()
    }
}

impl Policy for PathPolicy {
    fn needs_mac(&self) -> bool {
        self.inner.needs_mac()
    }

    fn decide<'a>(&self, incoming: &Incoming<'a>, settings: &Settings) -> Decision<'a> {
        let (root, name) = match self.rules.apply_rooted(incoming.request.filename) {
            Ok((0, Cow::Borrowed(_))) => return self.inner.decide(incoming, settings),
            Ok((root, name)) => (root, name.into_owned()),
            Err(refusal) => return Decision::Refuse(refusal),
        };
        match decide_renamed(self.inner.as_ref(), incoming, &name, settings) {
            // The directory the name was found in is the one opened.
            Decision::Serve(grant) => Decision::Serve(Grant { root, ..grant }),
            refused => refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(rules: &PathRules, name: &str) -> Result<String, Refusal> {
        rules
            .apply(name.as_bytes())
            .map(|n| String::from_utf8_lossy(&n).into_owned())
    }

    #[test]
    fn normalize_modes_as_in_the_man_page() {
        let root = PathRules {
            normalize: Normalize::Root,
            ..PathRules::default()
        };
        assert_eq!(applied(&root, "a/b").unwrap(), "/a/b");
        assert_eq!(applied(&root, "/a//b").unwrap(), "/a//b");
        let path = PathRules {
            normalize: Normalize::Path,
            ..PathRules::default()
        };
        for (asked, got) in [
            ("a/b", "/a/b"),
            ("//a//./b", "/a/b"),
            ("a/../b", "/b"),
            ("../../etc/passwd", "/etc/passwd"),
            ("a/b/", "/a/b/"),
            ("", "/"),
            ("..", "/"),
        ] {
            assert_eq!(applied(&path, asked).unwrap(), got, "{asked}");
        }
        assert_eq!(applied(&PathRules::default(), "a/../b").unwrap(), "a/../b");
    }

    #[test]
    fn validation_refuses_what_tftpd_hpa_refuses_and_canonicalizes() {
        let v = PathRules {
            validate: true,
            ..PathRules::default()
        };
        assert_eq!(applied(&v, "/a//b/").unwrap(), "/a/b");
        for bad in ["a/b", "/a/./b", "/a/../b", "/..", "/a\u{1}b"] {
            assert!(applied(&v, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_grant_names_the_directory_the_name_was_found_in() {
        use crate::policy::DefaultPolicy;
        use crate::proto::{Mode, Options, Request};
        let policy = PathPolicy {
            rules: PathRules {
                directory: Some(b"/a".to_vec()),
                more_directories: vec![b"/b".to_vec()],
                ..PathRules::default()
            },
            inner: Arc::new(DefaultPolicy),
        };
        let decide = |name: &[u8]| {
            let request = Request {
                filename: name,
                mode: Mode::Octet,
                options: Options::default(),
            };
            let incoming = Incoming {
                now: std::time::Instant::now(),
                peer: "127.0.0.1:2000".parse().unwrap(),
                local: "127.0.0.1".parse().unwrap(),
                mtu: None,
                write: false,
                request: &request,
                mac: None,
                client_sessions: 0,
            };
            match policy.decide(&incoming, &Settings::default()) {
                Decision::Serve(g) => Ok((g.root, g.path.into_owned())),
                Decision::Refuse(r) => Err(r),
            }
        };
        assert_eq!(decide(b"/a/x"), Ok((0, b"x".to_vec())));
        assert_eq!(decide(b"/b/sub/x"), Ok((1, b"sub/x".to_vec())));
        assert_eq!(decide(b"/c/x"), Err(Refusal::Denied("forbidden directory")));
    }

    #[test]
    fn names_under_the_directory_lose_its_prefix() {
        let dir = canonical_directory(b"/srv//tftp/").unwrap();
        assert_eq!(dir, b"/srv/tftp");
        let rules = PathRules {
            directory: Some(dir.clone()),
            ..PathRules::default()
        };
        assert_eq!(
            applied(&rules, "/srv/tftp/pxelinux.0").unwrap(),
            "pxelinux.0"
        );
        assert_eq!(applied(&rules, "pxelinux.0").unwrap(), "pxelinux.0");
        assert_eq!(applied(&rules, "/srv/tftpx/a").unwrap(), "/srv/tftpx/a");
        // With validation, as tftpd-hpa without -s: inside it or refused.
        let strict = PathRules {
            validate: true,
            directory: Some(dir),
            ..PathRules::default()
        };
        assert_eq!(applied(&strict, "/srv/tftp//boot/x").unwrap(), "boot/x");
        assert!(applied(&strict, "/etc/passwd").is_err());
        assert!(applied(&strict, "pxelinux.0").is_err());
        assert_eq!(canonical_directory(b"relative"), None);
        // Several directories: absolute, inside one of them, the first wins.
        let several = PathRules {
            directory: Some(b"/srv/tftp".to_vec()),
            more_directories: vec![b"/boot/a".to_vec(), b"/srv".to_vec()],
            ..PathRules::default()
        };
        let rooted = |name: &str| {
            several
                .apply_rooted(name.as_bytes())
                .map(|(i, n)| (i, String::from_utf8_lossy(&n).into_owned()))
        };
        assert_eq!(rooted("/srv/tftp/pxelinux.0"), Ok((0, "pxelinux.0".into())));
        assert_eq!(rooted("/boot/a//x/y"), Ok((1, "/x/y".into())));
        assert_eq!(rooted("/srv/tftpx/a"), Ok((2, "tftpx/a".into())));
        assert_eq!(
            rooted("/srv/tftp/"),
            Err(Refusal::Unservable("is a directory"))
        );
        for (name, why) in [
            ("/boot/ab/x", "forbidden directory"),
            ("/etc/passwd", "forbidden directory"),
            ("pxelinux.0", "only absolute filenames allowed"),
            ("srv/tftp/pxelinux.0", "only absolute filenames allowed"),
        ] {
            assert_eq!(rooted(name), Err(Refusal::Denied(why)), "{name}");
        }
        assert_eq!(canonical_directory(b"/").unwrap(), b"");
    }
}
