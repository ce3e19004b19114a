//! The cluster CA, node certificates, and the rustls configurations for mutual TLS.
//!
//! Every cluster has its own certificate authority. [`ca_init`] writes `ca.crt` and
//! `ca.key` into the cluster's TLS folder; [`ca_issue`] writes `node-<N>.crt` and
//! `node-<N>.key` for node `N`, signed by that CA. These are what `concord ca init DIR`
//! and `concord ca issue DIR --node N` do.
//!
//! # What a node certificate says
//!
//! * subject alternative name: the DNS name `node-<N>.concord` ([`node_dns_name`]). This
//!   is the authoritative statement of the node id; [`cert_node_id`] reads it back, and a
//!   certificate must carry exactly one such name.
//! * subject CN `concord-node-<N>` ([`node_common_name`]) and O `<cluster name>`, for
//!   people reading the certificate (`openssl x509 -text`); not used for decisions.
//! * extended key usage serverAuth and clientAuth: a node is both client and server.
//! * validity from 1975 to 4096 (rcgen's defaults): rotation is by re-issuing, not by
//!   expiry. Keys are ECDSA P-256.
//!
//! # Mutual TLS
//!
//! [`server_config`] and [`client_config`] build rustls configurations (TLS 1.3 only,
//! ring provider, ALPN [`ALPN`]) in which the cluster CA is the only trust root and both
//! sides must present a certificate chaining to it. The dialing side also checks the
//! server name `node-<N>.concord` of the node it means to reach. After the handshake the
//! transport reads the peer's id from its certificate with [`cert_node_id`] and refuses
//! the connection unless it equals the id the peer claims in its hello frame.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::ClusterConfig;

/// ALPN protocol id of the DLM peer protocol, version 1.
pub const ALPN: &[u8] = b"concord-dlm/1";
/// File name of the CA certificate in the TLS folder.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key in the TLS folder.
pub const CA_KEY_FILE: &str = "ca.key";
/// Suffix of a node's DNS name: `node-<N>` + this.
pub const NODE_DNS_SUFFIX: &str = ".concord";

/// `node-<id>.crt`.
pub fn node_cert_file(id: u32) -> String {
    format!("node-{id}.crt")
}

/// `node-<id>.key`.
pub fn node_key_file(id: u32) -> String {
    format!("node-{id}.key")
}

/// `node-<id>.concord`: the DNS subject alternative name naming node `id`, and the
/// server name a dialer expects.
pub fn node_dns_name(id: u32) -> String {
    format!("node-{id}{NODE_DNS_SUFFIX}")
}

/// `concord-node-<id>`: the subject common name of node `id`'s certificate.
pub fn node_common_name(id: u32) -> String {
    format!("concord-node-{id}")
}

/// Errors of CA and certificate handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists (use --force to overwrite)")]
    Exists { path: PathBuf },
    #[error("{path}: not a usable PEM file: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS configuration: {0}")]
    Verifier(String),
    /// A certificate that does not name exactly one node.
    #[error("certificate does not identify a node: {0}")]
    NoNodeId(String),
    /// A certificate file that names another node than the one it is loaded for.
    #[error("{path} names node {found}, expected node {expected}")]
    WrongNode { path: PathBuf, expected: u32, found: u32 },
    #[error("node id 0 is reserved")]
    ZeroNode,
}

/// Paths written by [`ca_init`] or [`ca_issue`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates a new cluster CA: writes `<dir>/ca.crt` and `<dir>/ca.key` (mode 0600),
/// creating `dir` if needed. Refuses to overwrite either file unless `force`.
pub fn ca_init(dir: &Path, cluster: &str, force: bool) -> Result<IssuedFiles, TlsError> {
    let files = IssuedFiles { cert: dir.join(CA_CERT_FILE), key: dir.join(CA_KEY_FILE) };
    check_absent(&files, force)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, format!("concord cluster CA {cluster}"));
    params.distinguished_name.push(DnType::OrganizationName, cluster);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key)?;
    create_dir(dir)?;
    write_file(&files.key, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&files.cert, cert.pem().as_bytes(), 0o644, force)?;
    Ok(files)
}

