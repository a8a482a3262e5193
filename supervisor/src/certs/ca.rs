//! `SSL_CERTIFICATE=CA`: a private CA in the cache (`tandem ca init`: a root
//! for ten years, an intermediate for one) issuing short-lived leaves for this
//! server, renewed at two thirds of their lifetime; and the `tandem ca`
//! commands (`init`, `status`, `export`, `issue`).
//!
//! The root's key is only needed to make an intermediate: it can be moved
//! offline after `init`, and the intermediate goes on issuing.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use serde::Serialize;
use tandem_config::certs::KeyType;
use tandem_config::Config;
use tandem_shared::certs::cache::{self, CertCache, Layout};
use tandem_shared::certs::primitives::{self, Bundle, CertError};
use tandem_shared::certs::status::{unix_now, CertInfo};

use super::{Obtained, Obtaining, Refresh, Source, SourceError};

const DAY: u64 = 86400;
/// Lifetime of the root made by `tandem ca init`.
const ROOT_LIFETIME: Duration = Duration::from_secs(3650 * DAY);
/// Lifetime of the intermediate that issues the leaves.
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(365 * DAY);
/// Warn when the intermediate has less than this left: leaves cannot outlive it.
const INTERMEDIATE_WARN: i64 = 30 * DAY as i64;

const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root.key";
const INTERMEDIATE_CERT: &str = "intermediate.pem";
const INTERMEDIATE_KEY: &str = "intermediate.key";

fn gen_err(e: rcgen::Error) -> SourceError {
    SourceError::Ca(format!("cannot make a certificate: {e}"))
}

fn ca_missing(layout: &Layout) -> SourceError {
    SourceError::Ca(format!(
        "SSL_CERTIFICATE=CA but there is no private CA in {}\nhint: run `tandem ca init` once with the same MODEL_CACHE_DIR (it makes the root and the intermediate)",
        layout.ca_dir().display()
    ))
}

/// The private CA as found in the cache: the intermediate issues, the root is shown.
#[derive(Debug)]
pub struct Ca {
    root_pem: String,
    root: CertInfo,
    intermediate_pem: String,
    intermediate: CertInfo,
    intermediate_key: String,
    root_key_present: bool,
}

fn read(path: &Path) -> Result<String, SourceError> {
    let bytes = primitives::read_pem_file(path)?;
    String::from_utf8(bytes).map_err(|_| SourceError::Ca(format!("{} is not PEM text", path.display())))
}

fn info_of(pem: &str, path: &Path) -> Result<CertInfo, SourceError> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| SourceError::Ca(format!("{}: {e}", path.display())))?;
    Ok(primitives::inspect(&der, &path.display().to_string())?)
}

impl Ca {
    /// Whether `tandem ca init` has been run for this cache.
    pub fn exists(layout: &Layout) -> bool {
        layout.ca_file(INTERMEDIATE_CERT).exists() || layout.ca_file(ROOT_CERT).exists()
    }

    /// Loads the CA; the root's key may be absent (moved offline).
    pub fn load(layout: &Layout) -> Result<Ca, SourceError> {
        if !Ca::exists(layout) {
            return Err(ca_missing(layout));
        }
        // The same rules as `tandem ca init`: no symlinked, foreign or shared folder holds the keys.
        cache::check_private(layout.dir())?;
        cache::check_private(&layout.ca_dir())?;
        let path = |n: &str| layout.ca_file(n);
        let root_pem = read(&path(ROOT_CERT))?;
        let intermediate_pem = read(&path(INTERMEDIATE_CERT))?;
        let intermediate_key = read(&path(INTERMEDIATE_KEY))?;
        let ca = Ca {
            root: info_of(&root_pem, &path(ROOT_CERT))?,
            intermediate: info_of(&intermediate_pem, &path(INTERMEDIATE_CERT))?,
            root_pem,
            intermediate_pem,
            intermediate_key,
            root_key_present: path(ROOT_KEY).exists(),
        };
        let now = unix_now();
        if ca.intermediate.not_after <= now {
            return Err(SourceError::Ca(format!(
                "the CA's intermediate {} expired at unix time {}\nhint: put the root key back as {} and run `tandem ca init --intermediate`",
                path(INTERMEDIATE_CERT).display(),
                ca.intermediate.not_after,
                path(ROOT_KEY).display()
            )));
        }
        Ok(ca)
    }

