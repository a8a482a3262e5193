//! Test PKI made in the test with rcgen: a CA and the certificates it issues.

use std::path::Path;
use std::process::Command;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A certificate authority for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// An issued certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// SHA-256 of the leaf DER, lower-case hex (as tandem reports it).
    pub fingerprint: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "tandem test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A leaf for `names`, valid from `from_days` to `to_days` relative to now.
    pub fn issue_valid(&self, names: &[&str], from_days: i64, to_days: i64) -> Issued {
        self.issue_between(names, time::Duration::days(from_days), time::Duration::days(to_days))
    }

    /// A leaf for `names`, valid from `from` to `to` relative to now (e.g. one
    /// that expires in hours).
    pub fn issue_between(&self, names: &[&str], from: time::Duration, to: time::Duration) -> Issued {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, "tandem test leaf");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + from;
        params.not_after = now + to;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let fingerprint = tandem_shared::certs::primitives::inspect(cert.der(), "test").unwrap().fingerprint;
        // A full chain: leaf then CA.
        Issued { cert_pem: format!("{}{}", cert.pem(), self.pem), key_pem: key.serialize_pem(), fingerprint }
    }

    /// A leaf for localhost and 127.0.0.1, valid for 90 days.
    pub fn issue(&self) -> Issued {
        self.issue_valid(&["localhost", "127.0.0.1"], -1, 90)
    }
}

impl Issued {
    /// Writes the chain and key to `dir/cert` and `dir/key`.
    pub fn write(&self, dir: &Path, cert: &str, key: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(cert), &self.cert_pem).unwrap();
        std::fs::write(dir.join(key), &self.key_pem).unwrap();
    }
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("bash").arg("-c").arg(script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
}

/// With the openssl CLI, in `dir`: a CA `ca` and a client certificate `name`
/// it signs (CN=name, SAN DNS:name.example, clientAuth), as `.pem` and `.key`.
pub fn ca_and_client(dir: &Path, ca: &str, name: &str) {
    ca_and_client_named(dir, ca, name, &format!("/CN={name}"));
}

/// [`ca_and_client`] with the client's subject given as openssl's `-subj` takes it.
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn ca_and_client_named(dir: &Path, ca: &str, name: &str, subject: &str) {
    let subject = subject.replace('\'', "'\\''");
    sh(
        dir,
        &format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {ca}.key -out {ca}.pem \
               -subj /CN={ca} -days 2 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null && \
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}.key -out {name}.csr -subj '{subject}' 2>/dev/null && \
             printf 'subjectAltName=DNS:{name}.example\\nextendedKeyUsage=clientAuth\\n' > {name}.ext && \
             openssl x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -out {name}.pem -days 1 -extfile {name}.ext 2>/dev/null"
        ),
    );
}
