//! Configuration files: the site's and the user's defaults for `agent` and `launch`
//! ([`ClientConfig`]), and the strict reading every config file gets (the relay's
//! `--config` too): a file that group or others can write is refused, an unknown key is an
//! error naming the file, the key and the nearest valid key, a wrong type names the key.
//!
//! Where the defaults come from, most important first: a flag, its environment variable,
//! the user's file (`~/.config/jobgate/jobgate.toml`), the site's file
//! (`/etc/jobgate/jobgate.toml`). `$JOBGATE_CONFIG` names one file that replaces both
//! files (for a test, or a project's own setup).

use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The site's defaults for everyone on the cluster.
pub const SITE_CONFIG: &str = "/etc/jobgate/jobgate.toml";
/// The user's own defaults, below `$HOME`.
pub const USER_CONFIG: &str = ".config/jobgate/jobgate.toml";
/// One file instead of the site's and the user's.
pub const CONFIG_ENV: &str = "JOBGATE_CONFIG";
/// Largest config file read (a config is a few hundred bytes; this refuses mistakes).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Why a config file cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// It cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Group or others may write it: anyone could point the agent at another relay.
    #[error("{path} is writable by group or others (mode {mode:o}): refused; chmod go-w it")]
    Writable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Too large to be a config file.
    #[error("{path} is larger than {MAX_CONFIG_BYTES} bytes: not a config file")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not TOML.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's words (line and column included).
        message: String,
    },
    /// A key no setting has.
    #[error("{path}: unknown key `{key}`{section}{hint}")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// ` in [table]`, or empty at the top level.
        section: String,
        /// `; did you mean `x`?`, or the list of valid keys.
        hint: String,
    },
    /// Settings from two places could not be merged (a bug: both are this program's types).
    #[error("cannot merge settings: {0}")]
    Merge(String),
    /// A key with a value of the wrong type or shape.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What serde said (it names the key).
        message: String,
    },
}

/// Reads a TOML file as a table, refusing files that others may write.
pub fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    if let Some(mode) =
        jobgate_files::loose_bits(path, jobgate_files::GROUP_OR_OTHER_WRITE).map_err(read_error)?
    {
        return Err(ConfigError::Writable {
            path: path.to_owned(),
            mode,
        });
    }
    if std::fs::metadata(path).map_err(read_error)?.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })
}

/// Checks that every key of `table` is a field of `T` (and of its tables, given in
/// `tables` as `(key, fields)`), naming the nearest valid key for a typo.
pub fn check_keys<'de, T: Deserialize<'de>>(
    path: &Path,
    table: &toml::Table,
    tables: &[(&str, &'static [&'static str])],
) -> Result<(), ConfigError> {
    check_table(path, table, field_names::<T>(), "")?;
    for (name, fields) in tables {
        if let Some(toml::Value::Table(inner)) = table.get(*name) {
            check_table(path, inner, fields, name)?;
        }
    }
    Ok(())
}

fn check_table(
    path: &Path,
    table: &toml::Table,
    fields: &[&str],
    section: &str,
) -> Result<(), ConfigError> {
    for key in table.keys() {
        if fields.contains(&key.as_str()) {
            continue;
        }
        let hint = match nearest(key, fields) {
            Some(near) => format!("; did you mean `{near}`?"),
            None => format!("; valid keys: {}", fields.join(", ")),
        };
        return Err(ConfigError::UnknownKey {
            path: path.to_owned(),
            key: key.clone(),
            section: if section.is_empty() {
                String::new()
            } else {
                format!(" in [{section}]")
            },
            hint,
        });
    }
    Ok(())
}

/// Turns a checked table into `T`, naming the file in a type error.
pub fn typed<T: serde::de::DeserializeOwned>(
    path: &Path,
    table: toml::Table,
) -> Result<T, ConfigError> {
    T::deserialize(table).map_err(|e| ConfigError::Invalid {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// The valid key closest to `word` by edit distance, if it is close enough to be a typo.
pub fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let (best, distance) = candidates
        .iter()
        .map(|c| (*c, edit_distance(word, c)))
        .min_by_key(|(_, d)| *d)?;
    // A third of the word may be wrong (relya → relay, token-file → token_file).
    (distance <= (word.len() / 3).max(2)).then_some(best)
}

/// Levenshtein distance over chars (keys are short: O(n·m) is nothing).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The field names of a struct `T` derives `Deserialize` for: serde hands them to the
/// deserializer, so a deserializer that only listens learns them (no list kept by hand).
pub fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Listener<'a>(&'a mut &'static [&'static str]);

    #[derive(Debug)]
    struct Heard;
    impl std::fmt::Display for Heard {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names taken")
        }
    }
    impl std::error::Error for Heard {}
    impl de::Error for Heard {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Heard
        }
    }

    impl<'de> Deserializer<'de> for Listener<'_> {
        type Error = Heard;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Heard> {
            Err(Heard)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Heard> {
            *self.0 = fields;
            Err(Heard)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Listener(&mut fields));
    fields
}

