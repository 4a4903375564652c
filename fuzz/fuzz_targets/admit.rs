//! The whole admit path of the bridge, without I/O: the intake's bound
//! (`argus_bridge::source::intake_fits`), the checks (`reading::check`), the device
//! look-up (a model registry) and `argus_bridge::admit::route`.
//!
//! Input: the first byte picks the intake bound (count 1..=8, bytes a multiple of
//! 64) and the devices' states; then records of `[qos][topic len][topic][payload
//! len: u16][payload]` arrive on one connection. The worker takes one message off
//! the intake after every second record, so the bound is reached. Properties:
//! - every message ends in exactly one of stored, dead-lettered or shed;
//! - only QoS 0 is shed; a QoS 1 message that finds the intake full is left to the
//!   broker and comes again (the model redelivers it once the intake drains), so it
//!   too ends stored or dead-lettered;
//! - a stored reading belongs to an active device and carries the checked id; a dead
//!   letter fits NATS's default `max_payload` however large and hostile the payload.
#![no_main]

use std::collections::VecDeque;
use std::sync::Arc;

use argus_bridge::admit::{route, Routed};
use argus_bridge::config::IntakeLimits;
use argus_bridge::source::{intake_fits, Message};
use argus_pipeline::dlq::{DeadLetter, DlqPublisher};
use argus_pipeline::reading::{check, Limits};
use argus_pipeline::registry::{DeviceInfo, DeviceStatus};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

const ACTIVE: Uuid = Uuid::from_u128(0x0d000000_0000_4000_8000_000000000001);
const DISABLED: Uuid = Uuid::from_u128(0x0d000000_0000_4000_8000_000000000002);

struct Input {
    n: usize,
    qos0: bool,
    topic: String,
    payload: Bytes,
}

fn records(mut data: &[u8]) -> Vec<Input> {
    let mut out = Vec::new();
    while let [qos, tlen, rest @ ..] = data {
        let tlen = usize::from(*tlen).min(rest.len());
        let (topic, rest) = rest.split_at(tlen);
        let Some((len, rest)) = rest.split_first_chunk::<2>() else {
            break;
        };
        let plen = usize::from(u16::from_be_bytes(*len)).min(rest.len());
        let (payload, rest) = rest.split_at(plen);
        // Topics a device may use, or arbitrary bytes (rumqttc hands the bridge a
        // `String`; bytes that are not UTF-8 end the connection before admit).
        let topic = match qos >> 1 & 3 {
            0 => format!("devices/{ACTIVE}/telemetry"),
            1 => format!("devices/{DISABLED}/telemetry"),
            _ => String::from_utf8_lossy(topic).into_owned(),
        };
        out.push(Input {
            n: out.len(),
            qos0: qos & 1 == 0,
            topic,
            payload: Bytes::copy_from_slice(payload),
        });
        data = rest;
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Stored,
    DeadLettered,
    Shed,
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let limits = IntakeLimits {
        max_messages: usize::from(mode & 7) + 1,
        max_bytes: usize::from(mode >> 3) * 64 + 1,
    };
    let disabled_known = mode & 0x80 != 0;
    let inputs = records(data);
    let mut ends: Vec<Vec<End>> = vec![Vec::new(); inputs.len()];
    let mut intake: VecDeque<&Input> = VecDeque::new();
    let mut bytes = 0usize;
    let mut left_to_broker: VecDeque<&Input> = VecDeque::new();

    let admit = |m: &Input, ends: &mut Vec<Vec<End>>| {
        let msg = Message {
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            client_id: Arc::from("bridge-0-0"),
            received_at: chrono::Utc::now(),
            dup: false,
            properties: None,
        };
        let end = match check(&msg.topic, &msg.payload, &Limits::default()) {
            Err(reject) => dead_letter(reject, msg),
            Ok(checked) => {
                let id = checked.message_id;
                let device = [
                    Some(DeviceInfo {
                        device_id: ACTIVE,
                        tenant_id: Uuid::nil(),
                        status: DeviceStatus::Active,
                        device_type_id: None,
                    }),
                    disabled_known.then_some(DeviceInfo {
                        device_id: DISABLED,
                        tenant_id: Uuid::nil(),
                        status: DeviceStatus::Disabled,
                        device_type_id: None,
                    }),
                ]
                .into_iter()
                .flatten()
                .find(|d| d.device_id == checked.device_id);
                match route(checked, device.as_ref(), msg) {
                    Routed::Store(r) => {
                        assert_eq!(r.device_id, ACTIVE, "stored for a device that is not active");
                        assert_eq!(r.message_id, id);
                        End::Stored
                    }
                    Routed::DeadLetter(reject, msg) => dead_letter(reject, msg),
                }
            }
        };
        ends[m.n].push(end);
    };

    let mut arrivals: VecDeque<&Input> = inputs.iter().collect();
    let mut step = 0usize;
    while !arrivals.is_empty() || !intake.is_empty() || !left_to_broker.is_empty() {
        step += 1;
        assert!(step < 100 * (inputs.len() + 1), "the model does not terminate");
        if let Some(m) = arrivals.pop_front() {
            let size = m.topic.len() + m.payload.len();
            if intake_fits(intake.len(), bytes, size, &limits) {
                bytes += size;
                intake.push_back(m);
            } else if m.qos0 {
                ends[m.n].push(End::Shed);
            } else {
                left_to_broker.push_back(m);
            }
        }
        if step % 2 == 0 || arrivals.is_empty() {
            if let Some(m) = intake.pop_front() {
                bytes -= m.topic.len() + m.payload.len();
                admit(m, &mut ends);
            } else {
                // Drained: the connection is renewed and the broker redelivers.
                arrivals.extend(left_to_broker.drain(..));
            }
        }
    }
    for (m, e) in inputs.iter().zip(&ends) {
        assert_eq!(e.len(), 1, "message {} ended {e:?}", m.n);
        assert!(e[0] != End::Shed || m.qos0, "a QoS 1 message was shed");
    }
});

fn dead_letter(reject: argus_pipeline::reading::Reject, msg: Message) -> End {
    let letter = DeadLetter::new(
        reject,
        Some(msg.topic),
        Some(msg.client_id.to_string()),
        msg.received_at,
        msg.payload,
    );
    let limit = DlqPublisher::DEFAULT_MAX_PAYLOAD - DlqPublisher::HEADER_ALLOWANCE;
    assert!(letter.encode_within(limit).len() <= limit, "a dead letter over max_payload");
    End::DeadLettered
}