    /// Makes a new root and intermediate (`tandem ca init`), or with
    /// `intermediate_only` a new intermediate under the existing root (whose
    /// key must be present). Keys are 0600 from their first byte.
    pub fn init(cache: &CertCache, intermediate_only: bool) -> Result<Ca, SourceError> {
        let layout = cache.layout().clone();
        cache.private_dir(cache::CA_DIR)?;
        let write = |name: &str, text: &str| {
            cache.write_secret(&format!("{}/{name}", cache::CA_DIR), text.as_bytes()).map_err(SourceError::from)
        };
        let root = if intermediate_only {
            let key_path = layout.ca_file(ROOT_KEY);
            if !key_path.exists() {
                return Err(SourceError::Ca(format!(
                    "a new intermediate needs the root's key at {}\nhint: copy the root key back from where it is kept offline",
                    key_path.display()
                )));
            }
            let key = KeyPair::from_pem(&read(&key_path)?).map_err(gen_err)?;
            Issuer::from_ca_cert_pem(&read(&layout.ca_file(ROOT_CERT))?, key).map_err(gen_err)?
        } else {
            if Ca::exists(&layout) {
                return Err(SourceError::Ca(format!(
                    "a CA already exists in {}; tandem does not overwrite it\nhint: `tandem ca init --intermediate` makes a new intermediate under the same root",
                    layout.ca_dir().display()
                )));
            }
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
            let mut params = ca_params(&format!("tandem root CA ({})", host_name()), ROOT_LIFETIME, 1)?;
            params.key_usages.push(KeyUsagePurpose::CrlSign);
            let cert = params.self_signed(&key).map_err(gen_err)?;
            write(ROOT_KEY, &key.serialize_pem())?;
            write(ROOT_CERT, &cert.pem())?;
            Issuer::new(params, key)
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = ca_params(&format!("tandem intermediate CA ({})", host_name()), INTERMEDIATE_LIFETIME, 0)?;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &root).map_err(gen_err)?;
        write(INTERMEDIATE_KEY, &key.serialize_pem())?;
        write(INTERMEDIATE_CERT, &cert.pem())?;
        Ca::load(&layout)
    }

    /// A leaf for `names`, valid for `validity` (never past the intermediate),
    /// for servers and, with `client`, for clients too (mTLS).
    pub fn issue(
        &self,
        names: &[String],
        validity: Duration,
        key_type: KeyType,
        client: bool,
    ) -> Result<Bundle, SourceError> {
        let key = match key_type {
            KeyType::Rsa2048 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048),
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        }
        .map_err(gen_err)?;
        let mut params = CertificateParams::default();
        for n in names {
            params.subject_alt_names.push(match Identity::of(n) {
                Some(Identity::Ip(ip)) => SanType::IpAddress(ip),
                Some(Identity::Email) => SanType::Rfc822Name(n.clone().try_into().map_err(gen_err)?),
                Some(Identity::Uri) => SanType::URI(n.clone().try_into().map_err(gen_err)?),
                Some(Identity::Dns) | None => SanType::DnsName(n.clone().try_into().map_err(gen_err)?),
            });
        }
        // X.509 caps a common name at 64 characters (a SPIFFE ID may be longer).
        let cn = names.first().filter(|n| n.len() <= 64).cloned().unwrap_or_else(|| "tandem".into());
        params.distinguished_name.push(DnType::CommonName, cn);
        params.distinguished_name.push(DnType::OrganizationName, "tandem");
        let now = time::OffsetDateTime::now_utc();
        let until = time::OffsetDateTime::from_unix_timestamp(self.intermediate.not_after)
            .map_err(|e| SourceError::Ca(e.to_string()))?;
        // Back-dated for clocks a little behind, by at most a sixth of the
        // lifetime, so that renewal at two thirds always lies in the future.
        let backdate = Duration::from_secs(300).min(validity / 6);
        let span = |d: Duration| time::Duration::try_from(d).map_err(|e| SourceError::Ca(e.to_string()));
        params.not_before = now - span(backdate)?;
        params.not_after = (now + span(validity)?).min(until);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if key_type == KeyType::Rsa2048 {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if client {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        let signer = KeyPair::from_pem(&self.intermediate_key).map_err(gen_err)?;
        let issuer = Issuer::from_ca_cert_pem(&self.intermediate_pem, signer).map_err(gen_err)?;
        let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
        let chain = format!("{}{}", cert.pem(), self.intermediate_pem);
        Ok(Bundle::parse(chain.as_bytes(), key.serialize_pem().as_bytes(), "a leaf from the private CA")?)
    }
}

/// What a `--san` names: a DNS name, an IP address, an email address
/// (`rfc822Name`) or a URI (`spiffe://trust.domain/ns/app`, a service identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// A DNS name.
    Dns,
    /// An IP address.
    Ip(IpAddr),
    /// An email address.
    Email,
    /// A URI with a scheme.
    Uri,
}

