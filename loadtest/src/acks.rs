//! Matching PUBACKs to messages across reconnects: pure bookkeeping, no I/O.
//!
//! rumqttc reports a QoS 1 publish only by packet id: `Outgoing::Publish(pkid)` when it
//! goes on the wire, `Incoming::PubAck(pkid)` when the broker acknowledges it. A connection
//! (one rumqttc `EventLoop`, called a *session* here) takes requests in the order they were
//! handed to the client, so a FIFO of the handed-over messages maps each `Outgoing::Publish`
//! to its message. Packet ids are only unique within one session: after a reconnect the new
//! event loop numbers from 1 again, so the old ids mean nothing and are dropped; whatever was
//! not acknowledged yet (on the wire, handed over but not sent, or held back on a packet-id
//! collision) is published again, from the oldest, in the next session.
//!
//! Counting rules (what `accounting.rs` then relies on):
//! - a message is *acked* once, on its first PUBACK; a second PUBACK for the same message
//!   (a resend of a message the broker had already acknowledged) is not counted again;
//! - a PUBACK for a packet id that carries nothing in this session is ignored (stray);
//! - a message that was sent and never acknowledged stays *outstanding* and ends up
//!   *unacked* (never *lost*: lost means acknowledged by the broker and then missing).

use std::collections::{HashMap, HashSet, VecDeque};

/// One message of a connection: enough to publish it again byte for byte (the payload is a
/// pure function of these and the run id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    pub seq: u64,
    pub sent_ns: u64,
    /// Index of the device (within the connection's group) it was published for.
    pub device: usize,
}

#[derive(Debug, Default)]
pub struct AckTracker {
    /// Handed to the client in this session, waiting for their `Outgoing::Publish(pkid)`.
    fifo: VecDeque<Msg>,
    /// Held back by rumqttc on a packet-id collision (`Outgoing::AwaitAck(pkid)`): it goes out
    /// with the next `Outgoing::Publish`, as rumqttc reads no new request until then.
    collided: Option<(u16, Msg)>,
    /// On the wire in this session, by packet id.
    by_pkid: HashMap<u16, Msg>,
    /// Unacknowledged messages of earlier sessions, to publish again, oldest first.
    resend: VecDeque<Msg>,
    acked: HashSet<u64>,
    /// Acked sequence numbers in the order of their first PUBACK.
    acked_order: Vec<u64>,
    /// Messages taken from `resend` to be published again.
    pub resent: u64,
    /// PUBACKs for a packet id that carried nothing in this session.
    pub stray_acks: u64,
    /// Messages an MQTT 5 broker refused in its PUBACK: they end up unacked.
    pub refused: u64,
    /// The reason code of the first refusal.
    pub refused_reason: Option<String>,
    /// PUBACKs for a message already acked (a resend the broker had acknowledged before).
    pub duplicate_acks: u64,
}

impl AckTracker {
    /// `m` is about to be handed to the client (call before `publish`, so that the
    /// `Outgoing::Publish` event always finds it).
    pub fn queued(&mut self, m: Msg) {
        self.fifo.push_back(m);
    }

    /// rumqttc put the next request on the wire with `pkid`.
    pub fn on_publish(&mut self, pkid: u16) {
        let m = match self.collided.take() {
            Some((p, m)) if p == pkid => Some(m),
            other => {
                self.collided = other;
                self.fifo.pop_front()
            }
        };
        if let Some(m) = m {
            if let Some(old) = self.by_pkid.insert(pkid, m) {
                // rumqttc never reuses an unacknowledged packet id; if it ever did, the older
                // message can no longer be told apart: publish it again later.
                self.resend.push_back(old);
            }
        }
    }

    /// rumqttc held the next request back: `pkid` is still unacknowledged.
    pub fn on_await_ack(&mut self, pkid: u16) {
        if let Some(m) = self.fifo.pop_front() {
            if let Some((_, older)) = self.collided.replace((pkid, m)) {
                // rumqttc keeps one collided publish; a second one replaces (drops) the first.
                self.resend.push_back(older);
            }
        }
    }

    /// The broker acknowledged `pkid`: the message, if this is its first PUBACK.
    pub fn on_puback(&mut self, pkid: u16) -> Option<Msg> {
        let Some(m) = self.by_pkid.remove(&pkid) else {
            self.stray_acks += 1;
            return None;
        };
        if self.acked.insert(m.seq) {
            self.acked_order.push(m.seq);
            Some(m)
        } else {
            self.duplicate_acks += 1;
            None
        }
    }

    /// The broker refused `pkid` (an MQTT 5 PUBACK with a failure reason code):
    /// the message is neither acked nor published again, so it ends up unacked.
    pub fn on_refused(&mut self, pkid: u16, reason: String) {
        match self.by_pkid.remove(&pkid) {
            Some(_) => {
                self.refused += 1;
                self.refused_reason.get_or_insert(reason);
            }
            None => self.stray_acks += 1,
        }
    }

    /// The session ended (its event loop is gone) and a new one starts: every message that
    /// was not acknowledged is queued to be published again, oldest first; the old packet
    /// ids are forgotten.
    pub fn new_session(&mut self) {
        let mut all: Vec<Msg> = self.resend.drain(..).collect();
        all.extend(self.fifo.drain(..));
        all.extend(self.collided.take().map(|(_, m)| m));
        all.extend(self.by_pkid.drain().map(|(_, m)| m));
        all.retain(|m| !self.acked.contains(&m.seq));
        all.sort_by_key(|m| m.seq);
        all.dedup_by_key(|m| m.seq);
        self.resend = all.into();
    }

    /// The next message of an earlier session to publish again.
    pub fn next_resend(&mut self) -> Option<Msg> {
        let m = self.resend.pop_front()?;
        self.resent += 1;
        Some(m)
    }

