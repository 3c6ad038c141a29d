//! Certificates made at test time: a CA, server and client certificates it signs (for
//! `localhost` and 127.0.0.1), expired server and client certificates, and a second, unrelated
//! CA.
//! Written as PEM files into a directory the test owns.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// A CA that signs certificates into one directory.
pub struct TestCa {
    /// The CA's certificate (PEM): what clients and servers trust.
    pub cert: PathBuf,
    dir: PathBuf,
    name: String,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

fn rc(e: rcgen::Error) -> io::Error {
    io::Error::other(e)
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `dir/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> io::Result<Self> {
        let key = KeyPair::generate().map_err(rc)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let cert = params.self_signed(&key).map_err(rc)?;
        let path = dir.join(format!("{name}-ca.pem"));
        fs::write(&path, cert.pem())?;
        Ok(Self {
            cert: path,
            dir: dir.to_owned(),
            name: name.to_owned(),
            ca: cert,
            ca_key: key,
        })
    }

    /// Where [`TestCa::server`] and the others write the certificate named `file`.
    pub fn server_path(&self, file: &str) -> PathBuf {
        self.dir.join(format!("{file}.pem"))
    }

    /// Where they write its key.
    pub fn key_path(&self, file: &str) -> PathBuf {
        self.dir.join(format!("{file}.key"))
    }

    /// A server certificate for `localhost` and 127.0.0.1, valid now.
    pub fn server(&self, file: &str) -> io::Result<Pair> {
        self.sign(file, ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    /// A server certificate that expired in 2021.
    pub fn expired_server(&self, file: &str) -> io::Result<Pair> {
        self.sign(file, ExtendedKeyUsagePurpose::ServerAuth, true)
    }

    /// A client certificate.
    pub fn client(&self, file: &str) -> io::Result<Pair> {
        self.sign(file, ExtendedKeyUsagePurpose::ClientAuth, false)
    }

    /// A client certificate that expired in 2021.
    pub fn expired_client(&self, file: &str) -> io::Result<Pair> {
        self.sign(file, ExtendedKeyUsagePurpose::ClientAuth, true)
    }

    fn sign(&self, file: &str, usage: ExtendedKeyUsagePurpose, expired: bool) -> io::Result<Pair> {
        let key = KeyPair::generate().map_err(rc)?;
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let mut params = CertificateParams::new(names).map_err(rc)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{} {file}", self.name));
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).map_err(rc)?;
        let pair = Pair {
            cert: self.server_path(file),
            key: self.key_path(file),
        };
        fs::write(&pair.cert, cert.pem())?;
        fs::write(&pair.key, key.serialize_pem())?;
        Ok(pair)
    }
}

/// A site's CA (`ca`, named "site") and an unrelated one (`other`), in a temporary directory of
/// their own (`dir`, removed when this is dropped): what a TLS test trusts and what it must not.
#[derive(Debug)]
pub struct TwoCas {
    /// Where the certificates are written.
    pub dir: tempfile::TempDir,
    /// The CA the test's servers and clients trust.
    pub ca: TestCa,
    /// A CA nobody trusts.
    pub other: TestCa,
}

impl TwoCas {
    /// Both CAs, in a new temporary directory.
    pub fn new() -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        Ok(Self {
            ca: TestCa::new(dir.path(), "site")?,
            other: TestCa::new(dir.path(), "other")?,
            dir,
        })
    }
}