impl Identity {
    /// What `n` is, or `None` when it is none of them.
    pub fn of(n: &str) -> Option<Identity> {
        if let Ok(ip) = n.parse::<IpAddr>() {
            return Some(Identity::Ip(ip));
        }
        let printable = !n.is_empty() && n.len() <= 2048 && n.bytes().all(|b| b.is_ascii_graphic());
        if let Some((scheme, rest)) = n.split_once("://") {
            let scheme_ok = scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            return (printable && scheme_ok && !rest.is_empty()).then_some(Identity::Uri);
        }
        if let Some((local, domain)) = n.rsplit_once('@') {
            let ok =
                printable && !local.is_empty() && !local.contains('@') && tandem_config::values::is_dns_name(domain);
            return ok.then_some(Identity::Email);
        }
        tandem_config::values::is_dns_name(n).then_some(Identity::Dns)
    }
}

fn ca_params(name: &str, lifetime: Duration, path_len: u8) -> Result<CertificateParams, SourceError> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationName, "tandem");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::try_from(lifetime).map_err(|e| SourceError::Ca(e.to_string()))?;
    Ok(params)
}

fn host_name() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// The names a CA-mode leaf is for: `HOST` when it names one, the machine's
/// name and addresses, `localhost` and loopback, and `SSL_SAN`.
pub fn server_names(config: &Config) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    let mut add = |n: String| {
        if !n.is_empty() && !names.contains(&n) {
            names.push(n);
        }
    };
    if !config.listen.host.is_unspecified() {
        add(config.listen.host.to_string());
    }
    let host = host_name();
    if tandem_config::values::is_dns_name(&host) {
        add(host);
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let ip = a.address.as_ref().and_then(|s| {
                s.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            });
            // Link-local IPv6 addresses need a zone to be dialled: not useful in a certificate.
            if let Some(ip) = ip.filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)) {
                add(ip.to_string());
            }
        }
    }
    for n in &config.certs.san {
        add(n.clone());
    }
    names
}

/// The CA-mode source: leaves for this server from the private CA.
#[derive(Debug)]
pub struct CaLeaves {
    names: Vec<String>,
    validity: Duration,
    key_type: KeyType,
}

impl CaLeaves {
    /// For this server's names, `SSL_CERT_VALIDITY` and `SSL_KEY_TYPE`.
    pub fn new(config: &Config) -> CaLeaves {
        CaLeaves { names: server_names(config), validity: config.certs.validity, key_type: config.certs.key_type }
    }
}