/// Issues node `node`'s certificate with the CA in `dir`: writes `<dir>/node-<N>.crt`
/// and `<dir>/node-<N>.key` (mode 0600). Refuses to overwrite unless `force`.
pub fn ca_issue(dir: &Path, node: u32, force: bool) -> Result<IssuedFiles, TlsError> {
    if node == 0 {
        return Err(TlsError::ZeroNode);
    }
    let files = IssuedFiles { cert: dir.join(node_cert_file(node)), key: dir.join(node_key_file(node)) };
    check_absent(&files, force)?;
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_cert_pem = read_string(&ca_cert_path)?;
    let ca_key_pem = read_string(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| TlsError::Pem { path: ca_key_path.clone(), message: e.to_string() })?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_cert_pem)
        .map_err(|e| TlsError::Pem { path: ca_cert_path.clone(), message: e.to_string() })?;
    let organization = ca_params.distinguished_name.get(&DnType::OrganizationName).cloned();
    // Re-signing the CA's own parameters with its key gives an issuer with the same
    // subject name and key as ca.crt, which is all a signature chain needs.
    let ca = ca_params.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![node_dns_name(node)])?;
    params.distinguished_name.push(DnType::CommonName, node_common_name(node));
    if let Some(o) = organization {
        params.distinguished_name.push(DnType::OrganizationName, o);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write_file(&files.key, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&files.cert, cert.pem().as_bytes(), 0o644, force)?;
    Ok(files)
}

/// The node id a certificate names: the `N` of its one `node-<N>.concord` DNS subject
/// alternative name. Errors if the certificate cannot be parsed or names no node or
/// several.
pub fn cert_node_id(cert: &CertificateDer<'_>) -> Result<u32, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::NoNodeId(format!("unparsable certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::NoNodeId(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| TlsError::NoNodeId("no subjectAltName".into()))?;
    let mut found = None;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
            if let Some(id) = parse_node_dns_name(dns) {
                if found.is_some_and(|f| f != id) {
                    return Err(TlsError::NoNodeId(format!(
                        "names several nodes ({} and {id})",
                        found.unwrap_or_default()
                    )));
                }
                found = Some(id);
            } else if dns.ends_with(NODE_DNS_SUFFIX) {
                return Err(TlsError::NoNodeId(format!("unexpected DNS name {dns:?}")));
            }
        }
    }
    found.ok_or_else(|| TlsError::NoNodeId("no node-<N>.concord DNS name".into()))
}

