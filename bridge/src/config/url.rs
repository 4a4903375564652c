//! The broker address flag, `--mqtt-url`: `mqtts://host:port` or `mqtt://host:port`.

/// Transport security towards the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttScheme {
    /// `mqtt://`: plain TCP (tests, never production).
    Plain,
    /// `mqtts://`: TLS, with a client certificate when one is configured.
    Tls,
}

/// The broker address, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttAddr {
    pub scheme: MqttScheme,
    pub host: String,
    pub port: u16,
}

/// Parses `mqtts://host:port` or `mqtt://host:port` (default ports 8883 and 1883).
pub fn parse_mqtt_url(url: &str) -> Result<MqttAddr, String> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (MqttScheme::Tls, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (MqttScheme::Plain, rest)
    } else {
        return Err(format!(
            "{url:?} must start with mqtts:// (TLS) or mqtt:// (plain)"
        ));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['/', '@', '?']) {
        return Err(format!("{url:?} must be scheme://host[:port]"));
    }
    let default_port = match scheme {
        MqttScheme::Tls => 8883,
        MqttScheme::Plain => 1883,
    };
    // `[::1]:8883`, `host:8883` or `host`.
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(format!("{url:?}: unexpected {after:?} after the host")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{url:?}: port {p:?} is not a port number"))?,
        None => default_port,
    };
    Ok(MqttAddr {
        scheme,
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let a = parse_mqtt_url("mqtts://broker.example:17883").expect("ok");
        assert_eq!(
            a,
            MqttAddr {
                scheme: MqttScheme::Tls,
                host: "broker.example".into(),
                port: 17883
            }
        );
        assert_eq!(parse_mqtt_url("mqtt://h").expect("ok").port, 1883);
        assert_eq!(parse_mqtt_url("mqtts://[::1]:9").expect("ok").host, "::1");
        assert!(parse_mqtt_url("mqtts://h:0").is_err());
        assert!(parse_mqtt_url("mqtts://").is_err());
        // `parse_duration` is tested with the flag blocks (`argus_pipeline::flags`).
    }
}