impl Source for CaLeaves {
    fn mode(&self) -> &'static str {
        "CA"
    }

    fn describe(&self) -> String {
        format!("the private CA in the cache, leaves for {} days", self.validity.as_secs() / DAY)
    }

    fn preflight(&self, layout: &Layout) -> Result<(), SourceError> {
        Ca::load(layout).map(|_| ())
    }

    fn obtain<'a>(&'a self, cache: &'a CertCache) -> Obtaining<'a> {
        Box::pin(async move {
            let ca = Ca::load(cache.layout())?;
            let left = ca.intermediate.seconds_left(unix_now());
            if left < INTERMEDIATE_WARN {
                tracing::warn!(days_left = tandem_shared::certs::status::days_left(left), "the private CA's intermediate expires soon; leaves are cut short to its end\nhint: run `tandem ca init --intermediate` with the root key present");
            }
            if let Ok(cached) = cache.load(cache::CA_LEAF) {
                let mut have = cached.info.sans.clone();
                let mut want = primitives::san_strings(&self.names);
                have.sort();
                want.sort();
                let issued_here = cached.info.issuer == ca.intermediate.subject;
                let due = super::renewal::due_at(Refresh::TWO_THIRDS, cached.info.not_before, cached.info.not_after);
                if have == want && issued_here && due.is_some_and(|d| unix_now() < d) {
                    return Ok(Obtained::good(cached));
                }
            }
            let leaf = ca.issue(&self.names, self.validity, self.key_type, false)?;
            cache.write_secret(cache::CA_LEAF, leaf.to_pem().as_bytes())?;
            tracing::info!(fingerprint = %leaf.info.fingerprint, not_after = %super::rfc3339(leaf.info.not_after), sans = %leaf.info.sans.join(","), "issued a leaf from the private CA");
            Ok(Obtained::good(leaf))
        })
    }

    fn refresh(&self) -> Refresh {
        Refresh::TWO_THIRDS
    }

    fn files(&self, layout: &Layout) -> Result<(PathBuf, PathBuf), String> {
        Ok((layout.ca_leaf(), layout.ca_leaf()))
    }
}

/// What `tandem ca status` reports.
#[derive(Debug, Serialize)]
struct CaReport {
    directory: PathBuf,
    root: CertInfo,
    root_key_present: bool,
    intermediate: CertInfo,
    intermediate_days_left: i64,
}

const CA_USAGE: &str = "usage: tandem ca init [--intermediate]\n       tandem ca status [--json]\n       tandem ca export\n       tandem ca issue --san NAME [--san NAME...] [--days N] [--client] [--out DIR | --out -]\n  NAME: a DNS name, an IP address, an email address or a URI (spiffe://trust.domain/ns/app)\n  --out DIR writes NAME.pem and NAME.key (0600) into DIR (made 0700 if missing); --out - prints key and chain";

/// `tandem ca ...`: exit 0 done, 1 failed, 2 bad usage or configuration.
pub fn command(args: &[String]) -> ExitCode {
    let fail = |code: u8, e: &dyn std::fmt::Display| {
        eprintln!("tandem: error: {e}");
        ExitCode::from(code)
    };
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return fail(2, &e),
    };
    let layout = Layout::of(&config.process.cert_dir());
    let (verb, rest) = match args.split_first() {
        Some((v, rest)) => (v.as_str(), rest),
        None => return fail(2, &CA_USAGE),
    };
    let open = || CertCache::open(layout.dir()).map_err(SourceError::from);
    let result: Result<(), SourceError> = match (verb, rest) {
        ("init", flags) if flags.iter().all(|f| f == "--intermediate") => {
            open().and_then(|cache| Ca::init(&cache, !flags.is_empty())).map(|ca| {
                eprintln!(
                    "tandem: made the private CA in {}\n  root         {} (until {}, sha256 {})\n  intermediate {} (until {})\nhint: `tandem ca export` prints the root for clients to trust; the root key ({}) may now be moved offline",
                    layout.ca_dir().display(),
                    ca.root.subject,
                    super::rfc3339(ca.root.not_after),
                    ca.root.fingerprint,
                    ca.intermediate.subject,
                    super::rfc3339(ca.intermediate.not_after),
                    layout.ca_file(ROOT_KEY).display()
                );
            })
        }
        ("status", flags) if flags.iter().all(|f| f == "--json") => Ca::load(&layout).map(|ca| {
            let report = CaReport {
                directory: layout.ca_dir(),
                intermediate_days_left: tandem_shared::certs::status::days_left(ca.intermediate.seconds_left(unix_now())),
                root: ca.root,
                root_key_present: ca.root_key_present,
                intermediate: ca.intermediate,
            };
            if flags.is_empty() {
                print!("{}", render(&report));
            } else {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            }
        }),
        ("export", []) => Ca::load(&layout).map(|ca| print!("{}", ca.root_pem)),
        ("issue", flags) => return issue_command(&config, &layout, flags),
        _ => return fail(2, &CA_USAGE),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(if e.is_config() { 2 } else { 1 }, &format!("{:#}", anyhow::Error::new(e))),
    }
}

