//! Where certificates are meant to be used: the local stack, or production.
//!
//! A certificate's CRL distribution point (and the CRL's Issuing Distribution
//! Point, which must match it) is where a broker fetches the CRL. The local
//! stack's default, [`crate::ca::DEFAULT_CRL_URL`], is the sidecar on loopback; in
//! production that address is the broker's own loopback, so EMQX could never
//! fetch the CRL and would never see a revocation. [`Profile::Production`]
//! therefore refuses an empty URL and a loopback or unspecified host.

use std::net::IpAddr;

use crate::PkiError;

/// `--profile` of `argus-pki` (env `ARGUS_PKI_PROFILE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Profile {
    /// The local stack and tests: any CRL URL, loopback included.
    #[default]
    Local,
    /// A deployment: the CRL URL must name a host the broker can reach.
    Production,
}

impl Profile {
    /// Checks `crl_url` for this profile; the error says what to give instead.
    pub fn check_crl_url(self, crl_url: &str) -> Result<(), PkiError> {
        if self == Profile::Local {
            return Ok(());
        }
        let refuse = |why: &str| {
            Err(PkiError::InvalidCrlUrl(format!(
                "--crl-url {crl_url:?} {why}: with --profile production the broker fetches the CRL \
                 from this URL, so it must name an address the broker can reach \
                 (e.g. http://ingest-http:8081/pki/crl.der)"
            )))
        };
        let Some(rest) = crl_url
            .strip_prefix("http://")
            .or_else(|| crl_url.strip_prefix("https://"))
        else {
            return refuse("is not an http:// or https:// URL");
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.split(':').next().unwrap_or(""),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() {
            return refuse("has no host");
        }
        let loopback = host == "localhost"
            || host.ends_with(".localhost")
            || host
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
        if loopback {
            return refuse("is a loopback address");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_refuses_what_a_broker_cannot_reach() {
        let p = Profile::Production;
        for bad in [
            "",
            crate::ca::DEFAULT_CRL_URL,
            "http://localhost/crl.der",
            "http://LOCALHOST.:8080/crl.der",
            "https://api.localhost/crl",
            "http://[::1]:8080/crl.der",
            "http://0.0.0.0/crl.der",
            "http://127.1.2.3/crl.der",
            "ftp://crl.example/crl.der",
            "http:///crl.der",
        ] {
            let e = p.check_crl_url(bad).expect_err(bad).to_string();
            assert!(e.contains("--profile production"), "{e}");
        }
        for good in [
            "http://ingest-http:8080/pki/crl.der",
            "https://pki.example.com/crl.der",
            "http://[2001:db8::1]/crl.der",
            "http://10.0.0.5/crl.der",
        ] {
            p.check_crl_url(good).expect(good);
        }
        assert!(Profile::Local
            .check_crl_url(crate::ca::DEFAULT_CRL_URL)
            .is_ok());
    }
}
