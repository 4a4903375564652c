//! `argus-pki`: create the CA, issue and revoke client certificates, write the CRL.
//! Thin wrapper around the library; see `docs/pki.md`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use argus_pki::profile::Profile;
use argus_pki::{Ca, RevocationReason, Subject};
use clap::{Args, Parser, Subcommand};
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "argus-pki",
    version,
    about = "Certificates for the Argus MQTT edge (CA, broker, devices, bridges, CRL)"
)]
struct Cli {
    /// The PKI directory (ca.crt, ca.key, server.*, crl.*, devices/, bridges/).
    #[arg(
        long,
        env = "ARGUS_PKI_DIR",
        global = true,
        default_value = ".stack/pki"
    )]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create what is missing: CA (10 years, never overwritten), broker server certificate
    /// (1 year, re-issued when missing or expiring within 30 days), CRL.
    Init {
        /// Extra subject alternative names for the broker (added to localhost and 127.0.0.1).
        #[arg(long = "san", env = "ARGUS_PKI_SANS", value_delimiter = ',')]
        sans: Vec<String>,
        #[command(flatten)]
        crl: CrlArgs,
    },
    /// Issue a client certificate (CN = the id, EKU clientAuth).
    Issue(IssueArgs),
    /// Revoke one certificate by serial, or all of a device's, and rewrite the CRL.
    Revoke {
        /// Serial number (hex, as printed by `issue`).
        #[arg(required_unless_present = "device", conflicts_with = "device")]
        serial: Option<String>,
        /// Revoke every active certificate of this device.
        #[arg(long)]
        device: Option<Uuid>,
        /// RFC 5280 reason: unspecified, keyCompromise, superseded, cessationOfOperation, ...
        #[arg(long, default_value = "unspecified")]
        reason: RevocationReason,
        #[command(flatten)]
        crl: CrlArgs,
    },
    /// Write a fresh CRL (crl.pem, crl.der) with a new number and next update in 7 days.
    /// Run it daily and reload the broker (Mosquitto: SIGHUP).
    Crl(CrlArgs),
    /// List the certificates recorded in the index.
    List,
}

#[derive(Debug, Args)]
struct IssueArgs {
    /// A device id (UUID): writes DIR/devices/<id>.crt and .key.
    #[arg(long, required_unless_present = "bridge", conflicts_with = "bridge")]
    device: Option<Uuid>,
    /// A bridge identity such as bridge-0: writes DIR/bridges/<name>.crt and .key.
    #[arg(long)]
    bridge: Option<String>,
    /// Validity in days (devices: at most 365).
    #[arg(long, default_value_t = argus_pki::DEFAULT_VALIDITY_DAYS)]
    days: u32,
    /// Sign this CSR (PEM) instead of generating a key; its subject is replaced.
    #[arg(long)]
    csr: Option<PathBuf>,
    /// Write the files here instead of DIR/devices or DIR/bridges.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    #[command(flatten)]
    crl: CrlArgs,
}

/// Where the CRL is published: written into certificates (CRL distribution point)
/// and into the CRL (its Issuing Distribution Point), which must agree.
#[derive(Debug, Args)]
struct CrlArgs {
    /// The CRL's URL: the certificates' CRL distribution point and the CRL's Issuing
    /// Distribution Point. Give the same value to every command on one directory.
    #[arg(long, env = "ARGUS_PKI_CRL_URL", default_value = argus_pki::DEFAULT_CRL_URL)]
    crl_url: String,
    /// `production` refuses a CRL URL that is empty or loopback (the default is the
    /// local stack's loopback sidecar, which a production broker cannot reach).
    #[arg(long, env = "ARGUS_PKI_PROFILE", value_enum, default_value_t = Profile::Local)]
    profile: Profile,
}

impl CrlArgs {
    /// The CA in `dir` with this CRL URL, once the profile accepts it.
    fn ca(&self, dir: &std::path::Path) -> anyhow::Result<Ca> {
        self.profile.check_crl_url(&self.crl_url)?;
        Ok(Ca::load(dir)?.with_crl_url(self.crl_url.clone()))
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let dir = cli.dir;
    match cli.command {
        Command::Init { sans, crl } => {
            crl.profile.check_crl_url(&crl.crl_url)?;
            let report = Ca::init(&dir, &sans)?;
            print!("{report}");
            if crl.crl_url != argus_pki::DEFAULT_CRL_URL {
                // `init` wrote the CRL for the default URL: write it for this one.
                let info = crl.ca(&dir)?.write_crl()?;
                println!("crl: rewritten for --crl-url (#{})", info.number);
            }
        }
        Command::Issue(args) => {
            let subject = match (args.device, args.bridge) {
                (Some(id), None) => Subject::Device(id),
                (None, Some(name)) => Subject::bridge(&name)?,
                _ => bail!("give exactly one of --device or --bridge"),
            };
            let csr = match &args.csr {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading --csr {}", path.display()))?,
                ),
                None => None,
            };
            let ca = args.crl.ca(&dir)?;
            let issued = ca.issue(&subject, args.days, csr.as_deref())?;
            let out = args
                .out_dir
                .unwrap_or_else(|| subject.default_out_dir(&dir));
            let files = issued.write_files(&out)?;
            println!("issued {} serial {}", issued.common_name, issued.serial_hex);
            println!("certificate: {}", files.cert.display());
            if let Some(key) = files.key {
                println!("private key: {}", key.display());
            }
            println!("ca: {}", dir.join(argus_pki::ca::paths::CA_CERT).display());
            println!(
                "expires: {}",
                issued.not_after.format(&Rfc3339).unwrap_or_default()
            );
        }
        Command::Revoke {
            serial,
            device,
            reason,
            crl,
        } => {
            let ca = crl.ca(&dir)?;
            match (serial, device) {
                (Some(serial), None) => {
                    if ca.revoke(&serial, reason)? {
                        println!("revoked {serial} ({reason})");
                    } else {
                        println!("{serial} was already revoked");
                    }
                }
                (None, Some(device)) => {
                    let serials = ca.revoke_device(device, reason)?;
                    if serials.is_empty() {
                        println!("device {device} had no active certificate");
                    }
                    for s in serials {
                        println!("revoked {s} ({reason})");
                    }
                }
                _ => bail!("give a SERIAL or --device, not both"),
            }
            println!(
                "crl rewritten: {} (reload the broker: SIGHUP to Mosquitto)",
                dir.join(argus_pki::ca::paths::CRL_PEM).display()
            );
        }
        Command::Crl(crl) => {
            let info = crl.ca(&dir)?.write_crl()?;
            println!(
                "crl #{} with {} revoked serial(s), next update {}: {} and {}",
                info.number,
                info.revoked.len(),
                info.next_update.format(&Rfc3339).unwrap_or_default(),
                info.pem_path.display(),
                info.der_path.display()
            );
        }
        Command::List => {
            let ca = Ca::load(&dir)?;
            for c in ca.certificates()? {
                println!(
                    "{}\t{:?}\t{}\tnot_after={}\t{}",
                    c.serial,
                    c.kind,
                    c.common_name,
                    c.not_after,
                    c.revoked_at
                        .map(|t| format!("revoked={t}"))
                        .unwrap_or_else(|| "active".into())
                );
            }
        }
    }
    Ok(())
}