/// The agent's settings that a site or a user may also set in a file: one definition for
/// the `jobgate agent` flags (clap, flattened into `AgentArgs`) and the keys of
/// `jobgate.toml` (serde). Every key is the flag's name with `_` for `-`; a new setting is
/// one field here. `[launch]` holds `jobgate launch`'s defaults (no agent flag).
#[derive(Debug, Clone, Default, PartialEq, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Relay QUIC address, HOST:PORT; a cluster's relays separated by commas (the agent
    /// takes whichever answers, and another when its relay dies) [default: `relay` in the
    /// site's or your jobgate.toml].
    #[arg(long, env = "JOBGATE_RELAY")]
    pub relay: Option<String>,
    /// CA certificate (PEM) to trust for the relay instead of the system roots.
    #[arg(long, env = "JOBGATE_RELAY_CA")]
    pub relay_ca: Option<PathBuf>,
    /// File holding the token (mode 0600) [default: $JOBGATE_TOKEN_FILE, ~/.config/jobgate/token].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// How the URL is guarded: owner (only you, and whom you --share it with, after the
    /// site's single sign-on at the relay), link (a private link with an access key) or
    /// public (the app's own login only, where the relay allows it) [default: owner where
    /// the relay has single sign-on, else link].
    #[arg(long, value_name = "owner|link|public", value_parser = parse_access_mode)]
    pub access: Option<jobgate_protocol::AccessMode>,
    /// Seconds the app has to accept connections [default: 300].
    #[arg(long)]
    pub ready_timeout: Option<u64>,
    /// Seconds of silence before the relay counts as gone [default: 30].
    #[arg(long)]
    pub idle_timeout: Option<u64>,
    /// How to reach the relay: quic, tcp (TLS over TCP to the relay's HTTPS port, through
    /// an HTTP proxy where HTTPS_PROXY/ALL_PROXY or --proxy names one), or auto (QUIC,
    /// and TCP when no QUIC answer comes within 3 s: UDP blocked) [default: auto].
    #[arg(long, value_name = "auto|quic|tcp", value_parser = parse_transport)]
    pub transport: Option<jobgate_agent::dial::TransportChoice>,
    /// The relay's TLS endpoint for the TCP transport, HOST:PORT [default: the --relay
    /// host, port 443].
    #[arg(long, value_name = "HOST:PORT")]
    pub relay_tcp: Option<String>,
    /// HTTP proxy for the TCP transport, http://[user:password@]host:port [default:
    /// HTTPS_PROXY, ALL_PROXY and NO_PROXY from the environment, as curl reads them].
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    /// Seconds between tries of QUIC while on TCP under --transport auto [default: 30].
    #[arg(long, value_name = "SECS")]
    pub quic_reprobe: Option<u64>,
    /// The `jupyter` program for --jupyter [default: `jupyter` on PATH].
    #[arg(long, env = "JOBGATE_JUPYTER", value_name = "PATH")]
    pub jupyter_program: Option<String>,
    /// Defaults of `jobgate launch`.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "LaunchDefaults::is_empty")]
    pub launch: LaunchDefaults,
}

/// `--transport`: auto, quic or tcp.
fn parse_transport(text: &str) -> Result<jobgate_agent::dial::TransportChoice, String> {
    text.parse()
}

/// `--access`: the same words as the wire and the config files.
fn parse_access_mode(text: &str) -> Result<jobgate_protocol::AccessMode, String> {
    use jobgate_protocol::AccessMode;
    match text {
        "owner" => Ok(AccessMode::Owner),
        "link" => Ok(AccessMode::Link),
        "public" => Ok(AccessMode::Public),
        _ => Err(format!("{text:?}: expected owner, link or public")),
    }
}

/// The `[launch]` table: defaults of `jobgate launch`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchDefaults {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--time`.
    pub time: Option<String>,
    /// `--cpus`.
    pub cpus: Option<u32>,
    /// `--mem`.
    pub mem: Option<String>,
    /// `--gpus`.
    pub gpus: Option<String>,
    /// `--template`.
    pub template: Option<PathBuf>,
    /// `--sif`.
    pub sif: Option<PathBuf>,
    /// `--sif-option` (each one word).
    pub sif_option: Option<Vec<String>>,
}

