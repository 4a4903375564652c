//! Every metric name of the MQTT source and the bridge process (`argus_bridge_*`), in
//! one place. The shared pipeline's names (`argus_sink_*`, `argus_dlq_*`,
//! `argus_registry_*`) are in `argus_pipeline::metrics`, with the naming rules and
//! the recorder; [`describe`] registers both.
//!
//! Labels are bounded: `reason` (a [`DlqReason`]), `target` (`mqtt`), `connection`
//! (the connection index, below `--connections`), `qos` (`0`).

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

use argus_pipeline::metrics::cached;
use argus_pipeline::reject::DlqReason;

/// Counter: MQTT publishes received from the broker (before any check).
pub const RECEIVED_TOTAL: &str = "argus_bridge_received_total";
/// Counter: PUBACKs sent to the broker (after durability or dead-lettering).
pub const ACKS_TOTAL: &str = "argus_bridge_acks_total";
/// Histogram: seconds from receiving a message to sending its PUBACK.
pub const ACK_LAG_SECONDS: &str = "argus_bridge_ack_lag_seconds";
/// Gauge: messages received and not yet acknowledged (all connections).
pub const IN_FLIGHT_MESSAGES: &str = "argus_bridge_in_flight_messages";
/// Counter: MQTT (re)connections after the first, label `target` = `mqtt`.
pub const RECONNECTS_TOTAL: &str = "argus_bridge_reconnects_total";
/// Gauge: 1 while the connection to the broker is up (label `connection` = index, bounded by `--connections`).
pub const MQTT_CONNECTED: &str = "argus_bridge_mqtt_connected";
/// Counter: messages rejected by the checks, label `reason` (they go to the DLQ).
pub const REJECTED_TOTAL: &str = "argus_bridge_rejected_total";
/// Counter: times a connection's intake held more than `--max-inflight` messages
/// (the broker's inflight window is larger than configured).
pub const INTAKE_OVERFLOW_TOTAL: &str = "argus_bridge_intake_overflow_total";
/// Counter: acknowledgements dropped because the connection that received the
/// message is gone (the broker redelivers the message).
pub const STALE_ACKS_TOTAL: &str = "argus_bridge_stale_acks_total";
/// Counter: QoS 0 messages not admitted because the intake was full (label `qos` = `0`).
/// QoS 0 is at-most-once: the broker does not send them again.
pub const SHED_TOTAL: &str = "argus_bridge_shed_total";
/// Counter: QoS 1 messages not admitted because the intake was full (or had been
/// full on this connection): left to the broker, which redelivers them.
pub const LEFT_TO_BROKER_TOTAL: &str = "argus_bridge_left_to_broker_total";
/// Counter: connections renewed after an intake-full episode, once everything
/// queued was acknowledged, so the broker redelivers what was left to it.
pub const INTAKE_FULL_DISCONNECTS_TOTAL: &str = "argus_bridge_intake_full_disconnects_total";
/// Counter: MQTT 5 QoS 1 messages the broker sent past the connection's Receive
/// Maximum (`--max-inflight`): not admitted, left to the broker like an intake-full one.
pub const RECEIVE_MAXIMUM_EXCEEDED_TOTAL: &str = "argus_bridge_receive_maximum_exceeded_total";
/// Counter: DUP redeliveries of a packet id still outstanding on the same
/// connection, not queued a second time.
pub const DUP_SKIPPED_TOTAL: &str = "argus_bridge_dup_skipped_total";
/// Gauge: 1 while this replica holds its `--replica auto` slot lease, 0 while it
/// reconnects to take it again (absent with a fixed `--replica`).
pub const LEASE_HELD: &str = "argus_bridge_lease_held";
/// Gauge: seconds the oldest message not yet acknowledged (or, for QoS 0, not yet
/// durable) has waited, over all connections; 0 when there is none.
pub const OLDEST_UNACKED_SECONDS: &str = "argus_bridge_oldest_unacked_seconds";