fn render(r: &CaReport) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<22} {v}\n"));
    let day = super::rfc3339;
    line("directory", r.directory.display().to_string());
    line("root", r.root.subject.clone());
    line("root valid until", day(r.root.not_after));
    line("root sha256", r.root.fingerprint.clone());
    line("root key", if r.root_key_present { "present".into() } else { "absent (kept offline)".into() });
    line("intermediate", r.intermediate.subject.clone());
    line("intermediate until", day(r.intermediate.not_after));
    line("intermediate days left", r.intermediate_days_left.to_string());
    line("intermediate sha256", r.intermediate.fingerprint.clone());
    out
}

/// `tandem ca issue --san NAME... [--days N] [--client] [--out DIR | --out -]`.
/// The private key goes to a terminal only when asked for with `--out -`.
fn issue_command(config: &Config, layout: &Layout, flags: &[String]) -> ExitCode {
    let usage = |why: &str| {
        eprintln!("tandem: error: {why}\n{CA_USAGE}");
        ExitCode::from(2)
    };
    let (mut sans, mut days, mut client, mut out) = (Vec::new(), 7u64, false, None::<PathBuf>);
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        match f.as_str() {
            "--san" => match it.next() {
                Some(n) if !n.is_empty() => sans.push(n.clone()),
                _ => return usage("--san needs a DNS name, an IP address, an email address or a URI"),
            },
            "--days" => match it.next().and_then(|d| d.parse::<u64>().ok()).filter(|d| (1..=3650).contains(d)) {
                Some(d) => days = d,
                None => return usage("--days needs a whole number of days 1-3650"),
            },
            "--client" => client = true,
            "--out" => match it.next() {
                Some(d) => out = Some(PathBuf::from(d)),
                None => return usage("--out needs a directory"),
            },
            other => return usage(&format!("unknown option {other:?}")),
        }
    }
    if sans.is_empty() {
        return usage("at least one --san is needed");
    }
    if let Some(bad) = sans.iter().find(|n| Identity::of(n).is_none()) {
        return usage(&format!("{bad:?} is not a DNS name, an IP address, an email address or a URI"));
    }
    let to_stdout = out.as_deref() == Some(Path::new("-"));
    if out.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return usage(
            "the private key would be printed to the terminal; write the pair to a directory with --out DIR, \
             or print it anyway with --out -",
        );
    }
    let issued =
        Ca::load(layout).and_then(|ca| ca.issue(&sans, Duration::from_secs(days * DAY), config.certs.key_type, client));
    let leaf = match issued {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tandem: error: {:#}", anyhow::Error::new(e));
            return ExitCode::from(1);
        }
    };
    match out.filter(|_| !to_stdout) {
        None => {
            print!("{}", leaf.to_pem());
            ExitCode::SUCCESS
        }
        Some(dir) => match write_pair(&dir, &sans[0], &leaf) {
            Ok((cert, key)) => {
                eprintln!(
                    "tandem: wrote {} and {} (until {})",
                    cert.display(),
                    key.display(),
                    super::rfc3339(leaf.info.not_after)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tandem: error: {:#}", anyhow::Error::new(e));
                ExitCode::from(1)
            }
        },
    }
}

/// Writes `NAME.pem` (chain) and `NAME.key` (0600 from creation) into `dir`.
fn write_pair(dir: &Path, name: &str, leaf: &Bundle) -> Result<(PathBuf, PathBuf), CertError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let stem: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    let (cert, key) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
    // A directory that does not exist yet is made for the key: 0700, as the cache is.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Write { path: dir.to_path_buf(), source })?;
    let pem = leaf.to_pem();
    let key_end = pem.find("-----BEGIN CERTIFICATE-----").unwrap_or(pem.len());
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Write { path, source }
    };
    // Only new files: never through a symlink, never over a file that exists
    // (create_new refuses both, O_NOFOLLOW says so for the final component).
    let create = |path: &Path, mode: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(werr(path))
    };
    let mut f = create(&key, 0o600)?;
    f.write_all(&pem.as_bytes()[..key_end]).map_err(werr(&key))?;
    let mut c = create(&cert, 0o644)?;
    c.write_all(leaf.chain_pem().as_bytes()).map_err(werr(&cert))?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_issues_leaves_that_chain_to_its_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cache = CertCache::open(&tmp.path().join("ssl")).expect("cache");
        assert!(matches!(Ca::load(cache.layout()), Err(SourceError::Ca(m)) if m.contains("tandem ca init")));
        let ca = Ca::init(&cache, false).expect("init");
        assert!(Ca::init(&cache, false).is_err(), "init never overwrites");
        let leaf = ca
            .issue(&["svc.internal".into(), "10.0.0.7".into()], Duration::from_secs(7 * DAY), KeyType::EcdsaP256, false)
            .expect("leaf");
        assert_eq!(leaf.chain.len(), 2, "leaf + intermediate");
        assert_eq!(leaf.info.issuer, ca.intermediate.subject);
        assert!(leaf.info.sans.contains(&"IP:10.0.0.7".to_string()));
        let lifetime = leaf.info.not_after - leaf.info.not_before;
        assert!((7 * DAY as i64..=7 * DAY as i64 + 600).contains(&lifetime), "{lifetime}");
        // Verified by a real verifier against the root alone.
        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::CertificateDer::from_pem_slice(ca.root_pem.as_bytes()).expect("root"))
            .expect("add");
        let verifier =
            rustls::client::WebPkiServerVerifier::builder(std::sync::Arc::new(roots)).build().expect("verifier");
        let name = rustls_pki_types::ServerName::try_from("svc.internal").expect("name");
        verifier
            .verify_server_cert(&leaf.chain[0], &leaf.chain[1..], &name, &[], rustls_pki_types::UnixTime::now())
            .expect("the leaf chains to the root");
        // Keys are private; the root key can go and the intermediate keeps issuing.
        let mode = |p: PathBuf| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).expect("meta").permissions()) & 0o777
        };
        assert_eq!(mode(cache.layout().ca_file(ROOT_KEY)), 0o600);
        assert_eq!(mode(cache.layout().ca_file(INTERMEDIATE_KEY)), 0o600);
        assert_eq!(mode(cache.layout().ca_dir()), 0o700);
        std::fs::remove_file(cache.layout().ca_file(ROOT_KEY)).expect("offline");
        let again = Ca::load(cache.layout()).expect("load without the root key");
        assert!(!again.root_key_present);
        assert!(again.issue(&["b.internal".into()], Duration::from_secs(DAY), KeyType::Rsa2048, true).is_ok());
        assert!(Ca::init(&cache, true).is_err(), "a new intermediate needs the root key");
    }

    #[test]
    fn leaves_never_outlive_the_intermediate() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cache = CertCache::open(&tmp.path().join("ssl")).expect("cache");
        let ca = Ca::init(&cache, false).expect("init");
        let leaf =
            ca.issue(&["x.internal".into()], Duration::from_secs(3000 * DAY), KeyType::EcdsaP256, false).expect("leaf");
        assert_eq!(leaf.info.not_after, ca.intermediate.not_after);
    }
}