    /// Messages sent (or to be sent again) and not acknowledged yet.
    pub fn outstanding(&self) -> usize {
        self.fifo.len()
            + usize::from(self.collided.is_some())
            + self.by_pkid.len()
            + self.resend.len()
    }

    pub fn acked_count(&self) -> usize {
        self.acked_order.len()
    }

    /// The acked sequence numbers (each once, in PUBACK order).
    pub fn take_acked(&mut self) -> Vec<u64> {
        self.acked.clear();
        std::mem::take(&mut self.acked_order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(seq: u64) -> Msg {
        Msg {
            seq,
            sent_ns: 1000 + seq,
            device: 0,
        }
    }

    #[test]
    fn acks_match_messages_by_packet_id_in_request_order() {
        let mut t = AckTracker::default();
        for s in 0..3 {
            t.queued(m(s));
        }
        t.on_publish(1);
        t.on_publish(2);
        t.on_publish(3);
        assert_eq!(t.on_puback(2), Some(m(1)));
        assert_eq!(t.on_puback(1), Some(m(0)));
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.on_puback(3), Some(m(2)));
        assert_eq!(t.outstanding(), 0);
        assert_eq!(t.take_acked(), vec![1, 0, 2]);
    }

    #[test]
    fn a_refused_publish_is_neither_acked_nor_sent_again() {
        let mut t = AckTracker::default();
        for s in 0..2 {
            t.queued(m(s));
        }
        t.on_publish(1);
        t.on_publish(2);
        t.on_refused(1, "NotAuthorized".into());
        assert_eq!(t.on_puback(2), Some(m(1)));
        assert_eq!((t.refused, t.outstanding()), (1, 0));
        assert_eq!(t.refused_reason.as_deref(), Some("NotAuthorized"));
        t.new_session();
        assert_eq!(
            t.next_resend(),
            None,
            "a refused message is not published again"
        );
        assert_eq!(t.take_acked(), vec![1]);
    }

    #[test]
    fn packet_ids_restart_after_a_reconnect_and_old_ones_mean_nothing() {
        let mut t = AckTracker::default();
        for s in 0..4 {
            t.queued(m(s));
        }
        // Session 1: 0..2 on the wire with pkids 1..3, only pkid 1 acked; 3 still in the
        // request channel when the connection drops.
        t.on_publish(1);
        t.on_publish(2);
        t.on_publish(3);
        assert_eq!(t.on_puback(1), Some(m(0)));
        t.new_session();
        assert_eq!(t.outstanding(), 3);
        // Session 2: the new event loop numbers from 1 again.
        let mut again = Vec::new();
        while let Some(x) = t.next_resend() {
            again.push(x.seq);
            t.queued(x);
        }
        assert_eq!(
            again,
            vec![1, 2, 3],
            "oldest first, the acked one not again"
        );
        assert_eq!(t.resent, 3);
        t.queued(m(4));
        for pkid in 1..=4 {
            t.on_publish(pkid);
        }
        // pkid 1 now means seq 1, not seq 0.
        assert_eq!(t.on_puback(1), Some(m(1)));
        assert_eq!(t.on_puback(2), Some(m(2)));
        assert_eq!(t.on_puback(3), Some(m(3)));
        assert_eq!(t.on_puback(4), Some(m(4)));
        assert_eq!(t.outstanding(), 0);
        assert_eq!(t.take_acked(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_resend_of_an_already_acked_message_is_counted_once() {
        let mut t = AckTracker::default();
        t.queued(m(7));
        t.on_publish(1);
        // The PUBACK is lost with the connection: the message is sent again.
        t.new_session();
        let x = t.next_resend().unwrap();
        t.queued(x);
        t.on_publish(1);
        assert_eq!(t.on_puback(1), Some(m(7)));
        // Had both copies been outstanding (a defensive case), the second PUBACK must not
        // count the message twice.
        t.queued(m(7));
        t.on_publish(2);
        assert_eq!(t.on_puback(2), None);
        assert_eq!(t.duplicate_acks, 1);
        assert_eq!(t.take_acked(), vec![7]);
    }

    #[test]
    fn sent_but_never_acked_stays_outstanding_and_stray_acks_are_ignored() {
        let mut t = AckTracker::default();
        t.queued(m(0));
        t.queued(m(1));
        t.on_publish(1);
        assert_eq!(t.on_puback(9), None);
        assert_eq!(t.stray_acks, 1);
        assert_eq!(t.outstanding(), 2, "one on the wire, one handed over");
        t.new_session();
        assert_eq!(t.outstanding(), 2);
        assert!(
            t.take_acked().is_empty(),
            "unacked, never acked (so never lost)"
        );
    }

    #[test]
    fn a_collided_publish_goes_out_with_the_next_publish_event() {
        let mut t = AckTracker::default();
        t.queued(m(0));
        t.queued(m(1));
        t.queued(m(2));
        t.on_publish(1); // seq 0
        t.on_await_ack(1); // seq 1 waits for pkid 1
        assert_eq!(t.on_puback(1), Some(m(0)));
        t.on_publish(1); // seq 1, released by the ack
        t.on_publish(2); // seq 2
        assert_eq!(t.on_puback(2), Some(m(2)));
        assert_eq!(t.on_puback(1), Some(m(1)));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn a_collided_publish_outstanding_at_a_disconnect_is_sent_again() {
        let mut t = AckTracker::default();
        t.queued(m(0));
        t.queued(m(1));
        t.on_publish(1);
        t.on_await_ack(1);
        t.new_session();
        assert_eq!(t.next_resend(), Some(m(0)));
        assert_eq!(t.next_resend(), Some(m(1)));
        assert_eq!(t.next_resend(), None);
    }
}
