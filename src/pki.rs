//! Throw-away certificates for the demo, tests and trying jobgate out: a private CA and a
//! wildcard leaf for `*.<domain>` (plus `localhost` and 127.0.0.1, where agents dial).

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use std::path::{Path, PathBuf};

/// Files written by [`write_dev_pki`].
pub struct DevPki {
    /// The CA certificate: give it to curl (`--cacert`), browsers and agents (`--relay-ca`).
    pub ca: PathBuf,
    /// The wildcard certificate for the relay (`--cert`).
    pub cert: PathBuf,
    /// Its key (`--key`), mode 0600.
    pub key: PathBuf,
}

/// Writes `ca.pem`, `cert.pem` and `key.pem` for `domain` into `dir`.
pub fn write_dev_pki(domain: &str, dir: &Path) -> anyhow::Result<DevPki> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "jobgate development CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;

    let names = vec![
        format!("*.{domain}"),
        domain.to_owned(),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    let mut leaf_params = CertificateParams::new(names)?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, format!("*.{domain}"));
    let leaf_key = KeyPair::generate()?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key)?;

    let pki = DevPki {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&pki.ca, ca.pem())?;
    std::fs::write(&pki.cert, leaf.pem())?;
    jobgate_agent::token::write_private(&pki.key, &leaf_key.serialize_pem())?;
    Ok(pki)
}
