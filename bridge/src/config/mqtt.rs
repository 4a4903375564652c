//! The MQTT side of the configuration: protocol version, session expiry, intake
//! bounds, the client identity, and [`MqttConfig`], what the source needs.

use std::path::PathBuf;
use std::time::Duration;

use super::parse_duration;
use super::url::MqttAddr;

pub use argus_pipeline::flags::MqttVersion;

/// How long an MQTT 5 broker keeps a lost connection's session (`--session-expiry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionExpiry {
    Never,
    After(Duration),
}

impl SessionExpiry {
    /// The Session Expiry Interval in CONNECT: seconds, `u32::MAX` for never
    /// (MQTT 5 §3.1.2.11.2).
    pub fn seconds(self) -> u32 {
        match self {
            SessionExpiry::Never => u32::MAX,
            SessionExpiry::After(d) => u32::try_from(d.as_secs()).unwrap_or(u32::MAX - 1),
        }
    }

    pub(super) fn parse(text: &str) -> Result<SessionExpiry, String> {
        if text.trim() == "never" {
            return Ok(SessionExpiry::Never);
        }
        let d = parse_duration(text)?;
        if d < Duration::from_secs(1) {
            return Err("must be at least 1s (a session that ends with its connection loses the share the broker queued for it), or `never`".into());
        }
        if d.as_secs() >= u64::from(u32::MAX) {
            return Err(format!("must be below {}s, or `never`", u32::MAX));
        }
        Ok(SessionExpiry::After(d))
    }
}

/// How much one connection's intake may hold (`--intake-max-messages`,
/// `--intake-max-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakeLimits {
    pub max_messages: usize,
    /// Topic plus payload bytes of the queued publishes.
    pub max_bytes: usize,
}

/// The client certificate and key files (mutual TLS).
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl ClientIdentity {
    /// The files of connection `conn` of replica `replica`: `{replica}` and
    /// `{connection}` in the paths are replaced.
    pub fn for_connection(&self, replica: u32, conn: u16) -> ClientIdentity {
        let expand = |p: &PathBuf| {
            PathBuf::from(
                p.to_string_lossy()
                    .replace("{replica}", &replica.to_string())
                    .replace("{connection}", &conn.to_string()),
            )
        };
        ClientIdentity {
            cert_file: expand(&self.cert_file),
            key_file: expand(&self.key_file),
        }
    }
}

/// Everything the MQTT source needs.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub addr: MqttAddr,
    pub ca_file: Option<PathBuf>,
    pub identity: Option<ClientIdentity>,
    pub replica: u32,
    pub connections: u16,
    pub share_group: String,
    pub topic_filter: String,
    pub version: MqttVersion,
    pub max_inflight: usize,
    /// Used with MQTT 5 only.
    pub session_expiry: SessionExpiry,
    pub intake: IntakeLimits,
    pub keep_alive: Duration,
    pub reconnect_max: Duration,
}

impl MqttConfig {
    /// `$share/<group>/<filter>`.
    pub fn subscription(&self) -> String {
        format!("$share/{}/{}", self.share_group, self.topic_filter)
    }

    /// The stable client id of connection `conn` of this replica: `bridge-<replica>-<conn>`.
    pub fn client_id(&self, conn: u16) -> String {
        format!("bridge-{}-{}", self.replica, conn)
    }
}
