//! The admit stage's bounds (`--max-payload-bytes`, `--max-user-properties`,
//! `--max-property-bytes`): one flag block for the bridge and for `argus-dlq
//! replay`, so a replayed letter meets the bounds live traffic meets.

use argus_pipeline::properties::{
    PropertyLimits, DEFAULT_MAX_PROPERTY_BYTES, DEFAULT_MAX_USER_PROPERTIES,
};
use argus_pipeline::reading::Limits;
use clap::Args;

use argus_pipeline::flags::ConfigError;

/// What a message may be, past which it is dead-lettered.
#[derive(Debug, Clone, Args)]
pub struct AdmitArgs {
    /// Largest accepted payload in bytes; larger ones go to the DLQ as `oversize`.
    #[arg(long, env = "ARGUS_BRIDGE_MAX_PAYLOAD_BYTES", default_value_t = 256 * 1024)]
    pub max_payload_bytes: usize,

    /// MQTT 5: most user properties one message may carry; past it the message goes to the
    /// DLQ as `invalid_properties`.
    #[arg(long, env = "ARGUS_BRIDGE_MAX_USER_PROPERTIES", default_value_t = DEFAULT_MAX_USER_PROPERTIES)]
    pub max_user_properties: usize,

    /// MQTT 5: most bytes of publish properties (content type, response topic, correlation
    /// data, user property names and values together) one message may carry; past it the
    /// message goes to the DLQ as `invalid_properties`. Counted in the start-up check against
    /// the NATS server's `max_payload`.
    #[arg(long, env = "ARGUS_BRIDGE_MAX_PROPERTY_BYTES", default_value_t = DEFAULT_MAX_PROPERTY_BYTES)]
    pub max_property_bytes: usize,
}

impl AdmitArgs {
    /// The payload and property bounds, or the flag that cannot be used.
    pub fn validate(&self) -> Result<(Limits, PropertyLimits), ConfigError> {
        if self.max_payload_bytes == 0 {
            return Err(ConfigError::new("max-payload-bytes", "must be at least 1"));
        }
        Ok((
            Limits {
                max_payload_bytes: self.max_payload_bytes,
            },
            PropertyLimits {
                max_user_properties: self.max_user_properties,
                max_bytes: self.max_property_bytes,
            },
        ))
    }
}
