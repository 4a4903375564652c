//! The hot path per message, N times, for counting instructions with callgrind
//! (repeatable on a busy machine, unlike wall time):
//!
//! ```sh
//! cargo build --release -p argus-pipeline --example hot_path
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/hot_path check 100000
//! ```
//!
//! `check`: `reading::check` (topic, payload, message id) of the 186-byte reading the
//! criterion bench uses. `row`: what the sink does per stored reading: the content
//! digest and the binary COPY row. The program's start-up is the same in both modes,
//! so the difference between two runs of different N is the per-message cost
//! (docs/benchmarks.md, "Instruction counts").

use std::hint::black_box;

use argus_pipeline::reading::{check, Limits, Reading, Source};
use argus_pipeline::sink;
use bytes::{Bytes, BytesMut};
use chrono::Utc;
use uuid::Uuid;

const DEVICE: Uuid = Uuid::from_u128(0x0d000000_0000_4000_8000_000000000001);
const TENANT: Uuid = Uuid::from_u128(0x0a000000_0000_4000_8000_000000000001);
const PAYLOAD: &[u8] = br#"{"timestamp":"2024-05-01T10:00:00.123Z","messageId":"m-000001","temperature":21.53,"humidity":48.2,"battery":3.71,"rssi":-67,"status":"ok","firmware":"1.4.2"}"#;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mode, n) = match (args.next(), args.next().map(|n| n.parse::<usize>())) {
        (Some(mode), Some(Ok(n))) => (mode, n),
        _ => {
            eprintln!("usage: hot_path check|row N");
            std::process::exit(2);
        }
    };
    let topic = format!("devices/{DEVICE}/telemetry");
    let limits = Limits::default();
    match mode.as_str() {
        "check" => {
            for _ in 0..n {
                black_box(check(black_box(&topic), black_box(PAYLOAD), &limits).is_ok());
            }
        }
        "row" => {
            let checked = check(&topic, PAYLOAD, &limits).expect("valid");
            let reading = Reading::from_checked(
                checked,
                TENANT,
                Bytes::from_static(PAYLOAD),
                Utc::now(),
                Source::Mqtt,
                Some(topic),
                Some("bridge-0-0".into()),
            );
            let mut out = BytesMut::with_capacity(4096);
            for _ in 0..n {
                out.clear();
                let r = black_box(&reading);
                sink::copy::row(&mut out, r, &r.content_sha256());
                black_box(&out);
            }
        }
        other => {
            eprintln!("unknown mode {other}: usage: hot_path check|row N");
            std::process::exit(2);
        }
    }
}