impl ClientConfig {
    /// The settings in force: `$JOBGATE_CONFIG` alone, or the user's file over the site's.
    /// Missing files are no error; broken ones are.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(&Self::files())
    }

    /// The files read, least important first.
    pub fn files() -> Vec<PathBuf> {
        if let Some(one) = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            return vec![PathBuf::from(one)];
        }
        let mut files = vec![PathBuf::from(SITE_CONFIG)];
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            files.push(PathBuf::from(home).join(USER_CONFIG));
        }
        files
    }

    /// Reads `files` (least important first); a file named by `$JOBGATE_CONFIG` must exist.
    pub fn load_from(files: &[PathBuf]) -> Result<Self, ConfigError> {
        let explicit = std::env::var_os(CONFIG_ENV).is_some_and(|v| !v.is_empty());
        let mut merged = Self::default();
        for path in files {
            if !explicit && !path.exists() {
                continue;
            }
            merged = Self::read(path)?.over(merged)?;
        }
        Ok(merged)
    }

    /// One file, strictly.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let table = read_table(path)?;
        check_keys::<Self>(path, &table, &[("launch", field_names::<LaunchDefaults>())])?;
        typed(path, table)
    }

    /// `self`'s settings, falling back to `lower`'s where `self` has none: generic over
    /// the fields (both as TOML tables, `[launch]` merged key by key), so a new setting
    /// needs no line here.
    pub fn over(self, lower: Self) -> Result<Self, ConfigError> {
        // Both tables come from this type: only a bug could make them fail.
        let merge = |e: &dyn std::fmt::Display| ConfigError::Merge(e.to_string());
        let mut merged = toml::Table::try_from(lower).map_err(|e| merge(&e))?;
        overlay(
            &mut merged,
            toml::Table::try_from(self).map_err(|e| merge(&e))?,
        );
        merged.try_into().map_err(|e| merge(&e))
    }
}

impl LaunchDefaults {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Puts `upper`'s keys over `lower`'s, table by table.
fn overlay(lower: &mut toml::Table, upper: toml::Table) {
    for (key, value) in upper {
        match (lower.get_mut(&key), value) {
            (Some(toml::Value::Table(below)), toml::Value::Table(above)) => overlay(below, above),
            (_, value) => {
                lower.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("jobgate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn field_names_come_from_serde() {
        assert!(field_names::<ClientConfig>().contains(&"relay_ca"));
        assert!(field_names::<ClientConfig>().contains(&"launch"));
        assert!(field_names::<LaunchDefaults>().contains(&"partition"));
    }

    #[test]
    fn the_user_file_wins_over_the_site_file() {
        let site = file(
            "site.toml",
            "relay = \"relay.site:7443\"\naccess = \"link\"\n[launch]\npartition = \"interactive\"\ntime = \"4:00:00\"\n",
            0o644,
        );
        let user = file(
            "user.toml",
            "relay = \"mine:7443\"\n[launch]\ntime = \"1:00:00\"\n",
            0o600,
        );
        let config = ClientConfig::read(&user)
            .expect("user")
            .over(ClientConfig::read(&site).expect("site"))
            .expect("merge");
        assert_eq!(config.relay.as_deref(), Some("mine:7443"));
        assert_eq!(config.access, Some(jobgate_protocol::AccessMode::Link));
        assert_eq!(config.launch.partition.as_deref(), Some("interactive"));
        assert_eq!(config.launch.time.as_deref(), Some("1:00:00"));
    }

    #[test]
    fn bad_files_get_errors_that_name_the_file_and_the_key() {
        let typo = file("typo.toml", "relya = \"x:1\"\n", 0o600);
        let message = ClientConfig::read(&typo).expect_err("typo").to_string();
        assert!(message.contains("typo.toml"), "{message}");
        assert!(message.contains("unknown key `relya`"), "{message}");
        assert!(message.contains("did you mean `relay`?"), "{message}");

        let nested = file("nested.toml", "[launch]\npartiton = \"x\"\n", 0o600);
        let message = ClientConfig::read(&nested).expect_err("nested").to_string();
        assert!(message.contains("in [launch]"), "{message}");
        assert!(message.contains("`partition`"), "{message}");

        let far = file("far.toml", "zzzzzzzzzz = 1\n", 0o600);
        let message = ClientConfig::read(&far).expect_err("far").to_string();
        assert!(message.contains("valid keys: relay,"), "{message}");

        let wrong_type = file("type.toml", "ready_timeout = \"soon\"\n", 0o600);
        let message = ClientConfig::read(&wrong_type)
            .expect_err("type")
            .to_string();
        assert!(message.contains("type.toml"), "{message}");
        assert!(message.contains("ready_timeout"), "{message}");

        let wrong_value = file("value.toml", "access = \"everyone\"\n", 0o600);
        let message = ClientConfig::read(&wrong_value)
            .expect_err("value")
            .to_string();
        assert!(message.contains("everyone"), "{message}");

        let syntax = file("syntax.toml", "relay = \n", 0o600);
        let message = ClientConfig::read(&syntax).expect_err("syntax").to_string();
        assert!(message.contains("syntax.toml"), "{message}");

        let writable = file("writable.toml", "relay = \"x:1\"\n", 0o664);
        let message = ClientConfig::read(&writable).expect_err("mode").to_string();
        assert!(message.contains("writable by group or others"), "{message}");
    }

    #[test]
    fn typos_find_their_key() {
        let keys = ["relay", "relay_ca", "token_file", "ready_timeout"];
        assert_eq!(nearest("token-file", &keys), Some("token_file"));
        assert_eq!(nearest("relay-ca", &keys), Some("relay_ca"));
        assert_eq!(nearest("readytimeout", &keys), Some("ready_timeout"));
        assert_eq!(nearest("partition", &keys), None);
    }
}