/// Registers `# HELP` text for every metric of the bridge and of the pipeline, and
/// their zero series. Idempotent.
pub fn describe() {
    argus_pipeline::metrics::describe();
    describe_counter!(RECEIVED_TOTAL, "MQTT messages received from the broker.");
    describe_counter!(ACKS_TOTAL, "PUBACKs sent to the broker.");
    describe_histogram!(
        ACK_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Time from receiving a message to acknowledging it."
    );
    describe_gauge!(
        IN_FLIGHT_MESSAGES,
        "Messages received and not yet acknowledged."
    );
    describe_counter!(
        RECONNECTS_TOTAL,
        "Reconnections after the first connection."
    );
    describe_gauge!(MQTT_CONNECTED, "1 while the MQTT connection is up.");
    describe_counter!(
        REJECTED_TOTAL,
        "Messages rejected by the checks, by reason."
    );
    describe_counter!(
        INTAKE_OVERFLOW_TOTAL,
        "Times a connection's intake held more than --max-inflight messages."
    );
    describe_counter!(
        STALE_ACKS_TOTAL,
        "Acknowledgements dropped because their connection was gone."
    );
    describe_counter!(
        SHED_TOTAL,
        "QoS 0 messages not admitted because the intake was full."
    );
    describe_counter!(
        RECEIVE_MAXIMUM_EXCEEDED_TOTAL,
        "MQTT 5 QoS 1 messages the broker sent past the Receive Maximum (--max-inflight); left to the broker."
    );
    describe_counter!(
        LEFT_TO_BROKER_TOTAL,
        "QoS 1 messages not admitted because the intake was full; the broker redelivers them."
    );
    describe_counter!(
        INTAKE_FULL_DISCONNECTS_TOTAL,
        "Connections renewed after an intake-full episode so the broker redelivers."
    );
    describe_counter!(
        DUP_SKIPPED_TOTAL,
        "DUP redeliveries of a packet id still outstanding, not queued twice."
    );
    describe_gauge!(
        OLDEST_UNACKED_SECONDS,
        metrics::Unit::Seconds,
        "Age of the oldest message not yet acknowledged."
    );
    describe_gauge!(
        LEASE_HELD,
        "1 while the --replica auto slot lease is held, 0 while it is being taken again."
    );
    counter!(SHED_TOTAL, "qos" => "0").absolute(0);
    gauge!(OLDEST_UNACKED_SECONDS).set(0.0);
    for name in [
        RECEIVED_TOTAL,
        ACKS_TOTAL,
        RECONNECTS_TOTAL,
        INTAKE_OVERFLOW_TOTAL,
        STALE_ACKS_TOTAL,
        INTAKE_FULL_DISCONNECTS_TOTAL,
        LEFT_TO_BROKER_TOTAL,
        RECEIVE_MAXIMUM_EXCEEDED_TOTAL,
        DUP_SKIPPED_TOTAL,
    ] {
        counter!(name).absolute(0);
    }
    for reason in DlqReason::ALL {
        counter!(REJECTED_TOTAL, "reason" => reason.as_str()).absolute(0);
    }
    gauge!(IN_FLIGHT_MESSAGES).set(0.0);
}

// ---- recording helpers -------------------------------------------------------

pub fn received() {
    cached!(Counter, counter!(RECEIVED_TOTAL)).increment(1);
}

pub fn rejected(reason: DlqReason) {
    counter!(REJECTED_TOTAL, "reason" => reason.as_str()).increment(1);
}

/// A PUBACK went out, `lag` after the message arrived.
pub fn acked(lag: std::time::Duration) {
    cached!(Counter, counter!(ACKS_TOTAL)).increment(1);
    cached!(Histogram, histogram!(ACK_LAG_SECONDS)).record(lag.as_secs_f64());
}

pub fn stale_ack() {
    counter!(STALE_ACKS_TOTAL).increment(1);
}

pub fn intake_overflow() {
    counter!(INTAKE_OVERFLOW_TOTAL).increment(1);
}

pub fn shed_qos0() {
    counter!(SHED_TOTAL, "qos" => "0").increment(1);
}

pub fn left_to_broker() {
    counter!(LEFT_TO_BROKER_TOTAL).increment(1);
}

pub fn receive_maximum_exceeded() {
    counter!(RECEIVE_MAXIMUM_EXCEEDED_TOTAL).increment(1);
}

pub fn intake_full_disconnect() {
    counter!(INTAKE_FULL_DISCONNECTS_TOTAL).increment(1);
}

pub fn dup_skipped() {
    counter!(DUP_SKIPPED_TOTAL).increment(1);
}

pub fn lease_held(held: bool) {
    gauge!(LEASE_HELD).set(if held { 1.0 } else { 0.0 });
}

pub fn oldest_unacked(age: std::time::Duration) {
    gauge!(OLDEST_UNACKED_SECONDS).set(age.as_secs_f64());
}

pub fn reconnected() {
    counter!(RECONNECTS_TOTAL, "target" => "mqtt").increment(1);
}

/// `delta` messages entered (positive) or left (negative) the in-flight set.
pub fn in_flight(delta: f64) {
    cached!(Gauge, gauge!(IN_FLIGHT_MESSAGES)).increment(delta);
}

pub fn mqtt_connected(connection: u16, up: bool) {
    gauge!(MQTT_CONNECTED, "connection" => connection.to_string()).set(if up { 1.0 } else { 0.0 });
}
