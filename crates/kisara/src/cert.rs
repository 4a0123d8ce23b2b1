//! `kisara cert`: a CA and a server certificate for TLS on the API and the agent channel.
//!
//! The CA is made once (`ca.pem`, `ca-key.pem`); every run signs a fresh server certificate
//! (`server.pem`, `server-key.pem`) for the hosts named, so adding a name later does not mean
//! handing every node and client a new CA. Keys are written with mode 0600.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Args, Debug)]
pub struct CertArgs {
    /// Directory for ca.pem, ca-key.pem, server.pem and server-key.pem.
    #[arg(long)]
    dir: PathBuf,
    /// A name or IP address the server is reached at (repeatable), e.g. 127.0.0.1.
    #[arg(long = "host", required = true)]
    hosts: Vec<String>,
    /// Years the server certificate stays valid (until 1 January of that many years on).
    #[arg(long, default_value_t = 2)]
    years: u16,
}

fn write(path: &Path, text: &str, private: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

pub fn run(args: CertArgs) -> Result<i32> {
    if args.years == 0 || args.years > 10 {
        bail!("--years must be 1..=10");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let ca_pem = args.dir.join("ca.pem");
    let ca_key_pem = args.dir.join("ca-key.pem");
    let issuer = if ca_pem.exists() && ca_key_pem.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key_pem)?)
            .context("reading ca-key.pem")?;
        Issuer::from_ca_cert_pem(&std::fs::read_to_string(&ca_pem)?, key)
            .context("reading ca.pem")?
    } else {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Kisara cluster CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_after = rcgen::date_time_ymd(this_year() + 11, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write(&ca_pem, &cert.pem(), false)?;
        write(&ca_key_pem, &key.serialize_pem(), true)?;
        println!("made a new CA: {}", ca_pem.display());
        Issuer::new(params, key)
    };
    let mut params = CertificateParams::new(args.hosts.clone())
        .context("the --host names are not valid DNS names or IP addresses")?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Kisara server");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.not_after = rcgen::date_time_ymd(this_year() + 1 + i32::from(args.years), 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write(&args.dir.join("server.pem"), &cert.pem(), false)?;
    write(&args.dir.join("server-key.pem"), &key.serialize_pem(), true)?;
    println!(
        "server certificate for {}: {}",
        args.hosts.join(", "),
        args.dir.join("server.pem").display()
    );
    println!(
        "serve with [server] tls_cert/tls_key; nodes and clients trust it with --ca {}",
        ca_pem.display()
    );
    Ok(0)
}

/// The current year, near enough for a certificate's end date.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}