/// `node-<N>.concord` → `Some(N)` for a canonical non-zero decimal `N`.
fn parse_node_dns_name(dns: &str) -> Option<u32> {
    let digits = dns.strip_prefix("node-")?.strip_suffix(NODE_DNS_SUFFIX)?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What a node needs for mutual TLS: the CA certificate (the only trust root), its own
/// certificate chain and private key.
#[derive(Debug)]
pub struct NodeIdentity {
    /// The node id the certificate names.
    pub node: u32,
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl NodeIdentity {
    /// Loads PEM files and checks that the node certificate names node `node`.
    pub fn load(ca_cert: &Path, node_cert: &Path, node_key: &Path, node: u32) -> Result<NodeIdentity, TlsError> {
        let pem_err = |path: &Path| {
            let path = path.to_path_buf();
            move |e: rustls::pki_types::pem::Error| match e {
                rustls::pki_types::pem::Error::Io(source) => TlsError::Io { path, source },
                e => TlsError::Pem { path, message: e.to_string() },
            }
        };
        let ca = CertificateDer::from_pem_file(ca_cert).map_err(pem_err(ca_cert))?;
        let chain = CertificateDer::pem_file_iter(node_cert)
            .map_err(pem_err(node_cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err(node_cert))?;
        let key = PrivateKeyDer::from_pem_file(node_key).map_err(pem_err(node_key))?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::Pem { path: node_cert.to_path_buf(), message: "no certificate in file".into() });
        };
        let found = cert_node_id(leaf)?;
        if found != node {
            return Err(TlsError::WrongNode { path: node_cert.to_path_buf(), expected: node, found });
        }
        Ok(NodeIdentity { node, ca, chain, key })
    }

    /// Loads node `node`'s files from the configuration's TLS folder.
    pub fn from_config(cfg: &ClusterConfig, node: u32) -> Result<NodeIdentity, TlsError> {
        Self::load(&cfg.ca_cert_path(), &cfg.node_cert_path(node), &cfg.node_key_path(node), node)
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server configuration: TLS 1.3, ALPN [`ALPN`], a client certificate chaining
/// to the cluster CA required.
pub fn server_config(id: &NodeIdentity) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots()?, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// A rustls client configuration: TLS 1.3, ALPN [`ALPN`], the cluster CA as the only
/// root, presenting this node's certificate. Connect with server name
/// [`node_dns_name`]`(peer)`.
pub fn client_config(id: &NodeIdentity) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

fn check_absent(files: &IssuedFiles, force: bool) -> Result<(), TlsError> {
    if force {
        return Ok(());
    }
    for path in [&files.cert, &files.key] {
        if path.exists() {
            return Err(TlsError::Exists { path: path.clone() });
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io { path: dir.to_path_buf(), source })
}

fn read_string(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io { path: path.to_path_buf(), source })
}

/// Writes `bytes` to a fresh temporary file with `mode`, syncs it and renames it over
/// `path`; without `force` the final step refuses an existing `path`.
fn write_file(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Io { path: path.to_path_buf(), source };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io)?;
    let result = f.write_all(bytes).and_then(|()| f.sync_all());
    drop(f);
    let result = result.and_then(|()| {
        if force {
            std::fs::rename(&tmp, path)
        } else {
            // A hard link fails if `path` exists, unlike rename.
            std::fs::hard_link(&tmp, path).and_then(|()| std::fs::remove_file(&tmp))
        }
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            return Err(TlsError::Exists { path: path.to_path_buf() });
        }
        return Err(io(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_init_and_issue_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_init(dir.path(), "alpha", false).unwrap();
        let mode = std::fs::metadata(&ca.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(ca_init(dir.path(), "alpha", false), Err(TlsError::Exists { .. })));
        let n = ca_issue(dir.path(), 3, false).unwrap();
        assert_eq!(n.cert, dir.path().join("node-3.crt"));
        let mode = std::fs::metadata(&n.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(ca_issue(dir.path(), 3, false), Err(TlsError::Exists { .. })));
        ca_issue(dir.path(), 3, true).unwrap();

        let id = NodeIdentity::load(&ca.cert, &n.cert, &n.key, 3).unwrap();
        assert_eq!(cert_node_id(&id.chain[0]).unwrap(), 3);
        server_config(&id).unwrap();
        client_config(&id).unwrap();
        assert!(matches!(
            NodeIdentity::load(&ca.cert, &n.cert, &n.key, 2),
            Err(TlsError::WrongNode { expected: 2, found: 3, .. })
        ));
        // The CA certificate names no node.
        assert!(matches!(cert_node_id(&id.ca), Err(TlsError::NoNodeId(_))));
    }

    #[test]
    fn issue_without_ca_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = ca_issue(dir.path(), 1, false).unwrap_err();
        assert!(e.to_string().contains("ca.crt"), "{e}");
        assert!(matches!(ca_issue(dir.path(), 0, false), Err(TlsError::ZeroNode)));
    }

    #[test]
    fn node_dns_names_parse_strictly() {
        assert_eq!(parse_node_dns_name(&node_dns_name(42)), Some(42));
        assert_eq!(parse_node_dns_name("node-042.concord"), None);
        assert_eq!(parse_node_dns_name("node-0.concord"), None);
        assert_eq!(parse_node_dns_name("node-.concord"), None);
        assert_eq!(parse_node_dns_name("node-+1.concord"), None);
        assert_eq!(parse_node_dns_name("node-99999999999.concord"), None);
        assert_eq!(parse_node_dns_name("node-1.example"), None);
    }
}
